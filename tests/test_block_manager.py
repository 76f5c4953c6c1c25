"""BlockManager: block accounting, the prefix cache and its eviction order.

Unit tests observe the cache through `find_cached_prefix` and `usage()`; the property test also
reads the private bookkeeping (ref counts, eviction queue, hash map) to check its invariants."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hetserve.core.block_manager import BlockManager, BlockUsage, hash_block
from hetserve.core.request import Request
from hetserve.sampling_params import SamplingParams


def make_request(request_id: str, tokens, **sampling) -> Request:
    return Request(request_id, list(tokens), SamplingParams(**sampling))


def admit(bm: BlockManager, request: Request) -> list[int]:
    """Give a new request its whole prompt as the scheduler does (prefix hit first), mark it
    computed, and return its block table."""
    cached_blocks, num_cached = bm.find_cached_prefix(request)
    assert bm.allocate(request, request.num_tokens - num_cached, cached_blocks)
    request.num_computed_tokens = request.num_tokens
    return bm.block_table(request.request_id)


def cached_tokens(bm: BlockManager, tokens, **sampling) -> int:
    """How many leading tokens of a prompt the prefix cache would serve (changes nothing)."""
    return bm.find_cached_prefix(make_request("probe", tokens, **sampling))[1]


# -- accounting ------------------------------------------------------------------------------


def test_allocate_and_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    request = make_request("a", range(10))
    table = admit(bm, request)
    assert len(table) == 3 and len(set(table)) == 3
    assert bm.usage() == BlockUsage(total=8, used=3, cached=0, free=5)
    bm.free(request)
    # The two full blocks stay cached, the partial third one is plain free.
    assert bm.usage() == BlockUsage(total=8, used=0, cached=2, free=6)
    assert bm.block_table("a") == []


def test_decoding_takes_a_new_block_only_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=8, block_size=4)
    request = make_request("a", range(4))
    admit(bm, request)
    for token in range(8):
        request.output_token_ids.append(token)
        assert bm.allocate(request, 1)
        request.num_computed_tokens += 1
        assert len(bm.block_table("a")) == bm.blocks_needed(request.num_tokens)
    assert bm.usage().used == 3


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    admit(bm, make_request("a", range(12)))
    before = bm.usage()
    assert not bm.allocate(make_request("b", range(100, 108)), 8)
    assert bm.usage() == before
    assert bm.block_table("b") == []
    assert bm.allocate(make_request("c", range(100, 104)), 4)


def test_allocate_counts_reclaimed_cached_blocks_against_the_free_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    first = make_request("a", [1, 2, 3, 4, 5])
    admit(bm, first)
    bm.free(first)  # [1, 2] and [3, 4] stay cached
    admit(bm, make_request("c", [9]))
    assert bm.usage() == BlockUsage(total=4, used=1, cached=2, free=1)

    # Two cached blocks plus two new ones: 4 evictable blocks wanted, only 3 there.
    too_long = make_request("b", [1, 2, 3, 4, 6, 7, 8])
    cached_blocks, num_cached = bm.find_cached_prefix(too_long)
    assert num_cached == 4
    assert not bm.allocate(too_long, too_long.num_tokens - num_cached, cached_blocks)
    assert bm.usage() == BlockUsage(total=4, used=1, cached=2, free=1)
    assert cached_tokens(bm, [1, 2, 3, 4, 0]) == 4

    fits = make_request("d", [1, 2, 3, 4, 6])
    assert admit(bm, fits)[:2] == cached_blocks
    assert bm.usage() == BlockUsage(total=4, used=4, cached=0, free=0)


def test_a_shared_block_is_counted_once_and_freed_by_its_last_holder():
    bm = BlockManager(num_blocks=8, block_size=4)
    first, second = make_request("a", range(9)), make_request("b", [*range(8), 50, 51])
    first_table, second_table = admit(bm, first), admit(bm, second)
    assert second_table[:2] == first_table[:2] and second_table[2] != first_table[2]
    assert bm.usage().used == 4
    bm.free(first)
    assert bm.usage() == BlockUsage(total=8, used=3, cached=0, free=5)
    bm.free(second)
    assert bm.usage() == BlockUsage(total=8, used=0, cached=2, free=6)


def test_rejects_an_empty_pool():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


# -- prefix hits -----------------------------------------------------------------------------


@pytest.mark.parametrize("probe, expected", [
    ([*range(10), 99], 8),          # both full blocks of the cached prompt
    ([*range(9), 99], 8),           # the third block was never full, so never cached
    ([*range(6), 99, 98], 4),       # diverges inside the second block
    ([0, 1, 2, 99, 4, 5, 6, 7, 8], 0),  # diverges inside the first block
])
def test_shared_prefixes_hit_full_blocks_only(probe, expected):
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, make_request("a", range(10)))  # still running: hits share its blocks
    assert cached_tokens(bm, probe) == expected


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_the_whole_prompt_is_never_a_hit(block_size):
    bm = BlockManager(num_blocks=16, block_size=block_size)
    request = make_request("a", range(8))
    admit(bm, request)
    bm.free(request)
    assert cached_tokens(bm, range(8)) == 8 - block_size
    assert cached_tokens(bm, range(9)) == 8


def test_equal_blocks_after_different_prefixes_do_not_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    request = make_request("a", [1, 1, 1, 1, 7, 7, 7, 7, 0])
    admit(bm, request)
    bm.free(request)
    assert cached_tokens(bm, [1, 1, 1, 1, 7, 7, 7, 7, 0]) == 8
    assert cached_tokens(bm, [2, 2, 2, 2, 7, 7, 7, 7, 0]) == 0
    assert cached_tokens(bm, [7, 7, 7, 7, 0]) == 0
    assert hash_block(hash_block(None, [1] * 4), [7] * 4) != hash_block(None, [7] * 4)


def test_a_hit_stops_at_the_first_missing_block():
    bm = BlockManager(num_blocks=4, block_size=2)
    first = make_request("a", [1, 2, 9])
    admit(bm, first)
    bm.free(first)  # [1, 2] cached in block 0
    # A prompt_logprobs request recomputes [1, 2] into a block of its own (not registered: the
    # hash is taken) and registers [3, 4] as the child of [1, 2].
    second = make_request("b", [1, 2, 3, 4, 5], prompt_logprobs=0)
    admit(bm, second)
    bm.free(second)
    # Takes the two empty blocks, then evicts block 0 ([1, 2]); [3, 4] stays cached but is
    # unreachable without its parent.
    admit(bm, make_request("c", [7] * 5))
    assert bm.usage().cached == 1
    assert cached_tokens(bm, [1, 2, 3, 4, 0]) == 0


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    request = make_request("a", range(9))
    admit(bm, request)
    assert cached_tokens(bm, range(9)) == 0
    bm.free(request)
    assert cached_tokens(bm, range(9)) == 0
    assert bm.usage() == BlockUsage(total=8, used=0, cached=0, free=8)


@pytest.mark.parametrize("prompt_logprobs", [0, 5])
def test_prompt_logprobs_requests_never_hit(prompt_logprobs):
    bm = BlockManager(num_blocks=8, block_size=4)
    request = make_request("a", range(9))
    admit(bm, request)
    bm.free(request)
    assert cached_tokens(bm, range(9), prompt_logprobs=prompt_logprobs) == 0
    assert cached_tokens(bm, range(9)) == 8


def test_reset_prefix_cache_forgets_every_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    finished, running = make_request("a", range(9)), make_request("b", range(50, 59))
    admit(bm, finished)
    admit(bm, running)
    bm.free(finished)
    bm.reset_prefix_cache()
    assert cached_tokens(bm, range(9)) == 0
    assert cached_tokens(bm, range(50, 59)) == 0
    bm.free(running)
    assert bm.usage() == BlockUsage(total=8, used=0, cached=0, free=8)


# -- eviction order --------------------------------------------------------------------------


def cache_two_freed_prompts(bm: BlockManager) -> None:
    """Requests a = [1, 2, 3, 4] then b = [5, 6, 7, 8] run and are freed in that order, so both
    prompts stay cached, a's the least recently freed."""
    first, second = make_request("a", [1, 2, 3, 4]), make_request("b", [5, 6, 7, 8])
    admit(bm, first)
    admit(bm, second)
    bm.free(first)
    bm.free(second)


