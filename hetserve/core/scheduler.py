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
from hetserve.core.swap import HostBlockPool, PreemptionCosts


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_used_fraction: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_swapped_out: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, num_microbatches: int = 1,
                 num_host_blocks: int = 0):
        """`num_microbatches`: steps kept in flight at once (one per pipeline stage). Each step then
        takes only its share of the requests, so the stages work on different steps at the same time
        instead of one step carrying every request while the other stages idle.
        `num_host_blocks`: the swap space, in blocks."""
        self.config = config
        self.block_manager = block_manager
        self.num_microbatches = num_microbatches
        self.host_pool = HostBlockPool(num_host_blocks if config.preemption_mode != "recompute" else 0)
        self.preemption_costs = PreemptionCosts()
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
        self._unsent_swap_outs: list[tuple[int, int]] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.num_ranked_preemptions = 0
        """Of those, preemptions that made room for a better-ranked waiting request."""
        self.num_swapped_out = 0

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
            self.host_pool.release(request.host_blocks)
            request.host_blocks = []
            self.policy.remove(request)
            if request_id in self._known_to_workers:
                self._known_to_workers.discard(request_id)
                self._finished_since_last_step.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(finished_request_ids=self._finished_since_last_step,
                                 blocks_to_swap_out=self._unsent_swap_outs)
        self._finished_since_last_step, self._unsent_swap_outs = [], []
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
            # Nothing runs, so no worker hears of this step: keep its news for the next. The swapped-out
            # blocks are not overwritten before then, since only a step that runs writes KV.
            self._finished_since_last_step, output.finished_request_ids = output.finished_request_ids, []
            self._unsent_swap_outs, output.blocks_to_swap_out = output.blocks_to_swap_out, []
        else:
            output.sink_rewrites = self.block_manager.take_sink_rewrites()
        for scheduled in output.scheduled:
            self._in_flight[scheduled.request_id] = self.requests[scheduled.request_id]
        self.host_pool.end_step()
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int, share: int) -> int:
        scheduled: set[str] = set()
        for request in list(self.running):
            if budget <= 0 or len(output.scheduled) >= share:
                break
            if request.request_id in self._in_flight or request.status != RequestStatus.RUNNING:
                continue
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new):
                # Out of KV: recompute the newest request later. If it is scheduled or in flight,
                # wait for it rather than preempt an older one: newest-first keeps the oldest
                # request always progressing.
                victim = self.running[-1]
                if victim.request_id in scheduled or victim.request_id in self._in_flight:
                    return budget
                self._preempt(victim, output)
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
            if request.host_blocks:
                num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
                if not self._swap_in(request, output, num_new):
                    return
            else:
                cached_blocks, num_cached = self.block_manager.find_cached_prefix(request)
                num_new = self._num_new_tokens(request, num_cached, budget)
                if not self.block_manager.allocate(request, num_new, cached_blocks):
                    return
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_cached
                    self.prefix_cache_queries += request.num_prompt_tokens
                    self.prefix_cache_hits += num_cached
                request.num_computed_tokens = num_cached
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_scheduled(output, request, num_new)
            budget -= num_new

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        # Under a sliding window a chunk is at most a window long, so that its first tokens too see
        # no more than the sinks and about a window of context.
        return min(request.num_tokens - num_computed, budget, self.block_manager.sliding_window or budget)

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
            self._preempt(last, output)
            self.num_ranked_preemptions += 1

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        """Back to the queue, with its KV swapped out to host RAM or dropped for recomputation."""
        self.running.remove(request)
        table = self.block_manager.block_table(request.request_id)
        host_blocks = self._swap_space_for(request, self.block_manager.blocks_needed(request.num_computed_tokens))
        if host_blocks is not None:
            output.blocks_to_swap_out.extend(zip(table, host_blocks))
            request.host_blocks = host_blocks
            self.num_swapped_out += 1
        else:
            request.num_computed_tokens = request.cache_offset = 0
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        output.num_preempted += 1
        self._enqueue(request)

    def _swap_space_for(self, request: Request, num_blocks: int) -> list[int] | None:
        # A slid window's table no longer maps positions to blocks one to one: such requests recompute.
        if num_blocks == 0 or request.cache_offset or (self.config.preemption_mode == "auto" and not
                               self.preemption_costs.prefers_swap(request.num_computed_tokens, num_blocks)):
            return None
        return self.host_pool.take(num_blocks)

    def _swap_in(self, request: Request, output: SchedulerOutput, num_new: int) -> bool:
        """Device blocks for a swapped-out request's KV and its next tokens; False if there is no room."""
        if not self.block_manager.allocate(request, num_new):
            return False
        table = self.block_manager.block_table(request.request_id)
        output.blocks_to_swap_in.extend(zip(request.host_blocks, table))
        self.host_pool.release(request.host_blocks)
        request.host_blocks = []
        return True

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
            cache_offset=request.cache_offset,
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
            num_swapped_out=self.num_swapped_out,
        )
