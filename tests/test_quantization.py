"""Weight-only int8 / int4 quantization: the quantized matmuls approximate the float ones, and the
packaged model keeps predicting what the unquantized one predicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetserve import LLM, SamplingParams
from hetserve.model.quantization import (Int4Linear, Int8Linear, int4_dequantize, int4_group_size, int4_quantize,
                                          quantize_layers)

TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river. Over "
        "the centuries, merchants built warehouses along the water, and the village grew into a busy "
        "port that traded wool, grain and timber with towns across the sea.")


def relative_error(quantized: nn.Module, linear: nn.Linear, x: torch.Tensor) -> float:
    expected = linear(x).float()
    return ((quantized(x).float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_matmuls_approximate_the_float_ones(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(576, 384, bias=False).to(dtype)
    x = torch.randn(5, 576, dtype=dtype)
    assert relative_error(Int8Linear(linear), linear, x) < 0.02
    assert relative_error(Int4Linear.from_linear(linear), linear, x) < 0.15
    with_bias = nn.Linear(256, 64, bias=True).to(dtype)
    assert relative_error(Int8Linear(with_bias), with_bias, torch.randn(3, 256, dtype=dtype)) < 0.02


def test_packed_int4_kernel_computes_with_the_dequantized_weights():
    torch.manual_seed(1)
    weight = torch.randn(96, 256)
    values, scales_and_zeros = int4_quantize(weight, 128)  # what Int4Linear picks for 256 inputs
    assert values.min() >= 0 and values.max() <= 15
    linear = nn.Linear(256, 96, bias=False)
    linear.weight.data.copy_(weight)
    x = torch.randn(4, 256)
    expected = x @ int4_dequantize(values, scales_and_zeros, 128).T
    torch.testing.assert_close(Int4Linear.from_linear(linear)(x), expected, rtol=1e-4, atol=1e-4)
    # Dequantized weights are within half a step of the originals.
    steps = scales_and_zeros[..., 0].transpose(0, 1).repeat_interleave(128, dim=1)
    assert ((int4_dequantize(values, scales_and_zeros, 128) - weight).abs() <= steps / 2 + 1e-5).all()


@pytest.mark.parametrize("in_features, group", [(576, 64), (1536, 128), (96, 32)])
def test_int4_groups_are_128_where_the_input_allows(in_features, group):
    assert int4_group_size(in_features) == group


def test_int4_rejects_an_input_no_group_divides():
    with pytest.raises(ValueError, match="divisible by 32"):
        int4_group_size(100)
    with pytest.raises(ValueError, match="must be one of int8, int4"):
        quantize_layers(nn.ModuleList([nn.Linear(64, 64)]), "int3")


def top1_predictions(llm: LLM) -> list[int]:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    entries = llm.generate(TEXT, params)[0].prompt_logprobs[1:]
    return [entry.top[0][0] for entry in entries]


@pytest.mark.slow
def test_quantized_smollm2_predicts_what_bf16_predicts():
    predictions = {q: top1_predictions(LLM(dtype="bfloat16", quantization=q)) for q in (None, "int8", "int4")}
    reference = predictions[None]
    agreement = {q: sum(a == b for a, b in zip(reference, p)) / len(reference) for q, p in predictions.items()}
    assert len(reference) > 40
    assert agreement["int8"] >= 0.95, agreement
    # The GGUF holds Q4_1 blocks of 32: int4 groups of 32 keep them, so int4 is as close as int8.
    assert agreement["int4"] >= 0.95, agreement
