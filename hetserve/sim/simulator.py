"""Discrete-event simulation of the engine serving a workload on a plan.

The real Scheduler and BlockManager from hetserve.core decide every step, exactly as in LLMEngine:
up to one step in flight per pipeline stage, chunked prefill, prefix caching, preemption. Only the
forward pass is replaced, by the cost model's time for each stage; stages run as a pipeline, so a
step enters a stage when both the step ahead of it has left and its own activations have arrived.
The per-request results are the ones `hetserve bench` records, so its metrics and reports apply."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from hetserve.bench.load import RequestResult
from hetserve.config import CPU_DEFAULT_KV_CACHE_CAP, CacheConfig, SchedulerConfig
from hetserve.core import BlockManager, Request, RequestStatus, Scheduler, SchedulerOutput
from hetserve.planner.cost_model import CostModel, Rank, StepShape
from hetserve.planner.plan import Plan, even_split
from hetserve.planner.profile import ClusterProfile, DeviceProfile, Link
from hetserve.sampling_params import SamplingParams



@dataclass(frozen=True)
class SimStage:
    """A pipeline stage as the cost model sees it."""

    ranks: tuple[Rank, ...]
    num_layers: int
    link_in: Link | None
    """Link the activations arrive over from the previous stage; None for the first stage."""
    tp_link: Link | None = None


@dataclass(frozen=True)
class SimRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float


@dataclass
class SimulationResult:
    results: list[RequestResult]
    duration: float
    num_steps: int
    num_preemptions: int
    busy_time: list[float] = field(default_factory=list)
    """Seconds each stage spent computing."""


@dataclass
class _Active:
    request: Request
    result: RequestResult
    sent: float
    last_token: float = 0.0


def plan_stages(plan: Plan, cluster: ClusterProfile, num_kv_heads: int) -> list[SimStage]:
    """The cost-model view of `plan` on `cluster`: each worker's device profile and, where workers
    share a CPU, its share of the cores."""
    devices = [[_find_device(cluster, name, stage.host) for name in stage.devices] for stage in plan.stages]
    sharing = Counter(device.name for stage in devices for device in stage)
    stages, previous = [], None
    for stage, stage_devices in zip(plan.stages, devices):
        heads = stage.kv_heads or even_split(num_kv_heads, stage.tp_size)
        ranks = tuple(Rank(device, count, max(1, device.cores // sharing[device.name]) if device.kind == "cpu"
                           else None) for device, count in zip(stage_devices, heads))
        tp_link = cluster.intra_host if len(ranks) > 1 else None
        link_in = None if previous is None else cluster.link(previous, stage_devices[0])
        stages.append(SimStage(ranks, stage.num_layers, link_in, tp_link))
        previous = stage_devices[-1]
    return stages


def _find_device(cluster: ClusterProfile, name: str, host: str | None) -> DeviceProfile:
    candidates = [d for d in cluster.devices if host is None or d.host == host]
    if name == "auto":
        name = next((d.plan_device for d in candidates if d.kind == "cuda"), "cpu")
    for device in candidates:
        if device.plan_device == name or device.name == name:
            return device
    where = f" on host {host}" if host else ""
    raise ValueError(f"the plan uses device {name!r}{where}, which the device profile does not have "
                     f"(it has {', '.join(d.name for d in cluster.devices)})")


def num_kv_blocks(cost: CostModel, plan: Plan, stages: Sequence[SimStage], cache: CacheConfig) -> int:
    """KV blocks as the engine would size them: the smallest number any worker fits, each worker
    taking its plan's KV memory, the cache config's, or a fraction of its free memory."""
    if cache.num_kv_blocks:
        return cache.num_kv_blocks
    fewest = None
    for index, (plan_stage, stage) in enumerate(zip(plan.stages, stages)):
        for tp_rank, rank in enumerate(stage.ranks):
            budget = plan_stage.kv_cache_memory or cache.kv_cache_memory
            if budget is None:
                weights = cost.stage_weight_bytes(stage.num_layers, rank.kv_heads, index == 0,
                                                  index == len(stages) - 1, tp_rank)
                budget = int((rank.device.memory - weights) * cache.kv_cache_memory_fraction)
                if rank.device.kind == "cpu":
                    budget = min(budget, CPU_DEFAULT_KV_CACHE_CAP)
            per_block = cache.block_size * stage.num_layers * cost.shape.kv_bytes_per_token(rank.kv_heads)
            blocks = int(budget // per_block)
            fewest = blocks if fewest is None else min(fewest, blocks)
    return fewest


class Simulator:
    def __init__(self, cost: CostModel, stages: Sequence[SimStage], scheduler: SchedulerConfig,
                 num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 engine_step_overhead: float = 0.0, engine_request_overhead: float = 0.0,
                 max_concurrency: int | None = None, prefilled_link: Link | None = None):
        """`prefilled_link`: simulate a decode-only worker group (DistServe): prompts arrive with
        their KV computed elsewhere, costing its transfer over this link instead of a prefill."""
        if num_blocks < 1:
            raise ValueError("the KV cache holds no block: give the workers more memory")
        self.cost = cost
        self.stages = list(stages)
        self.scheduler_config = scheduler
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.engine_step_overhead = engine_step_overhead
        self.engine_request_overhead = engine_request_overhead
        self.max_concurrency = max_concurrency
        self.prefilled_link = prefilled_link

    def run(self, requests: Sequence[SimRequest]) -> SimulationResult:
        """Serve `requests` (sent at their arrival times, at most max_concurrency at once) to the end."""
        block_manager = BlockManager(self.num_blocks, self.block_size, self.enable_prefix_caching)
        scheduler = Scheduler(self.scheduler_config, block_manager, len(self.stages))
        pending = deque(sorted(enumerate(requests), key=lambda item: item[1].arrival_time))
        results: list[RequestResult | None] = [None] * len(requests)
        active: dict[str, _Active] = {}
        in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        self._stage_free = [0.0] * len(self.stages)
        self._busy = [0.0] * len(self.stages)
        now, steps = 0.0, 0
        while pending or active:
            self._admit(pending, active, scheduler, results, now)
            while len(in_flight) < len(self.stages):
                output = scheduler.schedule()
                if not output.scheduled:
                    break
                in_flight.append((output, self._execute(output, now, scheduler)))
                steps += 1
            if not in_flight:
                if not pending or (self.max_concurrency and len(active) >= self.max_concurrency):
                    raise RuntimeError("simulation stalled: requests wait but none can be scheduled")
                now = max(now, pending[0][1].arrival_time)
                continue
            output, done = in_flight.popleft()
            now = max(now, done) + self.engine_step_overhead + self.engine_request_overhead * len(output.scheduled)
            self._record(output, scheduler, active, now)
        duration = max((r.start + r.e2e for r in results if r is not None), default=0.0) or 1e-9
        return SimulationResult([r for r in results if r is not None], duration, steps,
                                scheduler.num_preemptions, self._busy)

    def _admit(self, pending: deque, active: dict[str, _Active], scheduler: Scheduler,
               results: list, now: float) -> None:
        while pending and pending[0][1].arrival_time <= now:
            if self.max_concurrency and len(active) >= self.max_concurrency:
                return
            index, sim_request = pending.popleft()
            num_tokens = len(sim_request.prompt_token_ids) + sim_request.max_tokens
            result = RequestResult(success=True, prompt_len=len(sim_request.prompt_token_ids), start=now)
            results[index] = result
            if scheduler.block_manager.blocks_needed(num_tokens) > self.num_blocks:
                # The engine rejects such a request up front (HTTP 400); a benchmark counts it as failed.
                result.success, result.error = False, f"{num_tokens} tokens do not fit the KV cache"
                continue
            params = SamplingParams(max_tokens=sim_request.max_tokens, ignore_eos=True)
            request = Request(str(index), list(sim_request.prompt_token_ids), params, arrival_time=now)
            active[request.request_id] = _Active(request, result, now)
            scheduler.add_request(request)

    def _execute(self, output: SchedulerOutput, now: float, scheduler: Scheduler) -> float:
        """When the step that starts now leaves the last stage."""
        step, transferred = self._step_shape(output, scheduler)
        ready = now
        if transferred and self.prefilled_link is not None:
            kv_bytes = transferred * self.cost.shape.num_layers * self.cost.shape.kv_bytes_per_token()
            ready += self.prefilled_link.transfer_time(kv_bytes)
        for index, stage in enumerate(self.stages):
            if stage.link_in is not None:
                ready += self.cost.activation_transfer_time(stage.link_in, step.tokens)
            start = max(ready, self._stage_free[index])
            busy = self.cost.stage_time(stage.ranks, stage.num_layers, step, index == len(self.stages) - 1,
                                        stage.tp_link)
            ready = self._stage_free[index] = start + busy
            self._busy[index] += busy
        return ready

    def _step_shape(self, output: SchedulerOutput, scheduler: Scheduler) -> tuple[StepShape, int]:
        """The step's work, and how many prompt tokens it takes over from a prefill group instead."""
        chunks, transferred = [], 0
        for scheduled in output.scheduled:
            num_new = len(scheduled.token_ids)
            if self.prefilled_link is not None:
                prompt_len = scheduler.requests[scheduled.request_id].num_prompt_tokens
                prompt_part = max(0, min(prompt_len, scheduled.start_pos + num_new) - scheduled.start_pos)
                # Its last prompt token is computed here, as it yields the first sampled token's KV.
                if prompt_part > 0 and scheduled.sample:
                    transferred += num_new - 1
                    chunks.append((scheduled.start_pos + num_new - 1, 1, True))
                    continue
                if prompt_part > 0:
                    transferred += num_new
                    continue
            chunks.append((scheduled.start_pos, num_new, scheduled.sample))
        return StepShape.from_chunks(chunks), transferred

    def _record(self, output: SchedulerOutput, scheduler: Scheduler, active: dict[str, _Active],
                now: float) -> None:
        sampled = {s.request_id: 0 for s in output.scheduled if s.sample}
        for request in scheduler.update_from_output(output, sampled):
            entry = active[request.request_id]
            result = entry.result
            if result.output_tokens == 0:
                result.ttft = now - entry.sent
            else:
                result.itl.append(now - entry.last_token)
            entry.last_token = now
            result.output_tokens += 1
            if result.output_tokens >= request.sampling_params.max_tokens:
                result.e2e = now - entry.sent
                scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_LENGTH)
                del active[request.request_id]
