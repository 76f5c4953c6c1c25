"""Iteration-level scheduling (Orca), with vLLM v1's single rule: each step, give every request
some number of tokens so that its computed tokens catch up with its known tokens. A prompt
chunk and a decode token are the same case."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from hetserve.config import SchedulerConfig
from hetserve.core.block_manager import BlockManager
from hetserve.core.outputs import NewRequestData, ScheduledRequest, SchedulerOutput
from hetserve.core.policy import make_policy
from hetserve.core.request import Request, RequestStatus


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_used_fraction: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, num_microbatches: int = 1):
        """`num_microbatches`: steps kept in flight at once (one per pipeline stage). Each step then
        takes only its share of the requests, so the stages work on different steps at the same time
        instead of one step carrying every request while the other stages idle."""
        self.config = config
        self.block_manager = block_manager
        self.num_microbatches = num_microbatches
        self.policy = make_policy(config.scheduling_policy, config.mlfq_num_levels, config.mlfq_quantum,
                                  config.mlfq_starvation_steps)
        # Both kept in the policy's order: the waiting head is admitted next, the running tail is
        # preempted first.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._known_to_workers: set[str] = set()
        # Requests in a submitted step whose results have not come back (pipeline parallelism keeps
        # several steps in flight). They are neither scheduled again nor preempted until then.
        self._in_flight: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.num_ranked_preemptions = 0
        """Of those, preemptions that made room for a better-ranked waiting request."""

    # -- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.policy.add(request)
        self._enqueue(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Remove requests (stopped, at length, or aborted) and free their blocks. Unknown ids are
        ignored, so an abort racing a natural finish is harmless."""
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self.block_manager.free(request)
            self.policy.remove(request)
            if request_id in self._known_to_workers:
                self._known_to_workers.discard(request_id)
                self._finished_since_last_step.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(finished_request_ids=self._finished_since_last_step)
        self._finished_since_last_step = []
        share = -(-min(len(self.requests), self.config.max_num_seqs) // self.num_microbatches)
        if self.policy.on_step(self.waiting):
            self.waiting.sort(key=self.policy.key)
        self.running.sort(key=self.policy.key)
        self._preempt_for_waiting(output)
        ranked_out = output.num_preempted
        budget = self._schedule_running(output, self.config.max_num_batched_tokens, share)
        # After running out of KV, admitting anyone would only preempt again.
        if output.num_preempted == ranked_out:
            self._schedule_waiting(output, budget, share)
        if not output.scheduled:
            # Nothing runs, so no worker hears of this step: keep the finished ids for the next.
            self._finished_since_last_step, output.finished_request_ids = output.finished_request_ids, []
        for scheduled in output.scheduled:
            self._in_flight[scheduled.request_id] = self.requests[scheduled.request_id]
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int, share: int) -> int:
        scheduled: set[str] = set()
        for request in list(self.running):
            if budget <= 0 or len(output.scheduled) >= share:
                break
            if request.request_id in self._in_flight or request.status != RequestStatus.RUNNING:
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new):
                # Out of KV: recompute the newest request later. If it is scheduled or in flight,
                # wait for it rather than preempt an older one: newest-first keeps the oldest
                # request always progressing.
                victim = self.running[-1]
                if victim.request_id in scheduled or victim.request_id in self._in_flight:
                    return budget
                self._preempt(victim)
                output.num_preempted += 1
                if victim is request:
                    break
            else:
                self._add_scheduled(output, request, num_new)
                scheduled.add(request.request_id)
                budget -= num_new
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int, share: int) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(output.scheduled) < share):
            request = self.waiting[0]
            cached_blocks, num_cached = self.block_manager.find_cached_prefix(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(request, num_new, cached_blocks):
                return
            self.waiting.pop(0)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
                self.prefix_cache_queries += request.num_prompt_tokens
                self.prefix_cache_hits += num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_scheduled(output, request, num_new)
            budget -= num_new

    def _preempt_for_waiting(self, output: SchedulerOutput) -> None:
        """A waiting request that outranks the last running one takes its place when it could not
        start otherwise (no free slot or no KV for its first chunk)."""
        while self.waiting and self.running:
            head, last = self.waiting[0], self.running[-1]
            if self.policy.key(head) >= self.policy.key(last) or last.request_id in self._in_flight:
                return
            first_chunk = min(head.num_tokens, self.config.max_num_batched_tokens)
            if (len(self.running) < self.config.max_num_seqs and self.block_manager.blocks_needed(first_chunk)
                    <= self.block_manager.num_evictable_blocks):
                return
            self._preempt(last)
            output.num_preempted += 1
            self.num_ranked_preemptions += 1

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self.policy.key)

    def _add_scheduled(self, output: SchedulerOutput, request: Request, num_new: int) -> None:
        start = request.num_computed_tokens
        if request.request_id not in self._known_to_workers:
            self._known_to_workers.add(request.request_id)
            output.new_requests.append(NewRequestData(
                request.request_id, request.prompt_token_ids, request.sampling_params))
        output.scheduled.append(ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids(start, start + num_new),
            start_pos=start,
            block_ids=list(self.block_manager.block_table(request.request_id)),
            sample=start + num_new == request.num_tokens,
        ))

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens by what ran, append sampled tokens; returns the requests that
        got a new token (the engine then decides which of them stop)."""
        updated = []
        for scheduled in output.scheduled:
            request = self._in_flight.pop(scheduled.request_id)
            # Finished (say aborted) while in flight: its id may even belong to a new request now.
            if request.status != RequestStatus.RUNNING or self.requests.get(scheduled.request_id) is not request:
                continue
            request.num_computed_tokens += len(scheduled.token_ids)
            if scheduled.sample:
                request.output_token_ids.append(sampled[scheduled.request_id])
                self.policy.on_token(request)
                updated.append(request)
        return updated

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_used_fraction=self.block_manager.num_used_blocks / self.block_manager.num_blocks,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )
