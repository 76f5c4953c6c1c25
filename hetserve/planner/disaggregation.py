"""DistServe's placement: prefill and decode on separate worker groups, each sized for goodput.

Prefill and decode want different things: prefill is compute bound and judged by time to first
token, decode is bandwidth bound and judged by time per output token; colocated, each step of one
delays the other. For every instance shape (tensor x pipeline parallel, on devices of one kind) the
simulator finds the highest request rate one prefill instance serves with `attainment` of its
requests inside the TTFT objective, and likewise a decode instance (its prompts' KV arriving over
the link) inside the TPOT objective. The best shapes per device are then replicated in the ratio
that balances the two rates over the devices there are, and compared with the best colocated
instances under both objectives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hetserve.bench.metrics import SLO
from hetserve.bench.workloads import Request
from hetserve.config import CacheConfig, SchedulerConfig
from hetserve.planner.cost_model import CostModel
from hetserve.planner.partition import device_types
from hetserve.planner.plan import Plan
from hetserve.planner.profile import ClusterProfile
from hetserve.sim.simulator import SimulationResult, Simulator, num_kv_blocks, plan_stages
from hetserve.sim.workload import to_sim_requests

ATTAINMENT = 0.9
RATE_SEARCH_STEPS = 8


@dataclass(frozen=True)
class InstanceRate:
    """One instance shape and the highest rate it serves within its objectives."""

    role: str
    """"prefill", "decode" or "colocated"."""
    plan: Plan
    num_devices: int
    rate: float
    """Requests per second with `attainment` of them meeting the objectives."""

    @property
    def rate_per_device(self) -> float:
        return self.rate / self.num_devices


@dataclass(frozen=True)
class DisaggregationPlan:
    prefill: InstanceRate
    decode: InstanceRate
    num_prefill: int
    num_decode: int
    colocated: InstanceRate | None
    num_colocated: int

    @property
    def goodput(self) -> float:
        """Requests per second the replicated prefill and decode instances sustain together."""
        return min(self.num_prefill * self.prefill.rate, self.num_decode * self.decode.rate)

    @property
    def colocated_goodput(self) -> float:
        return self.num_colocated * self.colocated.rate if self.colocated else 0.0

    def describe(self) -> str:
        lines = [f"disaggregated: {self.num_prefill} prefill x [{self.prefill.plan.describe()}] "
                 f"({self.prefill.rate:.2f} req/s each) + {self.num_decode} decode x "
                 f"[{self.decode.plan.describe()}] ({self.decode.rate:.2f} req/s each): "
                 f"goodput {self.goodput:.2f} req/s"]
        if self.colocated:
            lines.append(f"colocated:     {self.num_colocated} x [{self.colocated.plan.describe()}] "
                         f"({self.colocated.rate:.2f} req/s each): goodput {self.colocated_goodput:.2f} req/s")
        return "\n".join(lines)


@dataclass
class DisaggregationPlanner:
    cost: CostModel
    cluster: ClusterProfile
    workload: Sequence[Request]
    slo: SLO
    scheduler: SchedulerConfig
    cache: CacheConfig
    attainment: float = ATTAINMENT

    def plan(self) -> DisaggregationPlan:
        """The best prefill and decode instance shapes, replicated over the cluster's devices."""
        if self.slo.ttft is None or self.slo.tpot is None:
            raise ValueError("disaggregation needs both a TTFT and a TPOT objective")
        shapes = self.instance_plans()
        prefill = self._best("prefill", shapes)
        decode = self._best("decode", shapes)
        colocated = self._best("colocated", shapes)
        total = len(self.cluster.devices)
        num_prefill, num_decode = balance(prefill, decode, total)
        return DisaggregationPlan(prefill, decode, num_prefill, num_decode, colocated,
                                  total // colocated.num_devices if colocated else 0)

    def instance_plans(self) -> list[tuple[Plan, int]]:
        """Every (tensor x pipeline) instance on devices of one kind and host, TP inside the host."""
        shape = self.cost.shape
        plans = []
        for group in device_types(self.cluster.devices):
            for tp in (1, 2, 4, 8):
                if tp > shape.num_kv_heads or tp > len(group):
                    continue
                for pp in range(1, min(len(group) // tp, shape.num_layers) + 1):
                    devices = [d.plan_device for d in group[:tp * pp]]
                    plan = Plan.from_sizes(shape.num_layers, pp, tp, devices=devices)
                    if len(self.cluster.hosts) > 1:
                        plan = Plan(tuple(replace(s, host=group[0].host) for s in plan.stages))
                    if self._fits(plan):
                        plans.append((plan, tp * pp))
        return plans

    def max_rate(self, role: str, plan: Plan) -> float:
        """Highest request rate (bisection over a log scale) at which the instance meets its objective
        for `attainment` of the requests, and at most what it completes per second when saturated:
        past that a queue grows without bound, even where the latency of a short run looks fine."""
        capacity = self._capacity(role, plan)
        low, high = capacity / 64, capacity
        if self._attainment(role, plan, low) < self.attainment:
            return 0.0
        if self._attainment(role, plan, high) >= self.attainment:
            return capacity
        for _ in range(RATE_SEARCH_STEPS):
            middle = (low * high) ** 0.5
            low, high = (middle, high) if self._attainment(role, plan, middle) >= self.attainment else (low, middle)
        return low

    # -- internals -----------------------------------------------------------------------------

    def _best(self, role: str, shapes: list[tuple[Plan, int]]) -> InstanceRate | None:
        rates = [InstanceRate(role, plan, size, self.max_rate(role, plan)) for plan, size in shapes]
        rates = [r for r in rates if r.rate > 0]
        if not rates and role != "colocated":
            raise ValueError(f"no {role} instance meets the objectives ({self.slo}) even at a low request rate; "
                             f"relax the objectives or plan for faster devices")
        return max(rates, key=lambda r: r.rate_per_device, default=None)

    def _fits(self, plan: Plan) -> bool:
        """Whether every worker holds its weights and at least one KV block."""
        stages = plan_stages(plan, self.cluster, self.cost.shape.num_kv_heads)
        return num_kv_blocks(self.cost, plan, stages, self.cache) > 0

    def _simulate(self, role: str, plan: Plan, rate: float) -> SimulationResult:
        stages = plan_stages(plan, self.cluster, self.cost.shape.num_kv_heads)
        link = self.cluster.intra_host if len(self.cluster.hosts) == 1 else self.cluster.inter_host
        simulator = Simulator(self.cost, stages, self.scheduler, num_kv_blocks(self.cost, plan, stages, self.cache),
                              self.cache.block_size, self.cache.enable_prefix_caching,
                              self.cluster.engine_step_overhead, self.cluster.engine_request_overhead,
                              prefilled_link=link if role == "decode" else None)
        requests = self.workload if role != "prefill" else [replace(r, max_tokens=1) for r in self.workload]
        gap = 0.0 if math.isinf(rate) else 1.0 / rate
        return simulator.run(to_sim_requests(requests, [i * gap for i in range(len(requests))]))

    def _attainment(self, role: str, plan: Plan, rate: float) -> float:
        objective = {"prefill": SLO(ttft=self.slo.ttft), "decode": SLO(tpot=self.slo.tpot),
                     "colocated": SLO(ttft=self.slo.ttft, tpot=self.slo.tpot)}[role]
        results = self._simulate(role, plan, rate).results
        return sum(map(objective.met_by, results)) / len(results)

    def _capacity(self, role: str, plan: Plan) -> float:
        """Requests per second the instance completes when they all arrive at once."""
        run = self._simulate(role, plan, rate=math.inf)
        return len(run.results) / max(run.duration, 1e-9)


def balance(prefill: InstanceRate, decode: InstanceRate, num_devices: int) -> tuple[int, int]:
    """Instance counts within `num_devices` maximizing the slower phase's total rate."""
    best = (0.0, 0, 0)
    for num_prefill in range(1, num_devices // prefill.num_devices + 1):
        left = num_devices - num_prefill * prefill.num_devices
        num_decode = left // decode.num_devices
        if num_decode < 1:
            break
        rate = min(num_prefill * prefill.rate, num_decode * decode.rate)
        best = max(best, (rate, num_prefill, num_decode))
    if best[1] == 0:
        raise ValueError(f"{num_devices} devices cannot hold a prefill instance of {prefill.num_devices} and a "
                         f"decode instance of {decode.num_devices}")
    return best[1], best[2]