@pytest.mark.parametrize("num_taken, first_hit, second_hit", [
    (0, 4, 4),
    (1, 2, 4),  # the earlier-freed request loses its tail block first
    (2, 0, 4),
    (3, 0, 2),  # then the later-freed one, tail first again
    (4, 0, 0),
])
def test_eviction_is_least_recently_freed_first_and_tail_blocks_first(num_taken, first_hit, second_hit):
    bm = BlockManager(num_blocks=4, block_size=2)
    cache_two_freed_prompts(bm)
    admit(bm, make_request("c", range(100, 100 + 2 * num_taken)))
    assert cached_tokens(bm, [1, 2, 3, 4, 0]) == first_hit
    assert cached_tokens(bm, [5, 6, 7, 8, 0]) == second_hit


def test_a_prefix_hit_makes_its_blocks_recently_used():
    bm = BlockManager(num_blocks=6, block_size=2)
    cache_two_freed_prompts(bm)
    again = make_request("a2", [1, 2, 3, 4, 9])
    admit(bm, again)
    bm.free(again)  # now "a"'s prefix is the most recently freed
    # c takes the emptied block of [9] first, then the never-used one, then evicts the least
    # recently freed cached block: "b"'s tail.
    admit(bm, make_request("c", range(100, 106)))
    assert cached_tokens(bm, [1, 2, 3, 4, 0]) == 4
    assert cached_tokens(bm, [5, 6, 7, 8, 0]) == 2


