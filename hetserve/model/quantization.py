"""Weight-only quantization of the decoder layers' matmuls (gpt-fast style), for memory-bound decode:
int8 with one scale per output channel, or int4 in groups along the input dimension with a scale and
zero point per group (round to nearest). The LM head, in both modes, becomes int8 per vocabulary row
(as gpt-fast's int8 mode does): at one token a step it is the largest single read of a small model's
step (SmolLM2: 56 MB in bf16 against 66 MB for all 30 int4 layers). Activations, norms and the
embedding stay in the model dtype. In bf16 on a CPU with AVX512-VNNI the matmuls run on hetserve's
byte dot-product kernels (cpu_kernels), on other CPUs on PyTorch's packed int8/int4 kernels;
elsewhere the weights are dequantized on the fly.

Weights that come from a 4-bit GGUF were already rounded in blocks of 32 (Q4_0, Q4_1; the sub-blocks
of the K-quants): int4 groups of 32 aligned with those blocks find their values again (up to the
bf16 rounding of the dequantized weights they start from), where groups of 128 would round them a
second time (SmolLM2 Q4_1: greedy next-token agreement with the unquantized model 1.00 with groups
of 32, 0.64 with groups of 128). That is why `auto` (resolve_quantization) keeps such a file in int4."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hetserve.model.cpu_kernels import (BYTE_BLOCK, byte_linear_supported, int4_byte_linear, int8_byte_linear,
                                        pack_int4_chunks, to_chunk_order)
from hetserve.model.loader import stored_in_4_bits
from hetserve.model.spec import ModelSpec

QUANTIZATIONS = ("int8", "int4")
"""The quantizations a worker runs; the configuration may also say "auto" (resolve_quantization)."""
INT4_GROUP_SIZES = (128, 64, 32)
"""A linear's group size is the largest of these (up to a requested one) that divides its input dimension."""
GGUF_BLOCK_SIZE = 32
_INT4_INNER_K_TILES = 2


