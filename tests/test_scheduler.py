"""Scheduler tests against a simulated model that checks the KV cache symbolically.

The simulated model keeps, for every KV slot, what a real model would have written there: the
token at that position and a digest of the whole prefix up to it (the KV of position p depends on
tokens 0..p). Each step it first writes the KV of every scheduled token, as the paged attention
does layer by layer, then checks that every position a scheduled token attends to holds that
request's own token and prefix. The token it samples is a fixed function of (request id,
position), so each request's output is known in advance, whatever the batching, chunking or
preemption."""

from __future__ import annotations

import random
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field

import pytest
from hypothesis import Phase, event, find, given, settings
from hypothesis import strategies as st

from hetserve.config import SchedulerConfig
from hetserve.core.block_manager import BlockManager
from hetserve.core.outputs import ScheduledRequest, SchedulerOutput
from hetserve.core.policy import PROMPT_TOKENS_PER_DECODE_TOKEN, MLFQPolicy
from hetserve.core.request import Request, RequestStatus
from hetserve.core.scheduler import Scheduler
from hetserve.core.swap import PreemptionCosts
from hetserve.sampling_params import SamplingParams

ALPHABET = 3  # small, so that prompts and generated tokens share prefixes


def sampled_token(request_id: str, position: int) -> int:
    """The token the simulated model samples for `position` of a request."""
    return zlib.crc32(f"{request_id}@{position}".encode()) % ALPHABET


def prefix_digests(tokens: list[int]) -> list[int]:
    """digests[p] identifies tokens[:p + 1] (ints hash the same in every process)."""
    digests, digest = [], 0
    for token in tokens:
        digest = hash((digest, token))
        digests.append(digest)
    return digests


@dataclass
class RequestSpec:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival_step: int = 0
    abort_step: int | None = None
    prompt_logprobs: int | None = None
    priority: int = 0

    def expected_output(self) -> list[int]:
        start = len(self.prompt)
        return [sampled_token(self.request_id, start + k) for k in range(self.max_tokens)]

    def make_request(self) -> Request:
        params = SamplingParams(max_tokens=self.max_tokens, prompt_logprobs=self.prompt_logprobs)
        return Request(self.request_id, list(self.prompt), params, priority=self.priority)


@dataclass
class EngineShape:
    num_blocks: int
    block_size: int
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 64
    enable_prefix_caching: bool = True
    steps_in_flight: int = 1
    """Steps submitted before the oldest one's results come back (pipeline parallelism)."""
    policy: str = "fcfs"
    mlfq_quantum: int = 2
    mlfq_starvation_steps: int = 20
    num_host_blocks: int = 0
    preemption_mode: str = "auto"


@dataclass
class Case:
    shape: EngineShape
    specs: list[RequestSpec]


