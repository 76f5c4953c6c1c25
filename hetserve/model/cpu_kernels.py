"""C kernels for the CPU hot path, compiled on first use with the system C compiler.

- kernels/paged_decode.c: PyTorch has no paged-attention op: done with tensor ops, decode attention
  must gather every sequence's blocks into a padded copy before attending, which costs more than the
  attention itself. This kernel reads the blocks in place; it also takes short prefill chunks, each
  query attending as a decode of its own prefix (attention.PAGED_PREFILL_MAX_CONTEXT).
- kernels/linear.c: bf16 linear layers of decode batches and short prefill chunks (up to 256 rows),
  reading the weights at memory speed where oneDNN's matrix-vector path does not, and faster than
  its matrix products at 3-256 rows with cold weights.
- kernels/quantized_linear.c: int4 / int8 weight-only linears, up to 6 rows as byte dot products
  (AVX512-VNNI) that read the weights once at memory speed, faster than PyTorch's packed int4 / int8
  kernels; from 7 rows dequantized a tile at a time for linear.c's bf16 tiles.
- kernels/fused_ops.c: a bf16 layer's RMSNorms (with the residual add), its RoPE with the KV-cache
  write and its MLP activation, each one call instead of a dozen PyTorch ops that cost more to
  dispatch than to run.
- kernels/decoder.c, linked with all of the above: a small step through all of a stage's layers in one
  call (hetserve.model.native_decoder).

Without a C compiler (or with HETSERVE_CPU_KERNELS=0) the engine falls back to PyTorch ops, with
the same results up to rounding."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hetserve.cache import cache_dir

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).with_name("kernels")
# (query dtype, cache dtype) -> kernel; an int8 cache comes with float32 scales per (block, head, slot).
_FUNCTIONS = {
    (torch.float32, torch.float32): "paged_decode_f32",
    (torch.bfloat16, torch.bfloat16): "paged_decode_bf16",
    (torch.float32, torch.int8): "paged_decode_int8_f32",
    (torch.bfloat16, torch.int8): "paged_decode_int8_bf16",
    (torch.float32, torch.float8_e4m3fn): "paged_decode_fp8_f32",
    (torch.bfloat16, torch.float8_e4m3fn): "paged_decode_fp8_bf16",
}


def _compile(sources: list[Path], target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, "-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC",
                        "-o", tmp, *map(str, sources), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sources_hash(*paths: Path) -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in paths)).hexdigest()[:16]


def kernels_version() -> str:
    """A hash of all the kernels' sources: what a measurement of their speed (a profile) depends on."""
    return _sources_hash(*sorted(_SOURCES.glob("*.[ch]")))


@functools.cache
def load_kernels(name: str, *linked: str) -> ctypes.CDLL | None:
    """kernels/{name}.c, linked with kernels/{linked}.c (and the headers there), built once per version
    into the cache, then loaded."""
    if os.environ.get("HETSERVE_CPU_KERNELS", "1") == "0":
        return None
    sources = [_SOURCES / f"{source}.c" for source in (name, *linked)]
    # The shared headers are part of every source's version.
    target = cache_dir("kernels") / f"{name}-{_sources_hash(*sources, *sorted(_SOURCES.glob('*.h')))}.so"
    try:
        if not target.exists():
            _compile(sources, target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("CPU kernels of %s unavailable (%s); using PyTorch ops", sources[0].name, error)
        return None


def declare_kernels(library: ctypes.CDLL, argtypes: list, *names: str) -> None:
    """Give the library's functions `names` (which return nothing) their argument types."""
    for name in names:
        function = getattr(library, name)
        function.restype, function.argtypes = None, argtypes


@functools.cache
def _paged_decode_library() -> ctypes.CDLL | None:
    library = load_kernels("paged_decode")
    if library is None:
        return None
    limits = (ctypes.c_int(), ctypes.c_int())
    library.paged_decode_limits(ctypes.byref(limits[0]), ctypes.byref(limits[1]))
    library.max_group, library.max_head_dim = limits[0].value, limits[1].value
    declare_kernels(library, [ctypes.c_void_p] * 8 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int],
                    *_FUNCTIONS.values())
    return library


def paged_decode_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    library = _paged_decode_library()
    if library is None or q.device.type != "cpu" or (q.dtype, k_cache.dtype) not in _FUNCTIONS:
        return False
    group = q.shape[1] // k_cache.shape[1]
    return group <= library.max_group and q.shape[2] <= library.max_head_dim


