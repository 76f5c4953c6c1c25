"""A small step's decoder layers in one native call (kernels/decoder.c), for bf16 models on the CPU.

At decode batch sizes each of a layer's dozen operations is a kernel call of a few microseconds
wrapped in as many of Python (ctypes, checks, allocations): for SmolLM2 at one token a step that
was 3-4 ms of an 8-11 ms step. NativeDecoder describes a stage's layers and KV caches to the C side
once (pointers to the weights, which stay where loading put them), and then runs each step of up to
MAX_TOKENS tokens through all the layers in one call. It calls the kernels that the layer-by-layer
path calls, so its results are the same bits; other steps, and models that any layer's kernels do
not cover (other dtypes, quantized KV caches, tensor parallelism, streamed layers), keep that path."""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from hetserve.model.attention import AttentionMetadata, KVLayerCache
from hetserve.model.cpu_kernels import (BYTE_MAX_ROWS, bf16_cpu, declare_kernels, load_kernels, paged_decode_supported,
                                        rope_store_supported, small_linear_max_rows)
from hetserve.model.quantization import Int4Linear, Int8Linear

_WEIGHT_BF16, _WEIGHT_INT4, _WEIGHT_INT8 = 0, 1, 2


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("out_features", ctypes.c_int), ("in_features", ctypes.c_int),
                ("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int), ("num_heads", ctypes.c_int), ("num_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("intermediate", ctypes.c_int), ("block_size", ctypes.c_int),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


@functools.cache
def _decoder_library() -> ctypes.CDLL | None:
    library = load_kernels("decoder", "fused_ops", "linear", "quantized_linear", "paged_decode")
    if library is None:
        return None
    library.decoder_scratch_elements.restype = ctypes.c_int64
    library.decoder_scratch_elements.argtypes = [ctypes.POINTER(_Dims), ctypes.c_int]
    arguments = ([ctypes.POINTER(_Dims), ctypes.POINTER(_Layer), ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
                 + [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int])
    declare_kernels(library, arguments, "decoder_layers_bf16")
    return library


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _describe_linear(module: nn.Module) -> _Linear | None:
    """The C description of a linear layer, or None where its kernel is not one of decoder.c's."""
    if isinstance(module, Int4Linear) and module.byte_kernel:
        kind, tensors = _WEIGHT_INT4, (module.weight, module.scales, module.mins)
        rows, columns = module.weight.shape[0], module.weight.shape[1] * 2
    elif isinstance(module, Int8Linear) and module.byte_kernel:
        kind, tensors = _WEIGHT_INT8, (module.weight, module.scales, None)
        rows, columns = module.weight.shape
    elif (isinstance(module, nn.Linear) and bf16_cpu(module.weight)
          and small_linear_max_rows() >= NativeDecoder.MAX_TOKENS):
        kind, tensors = _WEIGHT_BF16, (module.weight, None, None)
        rows, columns = module.weight.shape
    else:
        return None
    bias = module.bias
    if any(t is not None and not t.is_contiguous() for t in (*tensors, bias)):
        return None
    if bias is not None and bias.dtype != torch.bfloat16:
        return None
    return _Linear(kind, rows, columns, *map(_pointer, tensors), _pointer(bias))


class NativeDecoder:
    """A stage's decoder layers and their KV caches, described once for decoder_layers_bf16."""

    MAX_TOKENS = BYTE_MAX_ROWS
    """Steps of up to this many tokens (the linear kernels' limit, bf16 ones' too): past it the
    linears are matrix products for oneDNN, whose time dwarfs the calls around them."""

    def __init__(self, layers: list[_Layer], dims: _Dims, kv_caches: list[KVLayerCache],
                 keep_alive: list[torch.Tensor]):
        self.layers = (_Layer * len(layers))(*layers)
        self.dims = dims
        self.kv_caches = kv_caches
        self._keep_alive = keep_alive
        library = _decoder_library()
        self._run = library.decoder_layers_bf16
        self._scratch = torch.empty(library.decoder_scratch_elements(ctypes.byref(dims), self.MAX_TOKENS),
                                    dtype=torch.bfloat16)

    @classmethod
    def build(cls, model, kv_caches: list[KVLayerCache]) -> NativeDecoder | None:
        """The native form of `model`'s layers over `kv_caches`, or None where a layer's operations
        are not all decoder.c's. `model` is a LlamaForCausalLM stage, or anything with its `spec`,
        `shard` and `layers` (the profiler's copies of one layer)."""
        from hetserve.model.llama import DecoderLayer, TensorShard

        if _decoder_library() is None or len(kv_caches) != len(model.layers) or not kv_caches:
            return None
        if model.shard != TensorShard.whole(model.spec):
            return None  # a tensor-parallel rank all-reduces inside each layer
        layers, keep_alive = [], []
        for layer, kv_cache in zip(model.layers, kv_caches):
            described = type(layer) is DecoderLayer and cls._describe_layer(layer, kv_cache)
            if not described:
                return None
            layers.append(described)
            keep_alive += [*layer.state_dict().values(), *kv_cache]
        attention = model.layers[0].self_attn
        spec = model.spec
        dims = _Dims(spec.hidden_size, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                     layers[0].down.in_features, kv_caches[0][0].shape[2], spec.rms_norm_eps, attention.scale)
        return cls(layers, dims, kv_caches, keep_alive)

    @staticmethod
    def _describe_layer(layer: nn.Module, kv_cache: KVLayerCache) -> _Layer | None:
        attention, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if not bf16_cpu(*norms):
            return None
        # A one-token step's queries and fused projection, to ask the attention kernels about this cache.
        k_cache = kv_cache[0]
        queries = k_cache.new_empty(1, attention.num_heads, attention.head_dim)
        qkv = k_cache.new_empty(1, attention.q_size + 2 * attention.kv_size)
        if not (rope_store_supported(qkv, kv_cache) and paged_decode_supported(queries, k_cache)):
            return None
        linears = [_describe_linear(m) for m in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(linear is None for linear in linears):
            return None
        return _Layer(norms[0].data_ptr(), norms[1].data_ptr(), *linears, k_cache.data_ptr(), kv_cache[1].data_ptr())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor | None:
        """The hidden states [T, hidden] after all the layers, for bf16 x [T, hidden] and the step's
        rotation (cos, sin [T, head_dim]); None where this step is not one to run natively."""
        tokens = x.shape[0]
        if tokens > self.MAX_TOKENS or x.dtype != torch.bfloat16:
            return None
        if meta.prefills:
            tables = meta.token_block_tables()
            if tables is None:
                return None
        else:
            tables = meta.decode_block_tables, meta.decode_context_lens
        block_tables, context_lens = (t.to(torch.int64).contiguous() for t in tables)
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        out = x.contiguous().clone()
        self._run(ctypes.byref(self.dims), self.layers, len(self.layers), out.data_ptr(), tokens,
                  cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
                  block_tables.shape[1], self._scratch.data_ptr(), torch.get_num_threads())
        return out
