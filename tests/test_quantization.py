"""Weight-only int8 / int4 quantization: the quantized matmuls approximate the float ones, and the
packaged model keeps predicting what the unquantized one predicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetserve import LLM, SamplingParams
from hetserve.model.cpu_kernels import BYTE_MAX_ROWS, byte_linear_supported, to_chunk_order
from hetserve.model.llama import LlamaForCausalLM
from hetserve.model.loader import load_spec
from hetserve.model.quantization import (Int4Linear, Int8Linear, int4_dequantize, int4_group_size,
                                          int4_quantize_groups, int4_scales_and_zeros, quantize_layers,
                                          quantize_lm_head, resolve_quantization)
from tests.tiny_models import make_gguf_model, make_hf_model

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
    values, scales, mins = int4_quantize_groups(weight, 128)  # what Int4Linear picks for 256 inputs
    scales_and_zeros = int4_scales_and_zeros(scales, mins)
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


needs_byte_kernels = pytest.mark.skipif(
    not byte_linear_supported(torch.device("cpu"), torch.bfloat16, 64),
    reason="the byte dot-product kernels need a CPU with AVX512-VNNI and a C compiler")


def test_chunk_order_interleaves_the_two_blocks_of_each_chunk_by_4_bytes():
    order = to_chunk_order(torch.arange(128).reshape(1, 128))[0].tolist()
    lane = [p // 4 for p in range(64)]
    expected = [32 * (lane[p] % 2) + 4 * (lane[p] // 2) + p % 4 for p in range(64)]
    assert order == expected + [64 + e for e in expected]


def exactly_quantizable_rows(rows: int, columns: int) -> torch.Tensor:
    """bf16 rows of integers with 127 in every block of 32: their int8 rounding is exact."""
    x = torch.randint(-126, 127, (rows, columns)).float()
    x[:, ::32] = 127
    return x.bfloat16()


def int4_reference_weight(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The weights the byte kernels compute with: scales and minimums in fp16."""
    values, scales, mins = int4_quantize_groups(weight.float(), group)
    rows, columns = weight.shape
    groups = values.reshape(rows, -1, group) * scales.half().float()[..., None] + mins.half().float()[..., None]
    return groups.reshape(rows, columns)


BYTE_PRODUCT_ROWS = 6
"""Up to this many rows of x the byte kernels multiply int8-rounded x by the stored values; from one
more (quantized_linear.c's DEQUANTIZED_MIN_ROWS) they multiply bf16 x by the weights dequantized to
bf16, as past BYTE_MAX_ROWS oneDNN does."""