def fits(shape: EngineShape, prompt_len: int, max_tokens: int) -> bool:
    """The engine's admission check: the whole sequence fits the pool."""
    return -(-(prompt_len + max_tokens) // shape.block_size) <= shape.num_blocks


class SimulatedModel:
    """The workers' side of a step: the worker protocol, KV writes, context checks, sampling."""

    def __init__(self, block_size: int, specs: list[RequestSpec]):
        self.block_size = block_size
        self.sequences = {s.request_id: s.prompt + s.expected_output() for s in specs}
        self.digests = {rid: prefix_digests(seq) for rid, seq in self.sequences.items()}
        self.kv: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.host_kv: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.known: set[str] = set()
        """Requests the workers hold state for: sent as new, not yet reported finished."""

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        self._track_requests(output)
        self._swap(output)
        for scheduled in output.scheduled:
            self._write(scheduled)
        for scheduled in output.scheduled:
            self._check_context(scheduled)
        return {s.request_id: sampled_token(s.request_id, s.start_pos + len(s.token_ids))
                for s in output.scheduled if s.sample}

    def _swap(self, output: SchedulerOutput) -> None:
        """Copy swapped blocks as the workers do: all swap-outs, then all swap-ins."""
        for pairs, source, target in ((output.blocks_to_swap_out, self.kv, self.host_kv),
                                      (output.blocks_to_swap_in, self.host_kv, self.kv)):
            # A source may repeat (two requests sharing a cached prefix block both swap it out);
            # a target never: one of the copies would be lost.
            assert len({b for _, b in pairs}) == len(pairs), "two blocks swapped into one"
            for a, b in pairs:
                for offset in range(self.block_size):
                    target.pop((b, offset), None)
                    if (a, offset) in source:
                        target[(b, offset)] = source[(a, offset)]

    def content(self, request_id: str, position: int) -> tuple[int, int, int]:
        """What the KV slot of `position` must hold for this request."""
        return self.sequences[request_id][position], position, self.digests[request_id][position]

    def _slot(self, scheduled: ScheduledRequest, position: int) -> tuple[int, int]:
        return scheduled.block_ids[position // self.block_size], position % self.block_size

    def _track_requests(self, output: SchedulerOutput) -> None:
        for request_id in output.finished_request_ids:
            assert request_id in self.known, f"{request_id} reported finished but unknown to workers"
            self.known.remove(request_id)
        for new in output.new_requests:
            assert new.request_id not in self.known, f"{new.request_id} sent as new twice"
            assert new.prompt_token_ids == self.sequences[new.request_id][:len(new.prompt_token_ids)]
            self.known.add(new.request_id)
        for scheduled in output.scheduled:
            assert scheduled.request_id in self.known, f"{scheduled.request_id} never sent as new"

    def _write(self, scheduled: ScheduledRequest) -> None:
        rid, start, num = scheduled.request_id, scheduled.start_pos, len(scheduled.token_ids)
        end = start + num
        assert num >= 1, f"{rid} scheduled with no tokens"
        assert scheduled.token_ids == self.sequences[rid][start:end], f"{rid}: wrong tokens"
        assert len(scheduled.block_ids) * self.block_size >= end, f"{rid}: block table too short"
        assert len(set(scheduled.block_ids)) == len(scheduled.block_ids), f"{rid}: repeated block"
        for position in range(start, end):
            self.kv[self._slot(scheduled, position)] = self.content(rid, position)

    def _check_context(self, scheduled: ScheduledRequest) -> None:
        rid = scheduled.request_id
        for position in range(scheduled.start_pos + len(scheduled.token_ids)):
            slot = self._slot(scheduled, position)
            assert self.kv.get(slot) == self.content(rid, position), (
                f"{rid} at position {position}: slot {slot} holds {self.kv.get(slot)}, "
                f"expected {self.content(rid, position)}")


@dataclass
class RunResult:
    outputs: dict[str, list[int]] = field(default_factory=dict)
    """Outputs of the requests that finished at max_tokens."""
    aborted: set[str] = field(default_factory=set)
    log: list[list[tuple[str, int, int]]] = field(default_factory=list)
    """Per step: (request id, start position, number of tokens) of each scheduled request."""
    preempted: list[str] = field(default_factory=list)
    num_partial_chunks: int = 0
    """Scheduled chunks that stopped short of the last known token (chunked prefill)."""
    num_steps: int = 0
    prefix_cache_hits: int = 0
    preempted_by_rank: int = 0
    num_swapped_out: int = 0

    def chunks(self, request_id: str) -> list[tuple[int, int]]:
        """(start position, number of tokens) of each time the request was scheduled."""
        return [(start, num) for step in self.log for rid, start, num in step if rid == request_id]


def step_bound(specs: list[RequestSpec], steps_in_flight: int = 1, policy: str = "fcfs") -> int:
    """Steps within which everything must finish. Under FCFS, whenever the oldest running request
    is not in flight, a step computes at least one of its tokens, and it is never preempted, so out
    of every `steps_in_flight` steps one advances it. Under priority and MLFQ a request that is
    outranked may lose its computed tokens several times, hence the looser bound."""
    last_arrival = max((s.arrival_step for s in specs), default=0)
    work = steps_in_flight * sum(len(s.prompt) + s.max_tokens for s in specs)
    return last_arrival + work * (1 if policy == "fcfs" else len(specs) + 1) + 1


class Harness:
    """Drives a Scheduler as the engine does and checks every step."""

    def __init__(self, case: Case):
        shape = case.shape
        self.shape, self.specs = shape, {s.request_id: s for s in case.specs}
        for spec in case.specs:
            assert spec.prompt and fits(shape, len(spec.prompt), spec.max_tokens), spec
        self.block_manager = BlockManager(shape.num_blocks, shape.block_size, shape.enable_prefix_caching)
        config = SchedulerConfig(shape.max_num_seqs, shape.max_num_batched_tokens, shape.policy,
                                 mlfq_quantum=shape.mlfq_quantum, mlfq_starvation_steps=shape.mlfq_starvation_steps,
                                 preemption_mode=shape.preemption_mode)
        self.scheduler = Scheduler(config, self.block_manager, shape.steps_in_flight, shape.num_host_blocks)
        self.model = SimulatedModel(shape.block_size, case.specs)
        self.result = RunResult()
        self.in_flight: deque[tuple[SchedulerOutput, dict[str, int]]] = deque()
        self.last_end: dict[str, int] = {}
        self.arrivals, self.aborts = defaultdict(list), defaultdict(list)
        for spec in case.specs:
            self.arrivals[spec.arrival_step].append(spec)
            if spec.abort_step is not None:
                self.aborts[spec.abort_step].append(spec.request_id)

    def run(self) -> RunResult:
        last_arrival, max_steps = max(self.arrivals, default=0), step_bound(
            list(self.specs.values()), self.shape.steps_in_flight, self.shape.policy)
        for step in range(max_steps):
            for spec in self.arrivals[step]:
                self.scheduler.add_request(spec.make_request())
            self.abort(self.aborts[step])
            if step >= last_arrival and not self.scheduler.has_unfinished_requests() and not self.in_flight:
                break
            self.step()
        else:
            raise AssertionError(f"not finished after {max_steps} steps")
        self.result.prefix_cache_hits = self.scheduler.prefix_cache_hits
        self.result.preempted_by_rank = self.scheduler.num_ranked_preemptions
        self.result.num_swapped_out = self.scheduler.num_swapped_out
        self.check_drained()
        return self.result

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                expected = self.specs[request_id].expected_output()
                assert request.output_token_ids == expected[:len(request.output_token_ids)]
                self.result.aborted.add(request_id)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def step(self) -> None:
        """Submit steps until `steps_in_flight` are out, as the engine does, then apply the oldest."""
        sched = self.scheduler
        while len(self.in_flight) < self.shape.steps_in_flight:
            had_work = sched.has_unfinished_requests()
            preemptions_before = {r.request_id: r.num_preemptions for r in sched.running}
            swapped = {r.request_id for r in sched.waiting if r.host_blocks}
            output = sched.schedule()
            self.check_schedule(output, preemptions_before, swapped)
            if not output.scheduled:
                assert self.in_flight or not had_work, "a step with unfinished requests scheduled nothing"
                break
            # The model computes in submission order, as every pipeline stage does.
            self.in_flight.append((output, self.model.execute(output)))
        if not self.in_flight:
            return
        output, sampled = self.in_flight.popleft()
        updated = sched.update_from_output(output, sampled)
        assert {r.request_id for r in updated} <= set(sampled)
        for request in updated:
            if len(request.output_token_ids) == request.sampling_params.max_tokens:
                self.result.outputs[request.request_id] = list(request.output_token_ids)
                sched.finish_requests([request.request_id], RequestStatus.FINISHED_LENGTH)
        self.result.num_steps += 1

    def check_schedule(self, output: SchedulerOutput, preemptions_before: dict[str, int], swapped: set[str]
                       ) -> None:
        """`preemptions_before`: the running requests before this step, with their preemptions;
        `swapped`: the waiting requests whose KV was in host blocks."""
        sched, shape, bs = self.scheduler, self.shape, self.shape.block_size
        assert output.num_tokens <= shape.max_num_batched_tokens
        assert len(sched.running) <= shape.max_num_seqs
        ids = [s.request_id for s in output.scheduled]
        assert len(ids) == len(set(ids)), f"a request scheduled twice in one step: {ids}"
        preempted = [rid for rid, n in preemptions_before.items() if sched.requests[rid].num_preemptions > n]
        assert len(preempted) == output.num_preempted
        self.result.preempted += preempted
        continuing = preemptions_before.keys() - set(preempted)
        for scheduled in output.scheduled:
            request, rid = sched.requests[scheduled.request_id], scheduled.request_id
            end = scheduled.start_pos + len(scheduled.token_ids)
            assert request.status == RequestStatus.RUNNING and end <= request.num_tokens
            assert scheduled.sample == (end == request.num_tokens)
            self.result.num_partial_chunks += not scheduled.sample
            if rid in continuing or rid in swapped:
                assert scheduled.start_pos == self.last_end[rid], f"{rid} skipped or redid tokens"
            else:  # admitted (again): starts after a prefix hit of whole blocks, or at 0
                assert scheduled.start_pos % bs == 0
                uncacheable = not shape.enable_prefix_caching or self.specs[rid].prompt_logprobs is not None
                assert scheduled.start_pos == 0 or not uncacheable, f"{rid} hit the prefix cache"
            self.last_end[rid] = end
        self.check_blocks()
        self.result.log.append([(s.request_id, s.start_pos, len(s.token_ids)) for s in output.scheduled])

    def check_blocks(self) -> None:
        usage = self.block_manager.usage()
        assert usage.used + usage.cached + usage.free == usage.total
        held = {b for r in self.scheduler.running for b in self.block_manager.block_table(r.request_id)}
        assert usage.used == len(held), "blocks held by no running request"
        assert all(self.block_manager.block_table(r.request_id) == [] for r in self.scheduler.waiting)
        host = [b for r in self.scheduler.waiting for b in r.host_blocks]
        assert len(host) == len(set(host)) and len(host) + self.scheduler.host_pool.num_free <= self.scheduler.host_pool.num_blocks
        assert all(not r.host_blocks for r in self.scheduler.running)

    def check_drained(self) -> None:
        sched = self.scheduler
        assert not sched.running and not sched.waiting and not sched.requests
        assert self.block_manager.usage().used == 0
        assert all(self.block_manager.block_table(rid) == [] for rid in self.specs)
        assert not sched._in_flight
        output = sched.schedule()
        assert not output.scheduled and not output.finished_request_ids
        assert sched.host_pool.num_free == sched.host_pool.num_blocks, "host blocks leaked"
        # An empty step reaches no worker, so the last finished ids wait for the next real step.
        assert self.model.known == set(sched._finished_since_last_step), "workers never told these finished"
        for rid, spec in self.specs.items():
            if rid in self.result.aborted:
                assert rid not in self.result.outputs
            else:
                assert self.result.outputs.get(rid) == spec.expected_output(), rid


def run_case(case: Case) -> RunResult:
    return Harness(case).run()


# -- deterministic cases ---------------------------------------------------------------------


def test_one_request_produces_its_output():
    result = run_case(Case(EngineShape(num_blocks=4, block_size=4), [RequestSpec("a", [1, 2, 0], 5)]))
    assert result.log[0] == [("a", 0, 3)] and result.num_steps == 5


def test_chunked_prefill_stays_within_the_token_budget():
    shape = EngineShape(num_blocks=8, block_size=4, max_num_batched_tokens=3)
    result = run_case(Case(shape, [RequestSpec("a", list(range(10)), 2)]))
    assert [step[0][1:] for step in result.log] == [(0, 3), (3, 3), (6, 3), (9, 1), (10, 1)]


def test_decodes_go_first_and_prompts_share_what_is_left_of_the_budget():
    shape = EngineShape(num_blocks=16, block_size=4, max_num_batched_tokens=6)
    specs = [RequestSpec("a", [1, 2], 3), RequestSpec("b", [0] * 9, 2, arrival_step=1)]
    result = run_case(Case(shape, specs))
    assert result.log[:3] == [[("a", 0, 2)], [("a", 2, 1), ("b", 0, 5)], [("a", 3, 1), ("b", 5, 4)]]


def test_max_num_seqs_limits_running_requests():
    shape = EngineShape(num_blocks=32, block_size=4, max_num_seqs=2)
    specs = [RequestSpec(f"r{i}", [i % ALPHABET, 1], 3) for i in range(5)]
    result = run_case(Case(shape, specs))
    assert max(len(step) for step in result.log) == 2
    assert [rid for rid, _, _ in result.log[0]] == ["r0", "r1"]


def test_preemption_recomputes_the_newest_request_in_chunks():
    shape = EngineShape(num_blocks=4, block_size=2, max_num_batched_tokens=2, enable_prefix_caching=False)
    specs = [RequestSpec("old", [0, 1], 6), RequestSpec("new", [2], 4)]
    result = run_case(Case(shape, specs))
    assert result.preempted == ["new", "new"]
    assert result.chunks("old") == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
    # Preempted with two outputs (3 known tokens): recomputed from 0, sampling only at the end.
    assert result.chunks("new") == [(0, 1), (1, 1), (0, 1), (0, 2), (2, 1), (3, 1)]


def test_a_swapped_out_request_resumes_where_it_stopped():
    shape = EngineShape(num_blocks=4, block_size=2, max_num_batched_tokens=2, enable_prefix_caching=False,
                        num_host_blocks=4)
    specs = [RequestSpec("old", [0, 1], 6), RequestSpec("new", [2], 4)]
    result = run_case(Case(shape, specs))
    assert result.preempted == ["new"] and result.num_swapped_out == 1
    # Preempted after two steps (two tokens computed): it goes on from position 2, nothing recomputed.
    assert result.chunks("new") == [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_swap_falls_back_to_recompute_when_host_blocks_run_out_or_when_asked():
    specs = [RequestSpec("old", [0, 1], 6), RequestSpec("new", [2], 4)]
    for host_blocks, mode in ((0, "auto"), (4, "recompute")):
        shape = EngineShape(num_blocks=4, block_size=2, max_num_batched_tokens=2, enable_prefix_caching=False,
                            num_host_blocks=host_blocks, preemption_mode=mode)
        result = run_case(Case(shape, specs))
        assert result.num_swapped_out == 0 and result.chunks("new")[2] == (0, 1)


def test_preemption_costs_choose_the_cheaper_way():
    costs = PreemptionCosts()
    assert costs.prefers_swap(num_tokens=1, num_blocks=100)  # nothing measured yet: try swapping
    costs.observe_step(seconds=1.0, num_tokens=1000)  # 1 ms per recomputed token
    costs.observe_step(seconds=5.0, num_tokens=8)  # a decode step: says nothing about prefill
    costs.observe_swap(seconds=0.01, num_blocks=10)  # 1 ms per block copied
    assert costs.recompute_s_per_token == 0.001 and costs.swap_s_per_block == 0.001
    assert costs.prefers_swap(num_tokens=32, num_blocks=2)  # 4 ms of copies against 32 ms of prefill
    assert not costs.prefers_swap(num_tokens=3, num_blocks=2)


def test_a_preempted_request_goes_back_to_the_front_of_the_queue():
    shape = EngineShape(num_blocks=4, block_size=2, max_num_batched_tokens=2, enable_prefix_caching=False)
    specs = [RequestSpec("old", [0, 1], 6), RequestSpec("new", [2], 4),
             RequestSpec("late", [1], 1, arrival_step=1)]
    result = run_case(Case(shape, specs))
    assert result.preempted == ["new", "new"]
    admissions = [rid for step in result.log for rid, start, _ in step if start == 0]
    assert admissions == ["old", "new", "new", "new", "late"]


def test_preempted_request_resumes_from_its_cached_prefix():
    shape = EngineShape(num_blocks=5, block_size=2)
    specs = [RequestSpec("old", [0, 1, 2, 0], 2), RequestSpec("new", [2, 2, 1, 1, 0], 4)]
    result = run_case(Case(shape, specs))
    assert result.preempted == ["new"]
    # Preempted after its prompt and one output token; back with its two full blocks cached.
    assert result.chunks("new") == [(0, 5), (4, 2), (6, 1), (7, 1)]


def test_prefix_hit_on_blocks_of_a_finished_request():
    shape = EngineShape(num_blocks=8, block_size=4)
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]
    specs = [RequestSpec("a", [*prompt, 2], 1), RequestSpec("b", [*prompt, 0, 0], 2, arrival_step=3)]
    result = run_case(Case(shape, specs))
    assert result.chunks("b")[0] == (8, 2) and result.prefix_cache_hits == 8


def test_prefix_hit_on_blocks_computed_in_the_same_step():
    shape = EngineShape(num_blocks=8, block_size=4)
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]
    specs = [RequestSpec("a", prompt, 2), RequestSpec("b", [*prompt, 2], 2)]
    result = run_case(Case(shape, specs))
    assert result.log[0] == [("a", 0, 8), ("b", 8, 1)]


def test_prompt_logprobs_request_recomputes_a_cached_prefix():
    shape = EngineShape(num_blocks=8, block_size=4)
    prompt = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    specs = [RequestSpec("a", prompt, 1), RequestSpec("b", prompt, 1, arrival_step=3, prompt_logprobs=1)]
    assert run_case(Case(shape, specs)).chunks("b")[0] == (0, 9)


def test_aborts_of_waiting_running_and_finished_requests():
    shape = EngineShape(num_blocks=6, block_size=2, max_num_seqs=1)
    specs = [
        RequestSpec("running", [0, 1, 2], 6, abort_step=2),
        RequestSpec("waiting", [1, 1, 1], 3, abort_step=1),
        RequestSpec("finished", [2, 0], 1, arrival_step=4, abort_step=9),
        RequestSpec("bystander", [2, 2], 2, arrival_step=4),
    ]
    result = run_case(Case(shape, specs))
    assert result.aborted == {"running", "waiting"}
    assert set(result.outputs) == {"finished", "bystander"}


def test_duplicate_request_id_is_rejected_and_unknown_ids_are_ignored():
    scheduler = Scheduler(SchedulerConfig(), BlockManager(4, 4))
    scheduler.add_request(RequestSpec("a", [1], 1).make_request())
    with pytest.raises(ValueError):
        scheduler.add_request(RequestSpec("a", [2], 1).make_request())
    scheduler.finish_requests(["nope"], RequestStatus.FINISHED_ABORTED)
    assert len(scheduler.waiting) == 1



def test_steps_in_flight_each_take_a_share_of_the_requests():
    # Two pipeline stages: the two steps in flight carry half the requests each, so both stages work.
    scheduler = Scheduler(SchedulerConfig(), BlockManager(16, 4), num_microbatches=2)
    for i in range(5):
        scheduler.add_request(RequestSpec(f"r{i}", [i, i], 4).make_request())
    first, second, third = scheduler.schedule(), scheduler.schedule(), scheduler.schedule()
    assert [len(first.scheduled), len(second.scheduled), len(third.scheduled)] == [3, 2, 0]
    scheduler.update_from_output(first, {s.request_id: 0 for s in first.scheduled})
    assert {s.request_id for s in scheduler.schedule().scheduled} == {s.request_id for s in first.scheduled}

# -- random request streams ------------------------------------------------------------------

TOKEN_LISTS = st.lists(st.integers(0, ALPHABET - 1), max_size=10)


@st.composite
def request_specs(draw, request_id: str, shared_prefixes: list[list[int]]) -> RequestSpec:
    prompt = draw(st.sampled_from(shared_prefixes)) + draw(TOKEN_LISTS.filter(bool))
    arrival = draw(st.integers(0, 6))
    abort_after = draw(st.one_of(st.none(), st.integers(0, 12)))
    return RequestSpec(
        request_id, prompt, draw(st.sampled_from([1, 2, 4, 7, 12])), arrival,
        None if abort_after is None else arrival + abort_after,
        draw(st.sampled_from([None, None, None, 0])), draw(st.integers(0, 2)))


@st.composite
def scheduler_cases(draw) -> Case:
    shared_prefixes = draw(st.lists(TOKEN_LISTS, min_size=1, max_size=3))
    num_requests = draw(st.integers(2, 8))
    specs = [draw(request_specs(f"r{i}", shared_prefixes)) for i in range(num_requests)]
    block_size = draw(st.sampled_from([1, 2, 3, 4, 16]))
    # The smallest pool that admits every request (the engine rejects the others), plus slack:
    # small slack means preemptions.
    smallest = max(-(-(len(s.prompt) + s.max_tokens) // block_size) for s in specs)
    slack = draw(st.sampled_from([0, 0, 1, 2, 8, 40]))
    shape = EngineShape(
        num_blocks=smallest + slack,
        block_size=block_size,
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.sampled_from([1, 2, 5, 8, 13, 32, 64])),
        enable_prefix_caching=draw(st.sampled_from([True, True, True, False])),
        steps_in_flight=draw(st.sampled_from([1, 1, 2, 3])),
        policy=draw(st.sampled_from(["fcfs", "fcfs", "priority", "mlfq"])),
        mlfq_quantum=draw(st.integers(1, 4)),
        mlfq_starvation_steps=draw(st.sampled_from([1, 3, 50])),
        num_host_blocks=draw(st.sampled_from([0, 0, 1, 3, 40])),
        preemption_mode=draw(st.sampled_from(["auto", "recompute"])),
    )
    return Case(shape, specs)


@settings(max_examples=300, deadline=None)
@given(scheduler_cases())
def test_random_request_streams(case):
    result = run_case(case)
    event(f"preempted: {bool(result.preempted)}")
    event(f"prefix hit: {result.prefix_cache_hits > 0}")


def was_preempted(result: RunResult) -> bool:
    return bool(result.preempted)


def hit_the_prefix_cache(result: RunResult) -> bool:
    return result.prefix_cache_hits > 0


def prefilled_in_chunks(result: RunResult) -> bool:
    return result.num_partial_chunks > 0


def swapped_out(result: RunResult) -> bool:
    return result.num_swapped_out > 0


def preempted_by_rank(result: RunResult) -> bool:
    """A request preempted for a better-ranked waiting one (priority or MLFQ), not for lack of KV."""
    return result.preempted_by_rank > 0


@pytest.mark.parametrize("exercised", [was_preempted, hit_the_prefix_cache, prefilled_in_chunks,
                                       preempted_by_rank, swapped_out])
def test_random_cases_exercise(exercised):
    """The generator reaches the interesting paths (find raises when no example does)."""
    quick = settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate])
    find(scheduler_cases(), lambda case: exercised(run_case(case)), settings=quick)