def paged_decode(q: torch.Tensor, kv_cache: tuple[torch.Tensor, ...], block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] -> [B, heads, head_dim] over one layer's cache, (k, v) in q's dtype or
    fp8, or for int8 (k, v, k_scales, v_scales). Call only where paged_decode_supported."""
    q = q.contiguous()
    block_tables = block_tables.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    batch, num_heads, head_dim = q.shape
    k_cache = kv_cache[0]
    _, num_kv_heads, block_size, _ = k_cache.shape
    cache_pointers = [t.data_ptr() for t in kv_cache] + [None] * (4 - len(kv_cache))
    getattr(_paged_decode_library(), _FUNCTIONS[q.dtype, k_cache.dtype])(
        q.data_ptr(), *cache_pointers, block_tables.data_ptr(),
        context_lens.data_ptr(), out.data_ptr(), batch, num_heads, num_kv_heads, head_dim, block_size,
        block_tables.shape[1], scale, torch.get_num_threads())
    return out


def bf16_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


@functools.cache
def _linear_library() -> ctypes.CDLL | None:
    library = load_kernels("linear")
    if library is None:
        return None
    library.max_rows = library.linear_bf16_available()
    declare_kernels(library, [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4, "linear_bf16")
    return library


def small_linear_max_rows() -> int:
    """The most rows of x small_linear takes (0 where its kernel cannot run here)."""
    library = _linear_library()
    return 0 if library is None else library.max_rows


def small_linear_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether small_linear takes these operands: bf16 on the CPU, a 2-D x of at most the kernel's
    row limit (decode batches; larger ones are matrix products that oneDNN does well) whose width
    matches the weight's."""
    operands = (x, weight) if bias is None else (x, weight, bias)
    if not bf16_cpu(*operands) or x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return False
    return 0 < x.shape[0] <= small_linear_max_rows()


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] where small_linear_supported."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    _linear_library().linear_bf16(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                  out.data_ptr(), x.shape[0], weight.shape[0], x.shape[1],
                                  torch.get_num_threads())
    return out


@functools.cache
def _fused_library() -> ctypes.CDLL | None:
    library = load_kernels("fused_ops")
    if library is None:
        return None
    library.max_head_dim = library.rope_store_max_head_dim()
    declare_kernels(library, [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_float, ctypes.c_int],
                    "rms_norm_bf16")
    declare_kernels(library, [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6, "rope_store_bf16")
    declare_kernels(library, [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3, "silu_mul_bf16")
    return library


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> bool:
    """bf16 [T, H] on the CPU (and `delta`, to add first, alike)."""
    operands = (x, weight) if delta is None else (x, weight, delta)
    return (bf16_cpu(*operands) and x.dim() == 2 and (delta is None or delta.shape == x.shape)
            and _fused_library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RMSNorm of x, None), or with `delta`: (RMSNorm of x + delta, x + delta). bf16 [T, H] where
    rms_norm_supported."""
    x = x.contiguous()
    out = torch.empty_like(x)
    total = None if delta is None else torch.empty_like(x)
    _fused_library().rms_norm_bf16(x.data_ptr(), None if delta is None else delta.contiguous().data_ptr(),
                                   weight.data_ptr(), out.data_ptr(), None if total is None else total.data_ptr(),
                                   x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out, total


def silu_mul_supported(gate_up: torch.Tensor) -> bool:
    return bf16_cpu(gate_up) and gate_up.dim() == 2 and _fused_library() is not None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = (gate | up) [T, 2C], bf16 where silu_mul_supported."""
    gate_up = gate_up.contiguous()
    tokens, columns = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, columns, dtype=gate_up.dtype)
    _fused_library().silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), tokens, columns, torch.get_num_threads())
    return out


def rope_store_supported(qkv: torch.Tensor, kv_cache: tuple[torch.Tensor, ...]) -> bool:
    """bf16 activations and a bf16 cache on the CPU (quantized caches take the PyTorch path)."""
    library = _fused_library()
    return (library is not None and bf16_cpu(qkv, kv_cache[0]) and len(kv_cache) == 2 and qkv.is_contiguous()
            and kv_cache[0].shape[-1] <= library.max_head_dim)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
               kv_cache: tuple[torch.Tensor, ...], num_heads: int) -> None:
    """Rotate the q and k heads of qkv ([T, (heads + 2 kv_heads) * head_dim]) in place by cos and sin
    ([T, head_dim], bf16), and write each token's k and v heads to its cache slot."""
    k_cache, v_cache = kv_cache
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    slots = slots.to(torch.int64).contiguous()
    _fused_library().rope_store_bf16(
        qkv.data_ptr(), cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), slots.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, head_dim, block_size,
        torch.get_num_threads())


