"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for int4 weights in groups.

A few input channels of each linear carry much larger activations than the rest, and their weights
matter most. Scaling those weight columns up by s (and the activations down by 1/s, folded into the
op before: an RMSNorm weight or the up projection's rows) makes int4 rounding relatively finer
exactly where it counts; the float model computes the same function. Per group of linears that share
an input, s = mean|x|^alpha with alpha grid-searched on calibration text to minimise the quantized
linears' output error; then each group of weights may be clipped to a shrunk range where that
lowers the output error further. Layers are processed in order, each fed the outputs of the
already-scaled layers before it. The result is float weights that `int4_quantize_groups` then rounds.

The output error of a weight error D over inputs X is ||X D^T||^2 = sum(D G * D) with G = X^T X, so
the searches need the inputs only once, as their Gram matrix."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pydoc_data.topics
import torch
from torch import nn

from hetserve.core.outputs import ScheduledRequest
from hetserve.model.attention import AttentionMetadata, kv_cache_shape
from hetserve.model.llama import DecoderLayer, LlamaForCausalLM, TensorShard
from hetserve.model.quantization import int4_fake_quantize, int4_group_size
from hetserve.worker.inputs import prepare_inputs

logger = logging.getLogger(__name__)

SCALE_GRID = 20
"""alpha takes the values 0, 1/20, ..., 19/20 (alpha 0 is plain round to nearest)."""
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))
"""Each group's range may shrink to as little as 55% of its largest magnitude."""
CALIBRATION_SEQUENCE_LEN = 512


def calibration_and_held_out_text() -> tuple[str, str]:
    """Two disjoint English texts from Python's own documentation (no download): the first half of
    the pydoc topics, for calibration, and the second, for evaluation."""
    topics = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    half = len(topics) // 2
    return "\n\n".join(topics[:half]), "\n\n".join(topics[half:])


def calibration_sequences(token_ids: list[int], num_tokens: int,
                          sequence_len: int = CALIBRATION_SEQUENCE_LEN) -> list[list[int]]:
    """The first `num_tokens` of `token_ids` cut into sequences of at most `sequence_len`."""
    if num_tokens < 1 or len(token_ids) < num_tokens:
        raise ValueError(f"calibration needs {num_tokens} tokens, the text has {len(token_ids)}")
    token_ids = token_ids[:num_tokens]
    return [token_ids[i:i + sequence_len] for i in range(0, num_tokens, sequence_len)]


@dataclass
class LayerInputs:
    """What one decoder layer's linears saw: Gram matrices and mean magnitudes of their inputs."""

    grams: dict[str, torch.Tensor]
    mean_magnitudes: dict[str, torch.Tensor]


@dataclass
class _Batch:
    """Calibration sequences laid out as one flat prefill batch, with a scratch KV cache."""

    positions: torch.Tensor
    meta: AttentionMetadata
    kv_cache: tuple[torch.Tensor, torch.Tensor]


@torch.inference_mode()
def apply_awq(model: LlamaForCausalLM, sequences: list[list[int]], group_size: int, clip: bool = True) -> None:
    """Search and fold AWQ scales (and clip ranges) into `model`'s float weights, in place. The model
    must hold every layer of an unsharded model; afterwards quantize its layers with `group_size`."""
    if not (model.is_first and model.is_last) or model.shard != TensorShard.whole(model.spec):
        raise ValueError("AWQ needs the whole model in one piece (no pipeline or tensor parallelism)")
    batch = _flat_batch(model, sequences)
    x = model.embed_tokens(_token_tensor(sequences, model))
    for index, layer in enumerate(model.layers):
        logger.info("AWQ: layer %d of %d", index + 1, len(model.layers))
        inputs, _ = _run_layer(layer, x, model, batch)
        _scale_layer(layer, inputs, group_size)
        inputs, x = _run_layer(layer, x, model, batch)
        if clip:
            _clip_layer(layer, inputs, group_size)


def _token_tensor(sequences: list[list[int]], model: LlamaForCausalLM) -> torch.Tensor:
    return torch.tensor([t for s in sequences for t in s], device=model.embed_tokens.weight.device)


def _flat_batch(model: LlamaForCausalLM, sequences: list[list[int]]) -> _Batch:
    # One block per sequence, as long as the longest: each sequence is a single prefill chunk.
    block_size = max(map(len, sequences))
    device = model.embed_tokens.weight.device
    scheduled = [ScheduledRequest(str(i), ids, 0, [i], False) for i, ids in enumerate(sequences)]
    inputs = prepare_inputs(scheduled, block_size, device)
    shape = kv_cache_shape(len(sequences), block_size, model.spec.num_kv_heads, model.spec.head_dim)
    dtype = model.embed_tokens.weight.dtype
    cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
    return _Batch(inputs.positions, inputs.attention, cache)