# -- scheduling policies ---------------------------------------------------------------------


def finish_step(result: RunResult, request_id: str) -> int:
    return max(i for i, step in enumerate(result.log) if any(rid == request_id for rid, _, _ in step))


def test_priority_policy_runs_the_smaller_priority_value_first():
    shape = EngineShape(num_blocks=16, block_size=4, max_num_seqs=1, policy="priority")
    specs = [RequestSpec("low", [1, 2], 3, priority=5), RequestSpec("high", [2, 1], 3, priority=-1)]
    result = run_case(Case(shape, specs))
    assert finish_step(result, "high") < finish_step(result, "low")
    fcfs = run_case(Case(EngineShape(num_blocks=16, block_size=4, max_num_seqs=1), specs))
    assert finish_step(fcfs, "low") < finish_step(fcfs, "high")


def test_a_higher_priority_arrival_preempts_a_running_request():
    shape = EngineShape(num_blocks=16, block_size=4, max_num_seqs=1, policy="priority")
    specs = [RequestSpec("low", [1, 2], 8, priority=1), RequestSpec("high", [2, 1], 2, arrival_step=3)]
    result = run_case(Case(shape, specs))
    assert result.preempted == ["low"] and finish_step(result, "high") < finish_step(result, "low")


def mixed_lengths() -> list[RequestSpec]:
    longs = [RequestSpec(f"long{i}", [i % ALPHABET, 1], 40) for i in range(2)]
    return longs + [RequestSpec(f"short{i}", [2, i % ALPHABET], 3, arrival_step=5 + i) for i in range(3)]


