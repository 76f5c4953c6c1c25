"""The CPU kernel for decode-sized bf16 linear layers (kernels/linear.c): F.linear's results up to
fp32 summation order, and a row's result independent of the other rows in the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetserve.model.cpu_kernels import small_linear, small_linear_supported
from hetserve.model.llama import linear

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(not small_linear_supported(torch.zeros(1, 32, dtype=BF16), torch.zeros(1, 32, dtype=BF16)),
                                reason="no C compiler or no AVX512_BF16 on this CPU: the kernel is not built")


@pytest.mark.parametrize("out_features, in_features", [(96, 64), (37, 100), (5, 1536), (130, 33)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 14, 32, 77, 256])  # past 2: the tiled path
def test_matches_float_reference(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator).to(BF16)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(BF16)
    bias = torch.randn(out_features, generator=generator).to(BF16)
    for b in (None, bias):
        expected = x.float() @ weight.float().T + (0 if b is None else b.float())
        got = small_linear(x, weight, b)
        assert got.dtype == BF16 and got.shape == (rows, out_features)
        # Products of bf16 values are exact in fp32: only the summation order and the final rounding
        # to bf16 (a relative 2^-8) differ from the fp32 reference.
        torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=1e-3)


def test_a_rows_result_does_not_depend_on_the_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 576, generator=generator).to(BF16)  # the few-rows path
    weight = torch.randn(1000, 576, generator=generator).to(BF16)
    batched = small_linear(x, weight, None)
    for i in range(2):
        assert torch.equal(small_linear(x[i:i + 1], weight, None), batched[i:i + 1])
        assert torch.equal(small_linear(x[:i + 1], weight, None), batched[:i + 1])


def test_on_the_tiled_path_a_rows_result_does_not_depend_on_its_neighbours():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 576, generator=generator).to(BF16)
    weight = torch.randn(1001, 576, generator=generator).to(BF16)  # a tail of 1 row past the blocks of 4
    bias = torch.randn(1001, generator=generator).to(BF16)
    batched = small_linear(x, weight, bias)
    # Every row in another slot of its block of 4, and in a batch of another size.
    for start, rows in ((1, 17), (2, 3), (3, 70)):
        assert torch.equal(small_linear(x[start:start + rows], weight, bias), batched[start:start + rows])


def test_model_linear_uses_it_for_decode_batches_only():
    weight = torch.randn(64, 32).to(BF16)
    assert small_linear_supported(torch.zeros(256, 32, dtype=BF16), weight)
    assert not small_linear_supported(torch.zeros(257, 32, dtype=BF16), weight)  # oneDNN's turn
    assert not small_linear_supported(torch.zeros(1, 32), weight.float())  # fp32 stays on PyTorch
    assert not small_linear_supported(torch.zeros(1, 1, 32, dtype=BF16), weight)
    assert not small_linear_supported(torch.zeros(1, 31, dtype=BF16), weight)  # F.linear raises the error
    assert not small_linear_supported(torch.zeros(1, 32, dtype=BF16), weight, torch.zeros(64))
    x = torch.randn(20, 32).to(BF16)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    torch.testing.assert_close(linear(x[:2], weight).float(), F.linear(x[:2], weight).float(), rtol=2 ** -7, atol=1e-3)