# Byte dot-product linears (kernels/quantized_linear.c): x rounded to int8 in blocks of BYTE_BLOCK, the
# weights stored in chunks of BYTE_CHUNK input columns in the kernel's order.
BYTE_BLOCK = 32
BYTE_CHUNK = 64
BYTE_MAX_ROWS = 256
DEQUANTIZE_MAX_BYTES = 8 << 20
"""Past BYTE_MAX_ROWS rows of x, dequantizing the whole weight to bf16 for oneDNN's matrix product is
faster than the kernels' tiles; but only while the bf16 copy (up to DEQUANTIZE_MAX_BYTES) stays in
cache for the matmul that reads it back. A larger one, as a vocabulary-sized LM head's, would cross
memory twice."""


@functools.cache
def _quantized_library() -> ctypes.CDLL | None:
    library = load_kernels("quantized_linear", "linear")
    if library is None or not library.quantized_linear_available():
        return None
    declare_kernels(library, [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4, "int4_linear_bf16")
    declare_kernels(library, [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4, "int8_linear_bf16")
    declare_kernels(library, [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3, "int4_dequantize_bf16")
    declare_kernels(library, [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3, "int8_dequantize_bf16")
    return library


def byte_linear_supported(device: torch.device, dtype: torch.dtype, in_features: int) -> bool:
    """Whether a quantized linear of a `dtype` model on `device` can use the byte dot-product kernels:
    bf16 on a CPU with AVX512-VNNI, and an input width the chunks divide."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and in_features % BYTE_CHUNK == 0
            and _quantized_library() is not None)


def to_chunk_order(values: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, K] with each chunk of 64 columns in the kernels' order: 32-bit lane L holds
    elements 4 (L / 2) .. 4 (L / 2) + 3 of the chunk's block L % 2 (kernels/quantized_linear.c)."""
    rows, columns = values.shape
    return values.reshape(rows, columns // BYTE_CHUNK, 2, 8, 4).transpose(2, 3).reshape(rows, columns).contiguous()


def pack_int4_chunks(values: torch.Tensor) -> torch.Tensor:
    """[N, K] int4 values in [0, 15] -> uint8 [N, K / 2]: a chunk's positions p and p + 32 share a byte."""
    rows, columns = values.shape
    chunks = to_chunk_order(values.to(torch.uint8)).reshape(rows, columns // BYTE_CHUNK, BYTE_CHUNK)
    half = BYTE_CHUNK // 2
    return (chunks[..., :half] | (chunks[..., half:] << 4)).reshape(rows, columns // 2)


def _dequantize_first(x: torch.Tensor, rows: int, columns: int) -> bool:
    return x.shape[0] > BYTE_MAX_ROWS and rows * columns * 2 <= DEQUANTIZE_MAX_BYTES


def int4_byte_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 times int4 weights (pack_int4_chunks, fp16 scales and mins per 32 columns)."""
    library = _quantized_library()
    return _byte_linear(x, packed.shape[0], packed.shape[1] * 2, bias, (packed, scales, mins),
                        library.int4_linear_bf16, library.int4_dequantize_bf16)


def int8_byte_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor:
    """x [M, K] bf16 times int8 weights (to_chunk_order of value + 128 as uint8, fp32 scales per row)."""
    library = _quantized_library()
    return _byte_linear(x, *weight.shape, bias, (weight, scales), library.int8_linear_bf16,
                        library.int8_dequantize_bf16)


def _byte_linear(x: torch.Tensor, rows: int, columns: int, bias: torch.Tensor | None,
                 stored: tuple[torch.Tensor, ...], multiply, dequantize) -> torch.Tensor:
    """x times the [rows, columns] weight held as the tensors `stored`: by the kernel `multiply`, or
    past BYTE_MAX_ROWS dequantized by `dequantize` for oneDNN (both take `stored` as their first
    arguments)."""
    pointers = [t.data_ptr() for t in stored]
    if _dequantize_first(x, rows, columns):
        dense = torch.empty(rows, columns, dtype=torch.bfloat16)
        dequantize(*pointers, dense.data_ptr(), rows, columns, torch.get_num_threads())
        return F.linear(x, dense, bias)
    x = x.contiguous()
    out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
    multiply(x.data_ptr(), *pointers, None if bias is None else bias.data_ptr(), out.data_ptr(), x.shape[0], rows,
             columns, torch.get_num_threads())
    return out
