#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only, tuned for this CPU) from the llama.cpp source that the
# llama-cpp-python sdist on PyPI vendors, and install the binary as $PEERS/llama-server.
#
#   benchmarks/install_llama_server.sh            # 3-10 min on 2 cores
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 HETSERVE_PEERS=/some/dir benchmarks/install_llama_server.sh
#
# Idempotent: does nothing when $PEERS/llama-server exists and $PEERS/llama-server.flags holds the
# flags this script would build with now (delete either to rebuild). The build tree is kept under
# $PEERS/build, so an interrupted build resumes where it stopped.
#
# Flags, and why:
#   GGML_NATIVE=ON            -march=native: AVX-512, AVX512-BF16/VNNI (and AMX, see below)
#   LLAMA_OPENSSL=OFF         no HTTPS (everything here is loopback); this llama.cpp has no CURL
#                             option any more (LLAMA_CURL is deprecated and ignored)
#   LLAMA_USE_PREBUILT_UI=OFF the web UI would be downloaded from Hugging Face; we have no internet,
#   LLAMA_BUILD_UI=OFF        and no npm: the server is built with an empty UI table (API only)
#   BUILD_SHARED_LIBS=OFF     one self-contained binary that can be copied anywhere
#   LLAMA_BUILD_COMMIT        from the sdist's CHANGELOG, so that --version names it even where git
#                             cannot read the sdist's one-commit clone (whose build number is 1)
#   compiler                  $CC/$CXX if set; else GCC 14+; else clang (clang-16 and up) when installed,
#                             else GCC with -mno-amx-*. GCC 12's AMX intrinsics are unusable: its
#                             _tile_loadconfig tells the optimizer it reads 8 of the config's 64 bytes,
#                             so ggml's stores of rows/colsb are dropped as dead and the first AMX matmul
#                             faults (SIGSEGV in ggml_backend_amx_mul_mat during warm-up); its tileloadd
#                             declares no memory read at all. Without AMX, ggml's prompt processing runs
#                             on AVX512-VNNI, several times slower here. To keep AMX on Debian 12:
#                                 apt-get install clang-16 libomp-16-dev
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PEERS="${HETSERVE_PEERS:-$HOME/.cache/hetserve/peers}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
JOBS="${JOBS:-2}"
BINARY="$PEERS/llama-server"

gcc_major() { "$1" -dumpversion | cut -d. -f1; }
if [[ -z "${CXX:-}" ]]; then
    CC=gcc CXX=g++
    if (( $(gcc_major g++) < 14 )); then
        for version in 20 19 18 17 16; do
            if command -v "clang++-$version" > /dev/null; then CC="clang-$version" CXX="clang++-$version"; break; fi
        done
    fi
fi
CC="${CC:-cc}"
ISA_FLAGS=""
if "$CXX" --version | grep -q "Free Software Foundation" && (( $(gcc_major "$CXX") < 14 )); then
    ISA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
FLAGS="llama-cpp-python $VERSION; GGML_NATIVE=ON; $("$CXX" --version | head -1); extra: ${ISA_FLAGS:-none}"

if [[ -x "$BINARY" && "$(cat "$BINARY.flags" 2>/dev/null)" == "$FLAGS" ]]; then
    echo "already installed: $BINARY"
    "$BINARY" --version 2>&1 | grep -E '^(version|built with)' || true
    exit 0
fi

BUILD="$PEERS/build"
SRC="$BUILD/llama_cpp_python-$VERSION"
mkdir -p "$BUILD"

if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    nice -n 19 "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$BUILD"
    tar -xzf "$BUILD/llama_cpp_python-$VERSION.tar.gz" -C "$BUILD"
fi
LLAMA="$SRC/vendor/llama.cpp"

# "- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098": the first one after this version's heading.
COMMIT="$(awk -v v="## [$VERSION]" 'index($0, v) == 1 {found = 1; next}
    found && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' \
    "$SRC/CHANGELOG.md")"
COMMIT="${COMMIT:-unknown}"
echo "llama-cpp-python $VERSION vendors llama.cpp commit $COMMIT"

START=$(date +%s)
BUILD_DIR="$LLAMA/build-$(basename "$CXX")"  # one per compiler: a CMake cache keeps its compiler
nice -n 19 cmake -S "$LLAMA" -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_C_FLAGS="$ISA_FLAGS" -DCMAKE_CXX_FLAGS="$ISA_FLAGS" \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_OPENMP=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT"
nice -n 19 cmake --build "$BUILD_DIR" --target llama-server -j "$JOBS"
echo "built in $(( $(date +%s) - START )) s"

install -m 755 "$BUILD_DIR/bin/llama-server" "$BINARY"
echo "$FLAGS" > "$BINARY.flags"
echo "installed: $BINARY ($FLAGS)"
"$BINARY" --version 2>&1 | grep -E '^(version|built with)' || true