def test_mlfq_lets_short_requests_overtake_long_ones():
    shape = EngineShape(num_blocks=64, block_size=4, max_num_seqs=2, mlfq_quantum=2)
    fcfs = run_case(Case(shape, mixed_lengths()))
    mlfq = run_case(Case(EngineShape(**{**shape.__dict__, "policy": "mlfq"}), mixed_lengths()))
    for i in range(3):
        assert finish_step(mlfq, f"short{i}") < 20 < finish_step(fcfs, f"short{i}")
    assert mlfq.preempted and not fcfs.preempted


def test_mlfq_skip_join_and_demotion():
    policy = MLFQPolicy(num_levels=3, quantum=2, starvation_steps=5)
    assert [policy.entry_level(n * PROMPT_TOKENS_PER_DECODE_TOKEN) for n in (1, 2, 3, 4, 5, 1000)] == [0, 0, 1, 1, 2, 2]
    request = RequestSpec("r", [1], 100).make_request()
    policy.add(request)
    levels = []
    for _ in range(2 + 4 + 3):
        policy.on_token(request)
        levels.append(policy.level(request))
    assert levels == [0, 1, 1, 1, 1, 2, 2, 2, 2]  # quanta 2, then 4; the last level keeps it


def test_mlfq_promotes_a_starving_request():
    policy = MLFQPolicy(num_levels=3, quantum=1, starvation_steps=3)
    request = RequestSpec("r", [1], 100).make_request()
    policy.add(request)
    for _ in range(1 + 2):  # quanta of levels 0 and 1
        policy.on_token(request)
    assert policy.level(request) == 2
    promotions = [policy.on_step([request]) for _ in range(4)]
    assert promotions == [False, False, False, True] and policy.level(request) == 0


# -- many requests ---------------------------------------------------------------------------


def tiny_requests(count: int, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(ALPHABET) for _ in range(rng.randrange(6))] for _ in range(4)]
    specs = []
    for i in range(count):
        suffix = [rng.randrange(ALPHABET) for _ in range(rng.randrange(1, 4))]
        arrival = i // 3
        abort = arrival + rng.randrange(6) if rng.random() < 0.03 else None
        specs.append(RequestSpec(f"r{i}", rng.choice(prefixes) + suffix, rng.randrange(1, 4), arrival, abort))
    return specs


def test_ten_thousand_tiny_requests():
    shape = EngineShape(num_blocks=12, block_size=2, max_num_seqs=8, max_num_batched_tokens=16)
    specs = tiny_requests(10_000, seed=0)
    result = run_case(Case(shape, specs))
    assert len(result.outputs) + len(result.aborted) == len(specs)
    assert result.preempted and result.prefix_cache_hits > 0
