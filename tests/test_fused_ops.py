"""The fused CPU kernels of a bf16 layer (kernels/fused_ops.c) against the PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetserve.model.attention import allocate_kv_cache, kv_cache_shape, write_kv
from hetserve.model.cpu_kernels import (rms_norm, rms_norm_supported, rope_store, rope_store_supported, silu_mul,
                                        silu_mul_supported)
from hetserve.model.llama import RMSNorm, Rotation

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(not rms_norm_supported(torch.zeros(1, 8, dtype=BF16), torch.zeros(8, dtype=BF16)),
                                reason="no C compiler: the fused kernels are not built")


@pytest.mark.parametrize("tokens", [1, 7, 200])  # 200 x 576 runs the parallel loop
def test_rms_norm_and_residual_add_match_pytorch(tokens):
    torch.manual_seed(tokens)
    norm = RMSNorm(576, 1e-5).to(BF16)
    norm.weight.copy_(torch.rand(576) + 0.5)
    x, delta = (torch.randn(tokens, 576).to(BF16) for _ in range(2))
    normed, total = rms_norm(x, norm.weight, norm.eps)
    assert total is None
    # Only the order of the fp32 sum of squares differs: at most one bf16 step apart.
    torch.testing.assert_close(normed, norm._normalize(x), rtol=2 ** -7, atol=0)
    normed, total = rms_norm(x, norm.weight, norm.eps, delta)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, norm._normalize(x + delta), rtol=2 ** -7, atol=0)
    total_via_module, normed_via_module = norm.add_and_norm(x, delta)
    assert torch.equal(total_via_module, total) and torch.equal(normed_via_module, normed)


@pytest.mark.parametrize("tokens", [1, 50])  # 50 x 1536 runs the parallel loop
def test_silu_mul_matches_pytorch_up_to_the_last_bit_of_exp(tokens):
    torch.manual_seed(tokens)
    gate_up = (torch.randn(tokens, 2 * 1536) * 4).to(BF16)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = silu_mul(gate_up)
    # expf may differ from PyTorch's exp in the last fp32 bit: a rare silu moves by one bf16 step, and
    # its product with up by at most about two.
    torch.testing.assert_close(out, expected, rtol=2 ** -6, atol=0)
    assert (out != expected).float().mean() < 0.01
    assert not silu_mul_supported(gate_up.float())


def test_rope_store_rotates_and_writes_the_cache_as_the_pytorch_path_does():
    torch.manual_seed(0)
    tokens, heads, kv_heads, head_dim, block_size = 5, 6, 2, 64, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(BF16)
    angles = torch.rand(tokens, head_dim // 2) * 100
    rotation = Rotation(torch.cat([angles.cos()] * 2, dim=-1).to(BF16), torch.cat([angles.sin()] * 2, dim=-1).to(BF16))
    slots = torch.tensor([13, 2, 7, 8, 31])
    shape = kv_cache_shape(8, block_size, kv_heads, head_dim)
    expected_cache, cache = allocate_kv_cache(shape, BF16, torch.device("cpu")), allocate_kv_cache(shape, BF16, torch.device("cpu"))
    assert rope_store_supported(qkv, cache)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = (rotation.apply(t.reshape(tokens, -1, head_dim)) for t in (q, k))
    v = v.reshape(tokens, kv_heads, head_dim)
    write_kv(expected_cache, k, v, slots)

    rope_store(qkv, rotation.cos, rotation.sin, slots, cache, heads)
    assert torch.equal(qkv, torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=-1))
    assert all(torch.equal(a, b) for a, b in zip(cache, expected_cache))


def test_quantized_caches_and_other_dtypes_keep_the_pytorch_path():
    shape = kv_cache_shape(2, 4, 2, 64)
    qkv = torch.zeros(3, 10 * 64, dtype=BF16)
    assert not rope_store_supported(qkv, allocate_kv_cache(shape, torch.int8, torch.device("cpu")))
    assert not rope_store_supported(qkv.float(), allocate_kv_cache(shape, torch.float32, torch.device("cpu")))
    assert not rms_norm_supported(torch.zeros(1, 8), torch.zeros(8))
    x, weight = torch.zeros(2, 8, dtype=BF16), torch.zeros(8, dtype=BF16)
    assert rms_norm_supported(x, weight, x) and not rms_norm_supported(x, weight, x.float())
    assert not rms_norm_supported(x, weight, x[:1])