def test_empty_blocks_are_evicted_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=2)
    cached, partial = make_request("a", [1, 2, 3]), make_request("b", [5])
    admit(bm, cached)  # [1, 2] is cached on free, [3] is not
    admit(bm, partial)
    bm.free(cached)
    bm.free(partial)  # freed last, yet holds nothing worth keeping
    admit(bm, make_request("c", [7, 8, 9]))
    assert cached_tokens(bm, [1, 2, 0]) == 2


def test_never_used_blocks_are_taken_before_cached_ones():
    bm = BlockManager(num_blocks=6, block_size=2)
    request = make_request("a", [1, 2, 3, 4])
    admit(bm, request)
    bm.free(request)
    admit(bm, make_request("c", range(100, 108)))
    assert cached_tokens(bm, [1, 2, 3, 4, 0]) == 4


def test_a_reused_block_drops_its_old_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    request = make_request("a", [1, 2, 3])
    admit(bm, request)
    bm.free(request)  # [1, 2] cached
    other = make_request("c", [7, 8, 9])
    admit(bm, other)  # takes both blocks: [1, 2]'s block now holds the partial [9]
    assert cached_tokens(bm, [1, 2, 0]) == 0
    bm.free(other)
    assert bm.usage() == BlockUsage(total=2, used=0, cached=1, free=1)
    assert cached_tokens(bm, [7, 8, 0]) == 2


# -- property test ---------------------------------------------------------------------------

TOKENS = st.integers(0, 1)  # a two-token alphabet, so that prefixes collide often


def snapshot(bm: BlockManager) -> tuple:
    """All of a BlockManager's state, to check that a failed allocate changed nothing."""
    return (list(bm._ref_counts), list(bm._block_hashes), dict(bm._cached), list(bm._evictable),
            {k: list(v) for k, v in bm._tables.items()}, dict(bm._num_hashed))


