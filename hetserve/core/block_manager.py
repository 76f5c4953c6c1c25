"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

Every block is in exactly one state:
- used: reference count > 0 (in some request's block table);
- cached: count 0 but holding the KV of a known prefix (its hash is registered), reusable by a
  later request with the same prefix until evicted;
- free: count 0, no content.
Cached and free blocks together form the eviction queue, least recently freed first; allocation
takes from its head, so a cached block survives as long as possible.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from hetserve.core.request import Request


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of a full block, chained to its parent's so equal blocks at different prefixes differ.

    sha256 rather than Python's hash(): the token ids come from users, and a crafted collision
    would serve one user's KV to another."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class BlockUsage:
    total: int
    used: int
    cached: int
    free: int

    @property
    def used_fraction(self) -> float:
        return self.used / self.total if self.total else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, num_sink_blocks: int = 0):
        """With `sliding_window` (StreamingLLM), a request keeps its first `num_sink_blocks` blocks and
        about `sliding_window` tokens after them; older blocks are dropped as it grows. Block tables
        then no longer map token i to entry i // block_size, so prefix caching must be off."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        if sliding_window is not None and enable_prefix_caching:
            raise ValueError("prefix caching does not work with a sliding window")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.num_sink_blocks = num_sink_blocks if sliding_window is not None else 0
        self._sink_originals: dict[str, list[int]] = {}
        self._sink_rewrites: list[tuple[int, int, int]] = []
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # OrderedDict as an O(1) doubly linked list: pop the head, unlink any block by id.
        self._evictable: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_evictable_blocks(self) -> int:
        """Blocks an allocation can take: free ones and cached ones not in use."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._evictable)

    def usage(self) -> BlockUsage:
        cached = sum(1 for b in self._evictable if self._block_hashes[b] is not None)
        free = len(self._evictable) - cached
        return BlockUsage(self.num_blocks, self.num_blocks - len(self._evictable), cached, free)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> tuple[list[int], int]:
        """Blocks already holding this request's longest cached prefix, and its token count.

        At least one token is always left to compute: the model must run on the last token to
        produce the next one."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        blocks = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    # -- changes -------------------------------------------------------------------------------

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give `request` room for `num_new_tokens` more tokens after its computed ones.

        `cached_blocks` (from find_cached_prefix, for a request with no blocks yet) are shared, not
        copied. All or nothing: returns False and changes nothing when there is not enough room."""
        if self.sliding_window is not None and not self._slide(request, num_new_tokens):
            return False
        table = self._tables.get(request.request_id)
        num_held = len(table) if table is not None else 0
        num_cached_tokens = len(cached_blocks) * self.block_size
        total_tokens = max(request.num_computed_tokens - request.cache_offset, num_cached_tokens) + num_new_tokens
        num_new_blocks = self.blocks_needed(total_tokens) - num_held - len(cached_blocks)
        reclaimed = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        if max(num_new_blocks, 0) + reclaimed > len(self._evictable):
            return False
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        if table is None:
            table = self._tables[request.request_id] = []
            self._num_hashed[request.request_id] = len(cached_blocks)
        # Extended in place: a decode step usually adds nothing, and copying the table every step
        # would cost time growing with the context.
        table.extend(cached_blocks)
        table.extend(self._take_block() for _ in range(num_new_blocks))
        self._register_full_blocks(request, total_tokens)
        return True

    def free(self, request: Request) -> None:
        """Release a finished or preempted request's blocks. Its full blocks stay cached."""
        table = self._tables.pop(request.request_id, [])
        self._num_hashed.pop(request.request_id, None)
        self._release(self._sink_originals.pop(request.request_id, []) + table)

    def _release(self, blocks: list[int]) -> None:
        # Tail blocks first into the queue: they are the least likely to be shared, so they are
        # the first evicted. Blocks holding nothing reusable go to the very front.
        for block in reversed(blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._evictable[block] = None
                if self._block_hashes[block] is None:
                    self._evictable.move_to_end(block, last=False)

    def take_sink_rewrites(self) -> list[tuple[int, int, int]]:
        """(original sink block, its copy in the block table, tokens dropped before the window) for every
        request whose window slid since the last call: the worker rewrites each copy from the original
        with its keys rotated forward by that many positions, so the sinks keep their distance to the
        window as StreamingLLM's in-cache positions have it."""
        rewrites, self._sink_rewrites = self._sink_rewrites, []
        return rewrites

    def _slide(self, request: Request, num_new_tokens: int) -> bool:
        """Drop the blocks that fall out of the window once `num_new_tokens` more are computed. The first
        time, the sink blocks move aside and fresh blocks take their place in the table, for the re-rotated
        copies. False, changing nothing, when there is no block for those copies."""
        table = self._tables.get(request.request_id)
        sinks, bs = self.num_sink_blocks, self.block_size
        num_in_window = request.num_computed_tokens - request.cache_offset - sinks * bs
        if table is None or num_in_window <= 0:
            return True
        num_drop = min(max(0, num_in_window + num_new_tokens - self.sliding_window) // bs, num_in_window // bs)
        first = sinks > 0 and request.request_id not in self._sink_originals
        if num_drop == 0 or (first and sinks > len(self._evictable) + num_drop):
            return num_drop == 0
        dropped = table[sinks:sinks + num_drop]
        del table[sinks:sinks + num_drop]
        self._release(dropped)
        request.cache_offset += num_drop * bs
        if sinks:
            if first:
                self._sink_originals[request.request_id] = table[:sinks]
                table[:sinks] = [self._take_block() for _ in range(sinks)]
            originals = self._sink_originals[request.request_id]
            self._sink_rewrites.extend((o, c, request.cache_offset) for o, c in zip(originals, table[:sinks]))
        return True

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            self._block_hashes[block] = None
        self._cached.clear()

    # -- internals -----------------------------------------------------------------------------

    def _take_block(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        block_hash = self._block_hashes[block]
        if block_hash is not None:
            if self._cached.get(block_hash) == block:
                del self._cached[block_hash]
            self._block_hashes[block] = None
        self._ref_counts[block] = 1
        return block

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids(i * bs, (i + 1) * bs)))

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Make blocks whose tokens are all known reusable by other requests.

        Safe before the KV is written: a request admitted in this same step may hit these blocks,
        and reads them correctly because every layer writes the whole step's KV before attending."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_hashed[request.request_id]
        if num_full <= start:
            return
        self._extend_hashes(request, num_full)
        table = self._tables[request.request_id]
        for i in range(start, num_full):
            block, block_hash = table[i], request.block_hashes[i]
            if self._block_hashes[block] is None and block_hash not in self._cached:
                self._cached[block_hash] = block
                self._block_hashes[block] = block_hash
        self._num_hashed[request.request_id] = num_full
