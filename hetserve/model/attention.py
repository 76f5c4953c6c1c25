"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

The batch is laid out decode tokens first (one query per sequence, attended in one batched call,
no Python loop), then prefill chunks (several queries per sequence, one call each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetserve.model.cpu_kernels import paged_decode, paged_decode_supported


@dataclass
class PrefillChunk:
    query_start: int
    """Row of the chunk's first token in the flat batch."""
    num_queries: int
    start_pos: int
    """Tokens of this sequence already in the cache before the chunk."""
    block_table: torch.Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """Per token: block_id * block_size + offset, where its K and V are written."""
    num_decodes: int
    decode_block_tables: torch.Tensor
    """[num_decodes, max_blocks], padded with block 0 (masked out)."""
    decode_context_lens: torch.Tensor
    prefills: list[PrefillChunk]
    decode_mask: torch.Tensor | None = None

    def decode_attention_mask(self, block_size: int) -> torch.Tensor:
        """[num_decodes, 1, 1, max_blocks * block_size]: True where a key position is real.
        Built once per step and shared by all layers."""
        if self.decode_mask is None:
            length = self.decode_block_tables.shape[1] * block_size
            positions = torch.arange(length, device=self.decode_context_lens.device)
            mask = positions[None, :] < self.decode_context_lens[:, None]
            self.decode_mask = mask[:, None, None, :]
        return self.decode_mask


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Layout of one layer's K (or V) cache: head-major inside a block, so that one head's keys
    for a block are a single contiguous run that the decode kernel streams through."""
    return (num_blocks, num_kv_heads, block_size, head_dim)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values ([T, kv_heads, head_dim]) in their slots."""
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, kv_heads, max_blocks * block_size, head_dim]."""
    batch, max_blocks = block_tables.shape
    _, num_kv_heads, block_size, head_dim = cache.shape
    gathered = cache[block_tables].transpose(1, 2)
    return gathered.reshape(batch, num_kv_heads, max_blocks * block_size, head_dim)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] -> [B, heads, head_dim], one query per sequence."""
    if paged_decode_supported(q, k_cache):
        return paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    return gathered_decode_attention(q, k_cache, v_cache, meta, scale)


def gathered_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decode attention with tensor ops only: gather each sequence's blocks, padded, then attend.

    The query heads that share a KV head are laid along the query-length axis, so grouped-query
    attention reads each KV head once instead of repeating it per query head."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    keys = _gather_context(k_cache, meta.decode_block_tables)
    values = _gather_context(v_cache, meta.decode_block_tables)
    mask = meta.decode_attention_mask(k_cache.shape[2])
    out = F.scaled_dot_product_attention(
        q.view(batch, num_kv_heads, group, head_dim), keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """Causal attention of one chunk's queries ([n, heads, head_dim]) over the sequence so far.

    A chunk that starts the sequence attends to its own keys; a later chunk (chunked prefill, or
    after a prefix-cache hit) reads the earlier ones from the cache."""
    n = chunk.num_queries
    queries = q.transpose(0, 1).unsqueeze(0)
    if chunk.start_pos == 0:
        keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        context = chunk.start_pos + n
        num_blocks = -(-context // k_cache.shape[2])
        table = chunk.block_table[None, :num_blocks]
        keys = _gather_context(k_cache, table)[:, :, :context]
        values = _gather_context(v_cache, table)[:, :, :context]
        key_pos = torch.arange(context, device=q.device)
        query_pos = torch.arange(chunk.start_pos, context, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V, then attend every token of the flat batch. [T, heads, head_dim]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        out[:d] = decode_attention(q[:d], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.num_queries)
        out[rows] = prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
    return out
