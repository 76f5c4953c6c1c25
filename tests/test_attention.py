"""The CPU paged-decode kernel and the tensor-op fallback agree with plain attention, for caches in the
model dtype and quantized ones (int8 with scales, fp8)."""

from __future__ import annotations

import math

import pytest
import torch

import hetserve.model.attention as attention
from hetserve.model.attention import (
    AttentionMetadata,
    PrefillChunk,
    allocate_kv_cache,
    attend,
    decode_attention,
    decode_kv,
    encode_kv,
    gathered_decode_attention,
    kv_cache_shape,
    prefill_attention,
    rewrite_block,
    round_trip_kv,
    write_kv,
)
from hetserve.model.cpu_kernels import paged_decode_supported

FP8 = torch.float8_e4m3fn


def reference_attention(q, keys, values, scale):
    """q [H, D], keys/values [L, H_kv, D] -> [H, D], repeating KV heads for their query groups."""
    group = q.shape[0] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.float(), keys) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), values)


def random_paged_batch(dtype, lengths, num_heads=6, num_kv_heads=2, head_dim=64, block_size=4, storage=None):
    """Sequences scattered over shuffled blocks, with the KV written through write_kv (into a cache
    of `storage` dtype, default `dtype`). contexts holds each sequence's keys and values as the
    cache returns them. Unwritten slots hold NaN (for int8: NaN scales)."""
    torch.manual_seed(0)
    storage = storage or dtype
    blocks_per_seq = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    kv_cache = allocate_kv_cache(kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim), storage,
                                 torch.device("cpu"))
    for tensor in kv_cache:
        if tensor.dtype.is_floating_point:
            tensor.fill_(float("nan"))
    order = torch.randperm(num_blocks).tolist()
    tables, contexts, start = [], [], 0
    for n, count in zip(lengths, blocks_per_seq):
        table = order[start:start + count]
        start += count
        keys = torch.randn(n, num_kv_heads, head_dim, dtype=dtype)
        values = torch.randn(n, num_kv_heads, head_dim, dtype=dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv(kv_cache, keys, values, slots)
        tables.append(table)
        contexts.append((round_trip_kv(keys, storage), round_trip_kv(values, storage)))
    width = max(blocks_per_seq)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lengths),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_context_lens=torch.tensor(lengths), prefills=[])
    q = torch.randn(len(lengths), num_heads, head_dim, dtype=dtype)
    return q, kv_cache, meta, contexts


@pytest.mark.parametrize("dtype,storage,atol", [
    (torch.float32, None, 1e-5), (torch.bfloat16, None, 2e-2),
    (torch.float32, torch.int8, 1e-5), (torch.bfloat16, torch.int8, 2e-2),
    (torch.float32, FP8, 1e-5), (torch.bfloat16, FP8, 2e-2),
])
@pytest.mark.parametrize("path", ["kernel", "gathered"])
def test_decode_attention_matches_reference(dtype, storage, atol, path):
    lengths = [1, 5, 17, 64, 3]
    q, kv_cache, meta, contexts = random_paged_batch(dtype, lengths, storage=storage)
    # NaN fills the slots nobody wrote: the kernel must never read them. The tensor-op path reads
    # padding, so it needs the zero-initialised cache the worker allocates.
    if path == "kernel":
        if not paged_decode_supported(q, kv_cache[0]):
            pytest.skip("CPU kernel unavailable (no C compiler or HETSERVE_CPU_KERNELS=0)")
        out = decode_attention(q, kv_cache, meta, 0.125)
    else:
        kv_cache = tuple(t.float().nan_to_num(0.0).to(t.dtype) for t in kv_cache)
        out = gathered_decode_attention(q, kv_cache, meta, 0.125)
    for i, (keys, values) in enumerate(contexts):
        expected = reference_attention(q[i], keys, values, 0.125)
        assert torch.allclose(out[i].float(), expected, atol=atol), (i, (out[i].float() - expected).abs().max())