class Int8Linear(nn.Module):
    """int8 weights with one scale per output channel; in bf16 on an AVX512-VNNI CPU, in the byte
    kernels' layout, else in PyTorch's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        values = torch.round(weight / scales[:, None]).clamp(-128, 127)
        self.byte_kernel = byte_linear_supported(weight.device, linear.weight.dtype, linear.in_features)
        if self.byte_kernel:
            self.register_buffer("weight", to_chunk_order((values + 128).to(torch.uint8)))
            self.register_buffer("scales", scales)
        else:
            self.register_buffer("weight", values.to(torch.int8))
            self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.byte_kernel:
            return int8_byte_linear(x, self.weight, self.scales, self.bias)
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x, self.weight, self.scales)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """int4 weights in groups along the input: [out, in] values in [0, 15] and [out, in / group] float
    scales and minimums, a weight being value * scale + minimum (int4_quantize_groups). Stored for
    the kernels of the device they are on: in bf16 on an AVX512-VNNI CPU the byte kernels' layout
    (fp16 scales and minimums per 32 inputs, as GGUF's Q4_1), else PyTorch's packed int4 layout."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 dtype: torch.dtype, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.group_size = group_size
        self.bias = bias
        fp16_max = torch.finfo(torch.float16).max
        self.byte_kernel = (byte_linear_supported(values.device, dtype, self.in_features)
                            and scales.abs().max() < fp16_max and mins.abs().max() < fp16_max)
        if self.byte_kernel:
            blocks = group_size // BYTE_BLOCK
            self.register_buffer("weight", pack_int4_chunks(values))
            self.register_buffer("scales", scales.repeat_interleave(blocks, dim=1).half())
            self.register_buffer("mins", mins.repeat_interleave(blocks, dim=1).half())
            return
        self.register_buffer("scales_and_zeros", int4_scales_and_zeros(scales, mins).to(dtype))
        if values.device.type == "cpu":
            self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(
                values.to(torch.int32), _INT4_INNER_K_TILES))
        else:
            self.register_buffer("weight", values.to(torch.uint8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> Int4Linear:
        """Round `linear`'s weights to nearest in groups of int4_group_size(in_features, group_size)."""
        weight = linear.weight.detach()
        group_size = int4_group_size(weight.shape[1], group_size or INT4_GROUP_SIZES[0])
        values, scales, mins = int4_quantize_groups(weight.float(), group_size)
        return cls(values, scales, mins, group_size, weight.dtype, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.byte_kernel:
            return int4_byte_linear(x, self.weight, self.scales, self.mins, self.bias)
        if x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                  self.scales_and_zeros.to(x.dtype))
        else:
            y = F.linear(x, int4_dequantize(self.weight, self.scales_and_zeros, self.group_size).to(x.dtype))
        return y if self.bias is None else y + self.bias


def int4_quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float weights -> int32 values in [0, 15] and [out, in / group] scales and minimums, so
    that a weight is value * scale + minimum (round to nearest between each group's extremes)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input dimension {in_features}")
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    mins = groups.amin(dim=-1)
    scales = (groups.amax(dim=-1) - mins).clamp(min=1e-6) / 15
    values = ((groups - mins[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return values.reshape(out_features, in_features), scales, mins


def int4_scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """[out, groups] scales and minimums -> the kernels' [groups, out, 2] pairs. They compute
    (value - 8) * scale + zero, so the zero is the minimum shifted by 8 steps."""
    return torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous()


def int4_fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` rounded to int4 and back (in float), for measuring what int4 costs."""
    values, scales, mins = int4_quantize_groups(weight, group_size)
    groups = values.reshape(*scales.shape, group_size) * scales[..., None] + mins[..., None]
    return groups.reshape(weight.shape)


def int4_dequantize(values: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = values.shape
    scales, zeros = scales_and_zeros.float().transpose(0, 1).unbind(-1)
    groups = values.float().reshape(out_features, -1, group_size) - 8
    return (groups * scales[..., None] + zeros[..., None]).reshape(out_features, in_features)


def int4_group_size(in_features: int, at_most: int = INT4_GROUP_SIZES[0]) -> int:
    """The largest of INT4_GROUP_SIZES, up to `at_most`, that divides `in_features`."""
    for size in INT4_GROUP_SIZES:
        if size <= at_most and in_features % size == 0:
            return size
    raise ValueError(f"int4 needs an input dimension divisible by {INT4_GROUP_SIZES[-1]}, got {in_features}")


def resolve_quantization(requested: str | None, model_path: Path, spec: ModelSpec, device: torch.device,
                         dtype: torch.dtype, keeps_float_layers: bool) -> str | None:
    """The quantization a worker runs: `requested`, where that is not "auto". Auto is int4 for a
    GGUF stored in 4-bit blocks where every layer matmul can run on the byte kernels: the file's
    own precision, reading a third of bf16's bytes a token (llama.cpp runs such files this way).
    Anything else, and a worker whose layers must stay in float (`keeps_float_layers`: streamed
    from host memory, or an int4 checkpoint's own linears), keeps float weights."""
    if requested != "auto":
        return requested
    widths = (spec.hidden_size, spec.num_heads * spec.head_dim, spec.intermediate_size)
    if keeps_float_layers or not all(byte_linear_supported(device, dtype, width) for width in widths):
        return None
    return "int4" if stored_in_4_bits(Path(model_path)) else None


def quantize_lm_head(model: nn.Module) -> None:
    """Replace the model's LM head, where this stage has one, by its int8 form. A tied head gets its
    own int8 matrix; the embedding keeps the float one for its lookups."""
    if getattr(model, "has_lm_head", False):
        model.lm_head = Int8Linear(model.lm_head)


def quantize_layers(layers: nn.ModuleList, method: str, int4_group: int | None = None) -> None:
    """Replace every nn.Linear inside `layers` by its quantized form, in place; `int4_group` caps the
    int4 group size."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    for module in list(layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                quantized = Int8Linear(child) if method == "int8" else Int4Linear.from_linear(child, int4_group)
                setattr(module, name, quantized)