@needs_byte_kernels
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 5, 8, 13, 64, BYTE_MAX_ROWS + 1])
def test_int4_byte_kernel_computes_with_the_stored_weights(group, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(256, 100, bias=True).bfloat16()
    quantized = Int4Linear.from_linear(linear, group)
    assert quantized.byte_kernel and quantized.group_size == group
    assert_computes_with(quantized, int4_reference_weight(linear.weight, group), linear.bias, rows)


def assert_computes_with(quantized: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> None:
    x = exactly_quantizable_rows(rows, weight.shape[1])
    if rows > BYTE_PRODUCT_ROWS:
        torch.testing.assert_close(quantized(x), F.linear(x, weight.bfloat16(), bias))
        return
    # Exact int8 activations: only the bf16 rounding of the output remains.
    expected = x.float() @ weight.T + (0 if bias is None else bias.float())
    torch.testing.assert_close(quantized(x).float(), expected, rtol=1e-2, atol=0.1)


@needs_byte_kernels
@pytest.mark.parametrize("rows", [1, 6, 7, 40, BYTE_MAX_ROWS + 1])
def test_int8_byte_kernel_computes_with_the_stored_weights(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(192, 70, bias=False).bfloat16()
    quantized = Int8Linear(linear)
    assert quantized.byte_kernel
    weight = linear.weight.float()
    scales = weight.abs().amax(dim=1) / 127
    expected_weight = torch.round(weight / scales[:, None]) * scales[:, None]
    assert_computes_with(quantized, expected_weight, None, rows)


@needs_byte_kernels
@pytest.mark.parametrize("make", [lambda linear: Int4Linear.from_linear(linear, 32), Int8Linear], ids=["int4", "int8"])
def test_dequantized_tiles_give_a_row_the_same_result_in_any_batch_they_take(make):
    torch.manual_seed(5)
    linear = nn.Linear(320, 200, bias=True).bfloat16()  # 200 rows of W: tiles with a remainder
    quantized = make(linear)
    x = torch.randn(BYTE_MAX_ROWS, 320).bfloat16()
    batch = quantized(x)
    for rows in (BYTE_PRODUCT_ROWS + 1, 10, 63, BYTE_MAX_ROWS - 1):
        start = BYTE_MAX_ROWS - rows
        assert torch.equal(quantized(x[start:]), batch[start:]), rows


@needs_byte_kernels
def test_byte_kernels_round_activations_by_block_and_give_a_row_the_same_result_in_any_batch():
    torch.manual_seed(3)
    linear = nn.Linear(576, 300, bias=False).bfloat16()
    # Activations with outlier channels, as LLMs have them: blocks of 32 keep the others' precision.
    x = (torch.randn(BYTE_PRODUCT_ROWS, 576) * torch.where(torch.rand(576) < 0.02, 50.0, 1.0)).bfloat16()
    for quantized, limit in ((Int4Linear.from_linear(linear, 32), 0.15), (Int8Linear(linear), 0.02)):
        batch = quantized(x)
        assert relative_error(quantized, linear, x) < limit
        for row in range(BYTE_PRODUCT_ROWS):
            assert torch.equal(quantized(x[row:row + 1]), batch[row:row + 1])


def test_a_quantized_lm_head_is_int8_and_leaves_the_tied_embedding_alone(tmp_path):
    spec = load_spec(make_hf_model(tmp_path, tie_word_embeddings=True, vocab_size=300))
    model = LlamaForCausalLM(spec).bfloat16()
    embedding = model.embed_tokens.weight.clone()
    head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False).bfloat16()
    head.weight.data.copy_(embedding)
    quantize_lm_head(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.embed_tokens.weight, embedding)
    assert relative_error(model.lm_head, head, torch.randn(3, spec.hidden_size).bfloat16()) < 0.02


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


@pytest.mark.parametrize("tensor_type, expected", [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q8_0", None), ("F16", None)])
def test_auto_keeps_a_4bit_gguf_in_int4_where_the_byte_kernels_run(tmp_path, tensor_type, expected):
    path = make_gguf_model(tmp_path / "model.gguf", hidden_size=128, intermediate_size=256, tensor_type=tensor_type)
    spec = load_spec(path)
    cpu = torch.device("cpu")
    if not byte_linear_supported(cpu, torch.bfloat16, 128):
        expected = None  # no AVX512-VNNI here: PyTorch's int4 kernels are no faster than bf16
    assert resolve_quantization("auto", path, spec, cpu, torch.bfloat16, keeps_float_layers=False) == expected
    # float32 models, streamed or int4-checkpoint layers, and explicit choices are left as they are
    assert resolve_quantization("auto", path, spec, cpu, torch.float32, keeps_float_layers=False) is None
    assert resolve_quantization("auto", path, spec, cpu, torch.bfloat16, keeps_float_layers=True) is None
    for explicit in (None, "int8", "int4"):
        assert resolve_quantization(explicit, path, spec, cpu, torch.bfloat16, keeps_float_layers=False) == explicit


def test_auto_leaves_a_safetensors_model_in_float(tmp_path):
    path = make_hf_model(tmp_path, hidden_size=128, intermediate_size=256)
    assert resolve_quantization("auto", path, load_spec(path), torch.device("cpu"), torch.bfloat16, False) is None


def test_none_is_no_quantization_and_the_default_is_auto():
    from hetserve.config import ModelConfig

    assert ModelConfig().quantization == "auto"
    assert ModelConfig(quantization="none").quantization is None
    with pytest.raises(ValueError, match="auto, none, int8 or int4"):
        ModelConfig(quantization="int3")