@pytest.mark.parametrize("storage", [torch.float32, torch.int8])
def test_kernel_result_does_not_depend_on_the_batch(storage):
    q, kv_cache, meta, _ = random_paged_batch(torch.float32, [7, 40, 13], storage=storage)
    if not paged_decode_supported(q, kv_cache[0]):
        pytest.skip("CPU kernel unavailable")
    together = decode_attention(q, kv_cache, meta, 0.125)
    alone = AttentionMetadata(meta.slot_mapping, 1, meta.decode_block_tables[1:2, :10],
                              meta.decode_context_lens[1:2], [])
    assert torch.equal(decode_attention(q[1:2], kv_cache, alone, 0.125)[0], together[1])


def test_int8_round_trip_is_within_half_a_step_of_each_vector():
    torch.manual_seed(0)
    # Vectors of very different sizes: each gets its own scale.
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 3, 50)[:, None, None]
    stored, scales = encode_kv(x, torch.int8)
    assert stored.dtype == torch.int8 and scales.shape == (50, 3) and stored.abs().max() == 127
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    error = (decode_kv(stored, scales, torch.float32) - x).abs()
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert decode_kv(*encode_kv(torch.zeros(2, 64), torch.int8), torch.float32).eq(0).all()


def test_fp8_round_trip_keeps_three_mantissa_bits_and_saturates():
    x = torch.randn(1000) * 10
    error = (round_trip_kv(x, FP8) - x).abs()
    assert (error <= x.abs() * 2**-4 + 2**-9).all()
    assert round_trip_kv(torch.tensor([1e4, -1e4]), FP8).tolist() == [448.0, -448.0]