_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _run_layer(layer: DecoderLayer, x: torch.Tensor, model: LlamaForCausalLM, batch: _Batch
               ) -> tuple[LayerInputs, torch.Tensor]:
    """The layer's output on `x`, and the statistics of its linears' inputs on the way."""
    inputs = LayerInputs({}, {})

    def record(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor]) -> None:
            features = args[0].float()
            inputs.grams[name] = features.T @ features
            inputs.mean_magnitudes[name] = features.abs().mean(dim=0)
        return hook

    handles = [layer.get_submodule(name).register_forward_pre_hook(record(name)) for name in _LINEARS]
    try:
        out = layer(x, model.rope.at(batch.positions, x.dtype), batch.kv_cache, batch.meta)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, out


# --------------------------------------------------------------------------- scales


def _scale_layer(layer: DecoderLayer, inputs: LayerInputs, group_size: int) -> None:
    """Search and fold the scales of each group of linears that share an input."""
    attn, mlp = layer.self_attn, layer.mlp

    def search(name: str) -> torch.Tensor:
        weight = layer.get_submodule(name).weight
        return search_scales(weight, inputs.grams[name], inputs.mean_magnitudes[name], group_size)

    _fold(layer.input_layernorm.weight, attn.qkv_proj, search("self_attn.qkv_proj"))
    _fold(layer.post_attention_layernorm.weight, mlp.gate_up_proj, search("mlp.gate_up_proj"))
    _fold(mlp.gate_up_proj.weight[mlp.down_proj.in_features:], mlp.down_proj, search("mlp.down_proj"))
    # o_proj's input channels are v_proj's output rows only without grouped-query attention.
    if attn.kv_size == attn.q_size:
        v_rows = slice(attn.q_size + attn.kv_size, None)
        o_scales = search("self_attn.o_proj")
        _fold(attn.qkv_proj.weight[v_rows], attn.o_proj, o_scales)
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias[v_rows] /= o_scales.to(attn.qkv_proj.bias.dtype)


def search_scales(weight: torch.Tensor, gram: torch.Tensor, magnitudes: torch.Tensor, group_size: int
                  ) -> torch.Tensor:
    """Per input channel s = mean|x|^alpha (normalised around 1) for the alpha whose int4 weights
    W*s, applied to x/s, give the smallest output error; `gram` is X^T X of the inputs X and
    `magnitudes` their mean |x| per channel."""
    weight = weight.float()
    group_size = int4_group_size(weight.shape[1], group_size)
    best_error, best_scales = float("inf"), torch.ones_like(magnitudes)
    for step in range(SCALE_GRID):
        scales = magnitudes.pow(step / SCALE_GRID).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = output_error(weight - int4_fake_quantize(weight * scales, group_size) / scales, gram)
        if error < best_error:
            best_error, best_scales = error, scales
    return best_scales


def output_error(weight_error: torch.Tensor, gram: torch.Tensor) -> float:
    """||X D^T||^2 for the weight error D [out, in] and G = X^T X [in, in]."""
    return ((weight_error @ gram) * weight_error).sum().item()


def _fold(before: torch.Tensor, linear: nn.Linear, scales: torch.Tensor) -> None:
    """Multiply `linear`'s input columns by `scales` and divide what produces its input (a norm
    weight [in] or weight rows [in, ...]) by them, leaving the float function unchanged."""
    linear.weight.mul_(scales.to(linear.weight.dtype))
    shape = (-1,) + (1,) * (before.dim() - 1)
    before.div_(scales.to(before.dtype).view(shape))


# --------------------------------------------------------------------------- clipping


def _clip_layer(layer: DecoderLayer, inputs: LayerInputs, group_size: int) -> None:
    attn = layer.self_attn
    # Not the query and key rows: their errors pass through the softmax, which this measure ignores.
    _clip(attn.qkv_proj.weight[attn.q_size + attn.kv_size:], inputs.grams["self_attn.qkv_proj"], group_size)
    for name in _LINEARS[1:]:
        _clip(layer.get_submodule(name).weight, inputs.grams[name], group_size)


def _clip(weight: torch.Tensor, gram: torch.Tensor, group_size: int) -> None:
    """Clamp each group of `weight` to the shrunk range [-r max|w|, r max|w|] whose int4 rounding
    gives the smallest output error, in place. A group's own error is D_g G_gg D_g^T."""
    out_features, in_features = weight.shape
    group_size = int4_group_size(in_features, group_size)
    num_groups = in_features // group_size
    original = weight.float()
    groups = original.view(out_features, num_groups, group_size)
    diagonal_blocks = torch.stack([gram[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                                   for g in range(num_groups)])
    magnitude = groups.abs().amax(dim=-1, keepdim=True)
    best_error = torch.full((out_features, num_groups), float("inf"), device=weight.device)
    best_limit = magnitude.clone()
    for ratio in CLIP_RATIOS:
        limit = magnitude * ratio
        clipped = torch.maximum(torch.minimum(groups, limit), -limit).reshape(out_features, in_features)
        error = (original - int4_fake_quantize(clipped, group_size)).view(out_features, num_groups, group_size)
        group_errors = torch.einsum("ogi,gij,ogj->og", error, diagonal_blocks, error)
        better = group_errors < best_error
        best_error = torch.where(better, group_errors, best_error)
        best_limit = torch.where(better[..., None], limit, best_limit)
    clipped = torch.maximum(torch.minimum(groups, best_limit), -best_limit)
    weight.copy_(clipped.reshape(out_features, in_features).to(weight.dtype))