def chain_hash(tokens: tuple[int, ...], block_size: int) -> bytes | None:
    digest = None
    for start in range(0, len(tokens), block_size):
        digest = hash_block(digest, list(tokens[start:start + block_size]))
    return digest


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions (with prefix hits), growth by chunks and decode tokens, frees and cache
    resets. Each allocation is followed by a simulated KV write: slot (block, offset) records the
    whole token prefix that ends at that position, which is what its KV depends on."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4),
                enable_prefix_caching=st.booleans())
    def create(self, num_blocks, block_size, enable_prefix_caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.live: dict[str, Request] = {}
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.num_admitted = 0

    # -- helpers ---------------------------------------------------------------------------

    def tokens(self, request: Request) -> list[int]:
        return request.token_ids(0, request.num_tokens)

    def pick(self, index: int) -> Request:
        return list(self.live.values())[index % len(self.live)]

    def compute(self, request: Request, num_new: int) -> None:
        """What the model does after a successful allocate: write the KV of the new tokens."""
        table, tokens = self.bm.block_table(request.request_id), self.tokens(request)
        start = request.num_computed_tokens
        for position in range(start, start + num_new):
            block = table[position // self.bm.block_size]
            self.kv[block, position % self.bm.block_size] = tuple(tokens[:position + 1])
        request.num_computed_tokens += num_new

    def allocate_or_nothing(self, request: Request, num_new: int, cached_blocks=()) -> bool:
        before = snapshot(self.bm)
        if self.bm.allocate(request, num_new, cached_blocks):
            return True
        assert snapshot(self.bm) == before, "a failed allocate changed the block manager"
        return False

    def check_hit(self, request: Request, cached_blocks: list[int], num_cached: int) -> None:
        bs = self.bm.block_size
        assert num_cached == len(cached_blocks) * bs < request.num_tokens
        if not self.bm.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            assert cached_blocks == []
        tokens = self.tokens(request)
        for index, block in enumerate(cached_blocks):
            for offset in range(bs):
                position = index * bs + offset
                assert self.kv.get((block, offset)) == tuple(tokens[:position + 1]), \
                    f"hit block {block} does not hold this request's prefix at position {position}"

    # -- operations ------------------------------------------------------------------------

    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=14), chunk=st.integers(1, 14),
          prompt_logprobs=st.sampled_from([None, None, None, 0]))
    def admit(self, prompt, chunk, prompt_logprobs):
        request = make_request(f"r{self.num_admitted}", prompt, prompt_logprobs=prompt_logprobs)
        self.num_admitted += 1
        cached_blocks, num_cached = self.bm.find_cached_prefix(request)
        self.check_hit(request, cached_blocks, num_cached)
        num_new = min(chunk, request.num_tokens - num_cached)
        if self.allocate_or_nothing(request, num_new, cached_blocks):
            request.num_computed_tokens = num_cached
            self.compute(request, num_new)
            self.live[request.request_id] = request

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 63), chunk=st.integers(1, 8), sampled=TOKENS)
    def extend(self, index, chunk, sampled):
        """Next prompt chunk, or a decode step when the request's known tokens are all computed."""
        request = self.pick(index)
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(sampled)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        if self.allocate_or_nothing(request, num_new):
            self.compute(request, num_new)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 63))
    def free(self, index):
        request = self.live.pop(self.pick(index).request_id)
        self.bm.free(request)

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()

    # -- invariants ------------------------------------------------------------------------

    def tables(self) -> dict[str, list[int]]:
        return {rid: self.bm.block_table(rid) for rid in self.live}

    @invariant()
    def blocks_are_accounted_for(self):
        bm, tables = self.bm, self.tables()
        usage = bm.usage()
        assert usage.used + usage.cached + usage.free == usage.total == bm.num_blocks
        holders = Counter(block for table in tables.values() for block in table)
        assert all(len(set(table)) == len(table) for table in tables.values())
        assert usage.used == len(holders)
        assert bm._ref_counts == [holders[block] for block in range(bm.num_blocks)]
        assert set(bm._evictable) == set(range(bm.num_blocks)) - set(holders)
        for rid, table in tables.items():
            assert len(table) == bm.blocks_needed(self.live[rid].num_computed_tokens)

    @invariant()
    def only_equal_prefixes_share_a_block(self):
        places = defaultdict(list)
        for rid, table in self.tables().items():
            for index, block in enumerate(table):
                places[block].append((index, self.live[rid]))
        bs = self.bm.block_size
        for block, holders in places.items():
            if len(holders) == 1:
                continue
            indices = {index for index, _ in holders}
            assert len(indices) == 1, f"block {block} is at different positions in two tables"
            end = (indices.pop() + 1) * bs
            prefixes = {tuple(self.tokens(request)[:end]) for _, request in holders}
            assert len(prefixes) == 1, f"block {block} is shared by different prefixes"
            assert all(request.num_computed_tokens >= end for _, request in holders)

    @invariant()
    def the_cache_maps_hashes_to_matching_content(self):
        bm = self.bm
        hashed = [(h, b) for b, h in enumerate(bm._block_hashes) if h is not None]
        assert len(hashed) == len(bm._cached) and bm._cached == dict(hashed), "hash map is not 1:1"
        last = bm.block_size - 1
        for block_hash, block in bm._cached.items():
            prefix = self.kv.get((block, last))
            assert prefix is not None and chain_hash(prefix, bm.block_size) == block_hash, \
                f"cached block {block} does not hold the prefix its hash names"
            for offset in range(bm.block_size):
                assert self.kv[block, offset] == prefix[:len(prefix) - last + offset]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for request in self.live.values():
            self.bm.free(request)
        usage = self.bm.usage()
        assert usage.used == 0 and usage.cached + usage.free == usage.total
        assert self.bm._ref_counts == [0] * self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None)
test_block_manager_random_operations = BlockManagerMachine.TestCase