@pytest.mark.parametrize("storage", [torch.float32, torch.int8, FP8])
def test_a_prompt_gives_the_same_attention_in_one_chunk_or_two(storage):
    """The first chunk attends to its keys as the cache returns them, so splitting changes nothing."""
    torch.manual_seed(0)
    n, split, heads, kv_heads, dim, block_size = 11, 6, 4, 2, 64, 4
    q = torch.randn(n, heads, dim)
    k, v = torch.randn(2, n, kv_heads, dim)
    kv_cache = allocate_kv_cache(kv_cache_shape(4, block_size, kv_heads, dim), storage, torch.device("cpu"))
    table = torch.tensor([2, 0, 3])
    write_kv(kv_cache, k, v, table[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size)
    whole = prefill_attention(q, k, v, kv_cache, PrefillChunk(0, n, 0, table), 0.125)
    first = prefill_attention(q[:split], k[:split], v[:split], kv_cache, PrefillChunk(0, split, 0, table), 0.125)
    rest = prefill_attention(q[split:], k[split:], v[split:], kv_cache, PrefillChunk(split, n - split, split, table), 0.125)
    torch.testing.assert_close(torch.cat([first, rest]), whole, atol=1e-5, rtol=1e-5)


def test_rewrite_block_requantizes_the_transformed_keys_and_copies_the_values():
    torch.manual_seed(0)
    kv_cache = allocate_kv_cache(kv_cache_shape(3, 4, 2, 64), torch.int8, torch.device("cpu"))
    k, v = torch.randn(2, 4, 2, 64)
    write_kv(kv_cache, k, v, torch.arange(4) + 4)  # block 1
    rewrite_block(kv_cache, 1, 2, torch.float32, lambda keys: keys * 3)
    keys = decode_kv(kv_cache[0][2], kv_cache[2][2], torch.float32)
    original = decode_kv(kv_cache[0][1], kv_cache[2][1], torch.float32)
    torch.testing.assert_close(keys, original * 3, atol=3 * original.abs().max() / 127, rtol=0)
    assert torch.equal(kv_cache[1][2], kv_cache[1][1]) and torch.equal(kv_cache[3][2], kv_cache[3][1])


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("storage", [torch.int8, FP8])
def test_quantized_kernel_for_head_sizes_off_the_vector_path(dtype, atol, storage):
    """A head size that is not a multiple of 16 runs the portable C loop, which dequantizes too."""
    q, kv_cache, meta, contexts = random_paged_batch(dtype, [3, 21], head_dim=40, storage=storage)
    if not paged_decode_supported(q, kv_cache[0]):
        pytest.skip("CPU kernel unavailable")
    out = decode_attention(q, kv_cache, meta, 0.125)
    for i, (keys, values) in enumerate(contexts):
        torch.testing.assert_close(out[i].float(), reference_attention(q[i], keys, values, 0.125), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_widens_every_fp8_value_as_torch_does(dtype):
    """Every e4m3 bit pattern but NaN (never stored: writes saturate) as values of one-token
    sequences, whose attention output is their value exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = torch.cat([codes[(codes & 0x7F) != 0x7F], torch.zeros(2, dtype=torch.uint8)])
    values = codes.view(FP8).reshape(4, 1, 1, 64)  # 4 blocks of 1 slot, 1 KV head
    kv_cache = (torch.zeros_like(values), values)
    q = torch.randn(4, 1, 64, dtype=dtype)
    if not paged_decode_supported(q, kv_cache[0]):
        pytest.skip("CPU kernel unavailable")
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), 4, torch.arange(4)[:, None], torch.ones(4, dtype=torch.long), [])
    assert torch.equal(decode_attention(q, kv_cache, meta, 1.0).float(), values.reshape(4, 1, 64).float())


def mixed_step(dtype):
    """One decode (9 tokens of context), a chunk starting its prompt (7 tokens) and a later chunk
    (6 tokens after 5 in the cache), their K/V already stored as the model stores them."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size = 4, 2, 64, 4
    kv_cache = allocate_kv_cache(kv_cache_shape(12, block_size, kv_heads, dim), dtype, torch.device("cpu"))
    tables = [torch.tensor([5, 1, 9]), torch.tensor([0, 7]), torch.tensor([3, 10, 2])]
    keys, values = [], []
    for table, n in zip(tables, [9, 7, 11]):
        k, v = torch.randn(2, n, kv_heads, dim, dtype=dtype)
        write_kv(kv_cache, k, v, table[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size)
        keys.append(k)
        values.append(v)
    # The step's rows: the decode's query, the first chunk's 7, the second chunk's last 6.
    k_step = torch.cat([keys[0][8:], keys[1], keys[2][5:]])
    v_step = torch.cat([values[0][8:], values[1], values[2][5:]])
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=1,
                             decode_block_tables=tables[0][None], decode_context_lens=torch.tensor([9]),
                             prefills=[PrefillChunk(1, 7, 0, tables[1]), PrefillChunk(8, 6, 5, tables[2])])
    q = torch.randn(14, heads, dim, dtype=dtype)
    return q, k_step, v_step, kv_cache, meta


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_short_prefill_chunks_run_on_the_decode_kernel_as_sdpa_would_attend(dtype, atol, monkeypatch):
    q, k, v, kv_cache, meta = mixed_step(dtype)
    if not paged_decode_supported(q, kv_cache[0]):
        pytest.skip("CPU kernel unavailable")
    tables, lengths = meta.token_block_tables()
    assert lengths.tolist() == [9, *range(1, 8), *range(6, 12)]
    assert tables.shape == (14, 3) and tables[1:8, :2].eq(torch.tensor([0, 7])).all()
    on_kernel = attend(q, k, v, kv_cache, meta, 0.125)
    # Past the context limit, every chunk goes through SDPA.
    monkeypatch.setattr(attention, "PAGED_PREFILL_MAX_CONTEXT", 10)
    _, _, _, _, meta = mixed_step(dtype)
    assert meta.token_block_tables() is None
    on_sdpa = attend(q, k, v, kv_cache, meta, 0.125)
    torch.testing.assert_close(on_kernel.float(), on_sdpa.float(), atol=atol, rtol=0)
    # A prefill token attends exactly as decoding it would.
    alone = AttentionMetadata(meta.slot_mapping, 1, meta.prefills[1].block_table[None],
                              torch.tensor([11]), [])
    assert torch.equal(decode_attention(q[13:14], kv_cache, alone, 0.125)[0], on_kernel[13])
