"""The CPU paged-decode kernel and the tensor-op fallback agree with plain attention."""

from __future__ import annotations

import math

import pytest
import torch

from hetserve.model.attention import (
    AttentionMetadata,
    decode_attention,
    gathered_decode_attention,
    kv_cache_shape,
    write_kv,
)
from hetserve.model.cpu_kernels import paged_decode_supported


def reference_attention(q, keys, values, scale):
    """q [H, D], keys/values [L, H_kv, D] -> [H, D], repeating KV heads for their query groups."""
    group = q.shape[0] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.float(), keys) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), values)


def random_paged_batch(dtype, lengths, num_heads=6, num_kv_heads=2, head_dim=64, block_size=4):
    """Sequences scattered over shuffled blocks, with the KV written through write_kv."""
    torch.manual_seed(0)
    blocks_per_seq = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.full(kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    order = torch.randperm(num_blocks).tolist()
    tables, contexts, start = [], [], 0
    for n, count in zip(lengths, blocks_per_seq):
        table = order[start:start + count]
        start += count
        keys = torch.randn(n, num_kv_heads, head_dim, dtype=dtype)
        values = torch.randn(n, num_kv_heads, head_dim, dtype=dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv(k_cache, v_cache, keys, values, slots)
        tables.append(table)
        contexts.append((keys, values))
    width = max(blocks_per_seq)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lengths),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_context_lens=torch.tensor(lengths), prefills=[])
    q = torch.randn(len(lengths), num_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, meta, contexts


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("path", ["kernel", "gathered"])
def test_decode_attention_matches_reference(dtype, atol, path):
    lengths = [1, 5, 17, 64, 3]
    q, k_cache, v_cache, meta, contexts = random_paged_batch(dtype, lengths)
    # NaN fills the slots nobody wrote: the kernel must never read them. The tensor-op path reads
    # padding, so it needs the zero-initialised cache the worker allocates.
    if path == "kernel":
        if not paged_decode_supported(q, k_cache):
            pytest.skip("CPU kernel unavailable (no C compiler or HETSERVE_CPU_KERNELS=0)")
        out = decode_attention(q, k_cache, v_cache, meta, 0.125)
    else:
        k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
        out = gathered_decode_attention(q, k_cache, v_cache, meta, 0.125)
    for i, (keys, values) in enumerate(contexts):
        expected = reference_attention(q[i], keys, values, 0.125)
        assert torch.allclose(out[i].float(), expected, atol=atol), (i, (out[i].float() - expected).abs().max())


def test_kernel_result_does_not_depend_on_the_batch():
    q, k_cache, v_cache, meta, _ = random_paged_batch(torch.float32, [7, 40, 13])
    if not paged_decode_supported(q, k_cache):
        pytest.skip("CPU kernel unavailable")
    together = decode_attention(q, k_cache, v_cache, meta, 0.125)
    alone = AttentionMetadata(meta.slot_mapping, 1, meta.decode_block_tables[1:2, :10],
                              meta.decode_context_lens[1:2], [])
    assert torch.equal(decode_attention(q[1:2], k_cache, v_cache, alone, 0.125)[0], together[1])
