"""Pipeline and tensor partition planner (PipeEdge, HexGen): which devices run which contiguous
layers, so that the slowest pipeline stage is as fast as it can be at a target step while every
worker holds its weights, its activation scratch and the KV cache the request asks for.

A stage is one device, or a tensor-parallel group of k identical devices on one host (KV heads
split with `even_split`). Its time is the cost model's stage time plus the transfer of hidden
states from the previous stage; the largest of these (the bottleneck) sets the pipeline's
throughput, their sum its latency.

The search is a dynamic program. Devices that differ only in their names form a type, and the
best placement of the layers still to place depends only on the state

    (layers placed so far, devices left of each type, type of the previous stage)

because the next stage's time depends only on its unit (k devices of one type), its number of
layers n, whether it is first or last, and (for the transfer in) the previous stage's type.
Minimizing max(this stage, best of the rest) over (unit, n) is exact for the bottleneck. A second
pass, holding every stage to that bottleneck, minimizes the latency exactly, then prefers more KV
tokens (greedily per state). There are (L + 1) * prod(count_t + 1) * (T + 1) states: polynomial in
the devices for a fixed number of types, so 16 devices of 2 types plan in a tenth of a second, but
exponential in the number of types (16 all-different devices take a minute).
`exhaustive_partition` tries every ordering and split, to check the DP on small clusters.

Memory decides which placements are allowed: a rank holds its weights (the embedding on the first
stage, the LM head on the last), the activations of `max_batched_tokens` and `kv_tokens` of KV for
its layers. A stage with fewer layers holds more tokens per byte, so a small device is given fewer
layers instead of capping the KV cache of the whole pipeline. Pure Python, no torch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from itertools import combinations
from typing import NamedTuple

from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape
from hetserve.planner.plan import Plan, Stage, even_split
from hetserve.planner.profile import DTYPE_BYTES, ClusterProfile, DeviceProfile

StageDevices = tuple[DeviceProfile, ...]
"""The devices of one stage, one per tensor-parallel rank."""
Layout = list[tuple[StageDevices, int]]
"""Stages in pipeline order: their devices and number of layers."""
Score = tuple[float, int, float]
"""(bottleneck, latency in picoseconds, -KV tokens) of a layout or of its last stages; smaller is
better. Integer latencies sum to the same value in any order, so equal ones tie exactly."""


class InfeasiblePlanError(ValueError):
    """No placement holds the model, its activations and the requested KV cache."""


@dataclass(frozen=True)
class PartitionRequest:
    step: StepShape
    """The step the pipeline must run fast, e.g. StepShape.decode(batch, context)."""
    kv_tokens: int
    """KV-cache tokens every worker must hold for its layers (e.g. max_num_seqs x max_model_len)."""
    max_batched_tokens: int = 2048
    """Tokens of the largest step: sizes the activation scratch every worker reserves."""
    tp_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Tensor-parallel group sizes a stage may have."""
    use_all_devices: bool = False
    """Give every device a stage, even where leaving it out would be as fast."""

    def __post_init__(self) -> None:
        if self.kv_tokens < 1:
            raise ValueError(f"kv_tokens must be at least 1, got {self.kv_tokens}")
        if self.step.tokens > self.max_batched_tokens:
            raise ValueError(f"the target step has {self.step.tokens} tokens, more than "
                             f"max_batched_tokens {self.max_batched_tokens}")
        if not self.tp_sizes or min(self.tp_sizes) < 1:
            raise ValueError(f"tp_sizes must be positive, got {self.tp_sizes}")


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one worker puts in its device's memory."""

    device: str
    """Profile name of the device."""
    memory: int
    """Bytes the device may fill."""
    weights: float
    activations: float
    kv_cache: float

    @property
    def used(self) -> float:
        return self.weights + self.activations + self.kv_cache

    @property
    def free(self) -> float:
        return self.memory - self.used

    def breakdown(self) -> str:
        return (f"weights {_gib(self.weights)}, activations {_gib(self.activations)}, "
                f"KV cache {_gib(self.kv_cache)}")


@dataclass(frozen=True)
class StageEstimate:
    """One stage's predicted time per target step and its workers' memory."""

    compute: float
    """Seconds of the target step through the stage (the cost model's stage time)."""
    transfer_in: float
    """Seconds to receive the previous stage's hidden states; 0 on the first stage."""
    memory: tuple[DeviceMemory, ...]
    """One per tensor-parallel rank."""

    @property
    def time(self) -> float:
        return self.compute + self.transfer_in


@dataclass(frozen=True)
class Partition:
    """A plan with what the cost model predicts for it."""

    plan: Plan
    stages: tuple[StageEstimate, ...]
    """One per stage of the plan, in order."""
    kv_tokens: int
    """KV tokens every worker holds under the plan (the fewest any worker fits)."""

    @property
    def bottleneck(self) -> float:
        """Seconds per step of the slowest stage: the pipeline's time between steps when full."""
        return max(stage.time for stage in self.stages)

    @property
    def latency(self) -> float:
        return sum(stage.time for stage in self.stages)

    @property
    def memory(self) -> tuple[DeviceMemory, ...]:
        """Every worker's memory, in rank order."""
        return tuple(rank for stage in self.stages for rank in stage.memory)

    def describe(self) -> str:
        lines = [_describe_stage(index, stage, estimate)
                 for index, (stage, estimate) in enumerate(zip(self.plan.stages, self.stages))]
        lines.append(f"bottleneck {_ms(self.bottleneck)}/step ({1 / self.bottleneck:.1f} steps/s), "
                     f"latency {_ms(self.latency)}, KV cache {self.kv_tokens:,} tokens")
        lines += [f"  {rank.device}: {_gib(rank.used)} of {_gib(rank.memory)} ({rank.breakdown()})"
                  for rank in self.memory]
        return "\n".join(lines)


def _describe_stage(index: int, stage: Stage, estimate: StageEstimate) -> str:
    devices = "+".join(rank.device for rank in estimate.memory)
    host = f" at {stage.host}" if stage.host else ""
    return (f"stage {index}: layers [{stage.start}, {stage.end}) on {devices}{host}: "
            f"{_ms(estimate.compute)} + {_ms(estimate.transfer_in)} transfer in")


def plan_partition(cost: CostModel, cluster: ClusterProfile, request: PartitionRequest) -> Partition:
    """The placement with the fastest bottleneck stage at `request.step` that fits in memory."""
    estimator = _Estimator(cost, cluster, request)
    types = device_types(cluster.devices)
    fastest = _Search(estimator, types).solve()
    if fastest is None:
        raise _infeasible_error(estimator)
    # The first search is exact for the bottleneck, but its tie-breaks are greedy per state: it may
    # split stages after the bottleneck to speed them up for nothing. Holding every stage to that
    # bottleneck, the second minimizes latency exactly.
    (bottleneck, _, _), _ = fastest
    _, layout = _Search(estimator, types, limit=bottleneck).solve()
    return estimator.partition(layout)


def exhaustive_partition(cost: CostModel, cluster: ClusterProfile, request: PartitionRequest) -> Partition:
    """What plan_partition finds, by trying every ordered sequence of stage units and every split of
    the layers among them: exponential, for checking the DP on small clusters."""
    estimator = _Estimator(cost, cluster, request)
    scored = ((score, layout) for layout in _all_layouts(estimator)
              if (score := estimator.score(layout)) is not None)
    best = min(scored, key=lambda candidate: candidate[0], default=None)
    if best is None:
        raise _infeasible_error(estimator)
    return estimator.partition(best[1])


def uniform_partition(cost: CostModel, cluster: ClusterProfile, request: PartitionRequest,
                      devices: Sequence[DeviceProfile]) -> Partition | None:
    """The split a uniform engine (vLLM) requires: one stage per device in the given order, layers as
    even as possible; None when a device cannot hold its share with the requested KV cache."""
    estimator = _Estimator(cost, cluster, request)
    layout = [((device,), count) for device, count in zip(devices, even_split(cost.shape.num_layers, len(devices)))]
    return estimator.partition(layout) if estimator.score(layout) is not None else None


def device_types(devices: Sequence[DeviceProfile]) -> list[StageDevices]:
    """Devices grouped by everything but their names (host and performance alike), in first-seen
    order: the devices of a type are interchangeable in a plan."""
    groups: dict[tuple, list[DeviceProfile]] = {}
    for device in devices:
        groups.setdefault(_type_key(device), []).append(device)
    return [tuple(group) for group in groups.values()]


def _type_key(device: DeviceProfile) -> tuple:
    return tuple(_hashable(getattr(device, f.name)) for f in fields(device) if f.name not in ("name", "device"))


def _hashable(value: object) -> object:
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


class _Estimator:
    """Stage times and memory fits of one cost model, cluster and request."""

    def __init__(self, cost: CostModel, cluster: ClusterProfile, request: PartitionRequest):
        self.cost, self.cluster, self.request = cost, cluster, request
        self.num_layers = cost.shape.num_layers
        self.activations = cost.shape.activation_bytes(request.max_batched_tokens)
        self.tp_sizes = tuple(size for size in request.tp_sizes if size <= cost.shape.num_kv_heads)

    def ranks(self, devices: StageDevices) -> tuple[Rank, ...]:
        heads = even_split(self.cost.shape.num_kv_heads, len(devices))
        return tuple(Rank(device, count) for device, count in zip(devices, heads))

    def stage_time(self, devices: StageDevices, num_layers: int, is_last: bool) -> float:
        tp_link = self.cluster.intra_host if len(devices) > 1 else None
        return self.cost.stage_time(self.ranks(devices), num_layers, self.request.step, is_last, tp_link)

    def transfer_time(self, previous: DeviceProfile | None, device: DeviceProfile) -> float:
        if previous is None:
            return 0.0
        return self.cost.activation_transfer_time(self.cluster.link(previous, device), self.request.step.tokens)

    def stage_memory(self, devices: StageDevices, num_layers: int, is_first: bool, is_last: bool,
                     kv_tokens: int) -> tuple[DeviceMemory, ...]:
        """What each rank of the stage holds with `kv_tokens` of KV cache for its layers."""
        cost = self.cost
        return tuple(
            DeviceMemory(rank.device.name, rank.device.memory,
                         cost.stage_weight_bytes(num_layers, rank.kv_heads, is_first, is_last, tp_rank),
                         self.activations, kv_tokens * num_layers * cost.shape.kv_bytes_per_token(rank.kv_heads))
            for tp_rank, rank in enumerate(self.ranks(devices)))

    def kv_tokens(self, devices: StageDevices, num_layers: int, is_first: bool, is_last: bool) -> int:
        """KV tokens every rank of the stage fits beside its weights and activations."""
        without_kv = self.stage_memory(devices, num_layers, is_first, is_last, kv_tokens=0)
        return min(self.cost.kv_tokens_capacity(rank.free, num_layers, heads.kv_heads)
                   for rank, heads in zip(without_kv, self.ranks(devices)))

    def score(self, layout: Layout) -> Score | None:
        """None where a stage cannot hold the requested KV tokens."""
        score, previous = (0.0, 0, -math.inf), None
        for index, (devices, num_layers) in enumerate(layout):
            is_last = index == len(layout) - 1
            kv_tokens = self.kv_tokens(devices, num_layers, index == 0, is_last)
            if kv_tokens < self.request.kv_tokens:
                return None
            time = self.stage_time(devices, num_layers, is_last) + self.transfer_time(previous, devices[0])
            score, previous = _combine(score, time, kv_tokens), devices[-1]
        return score

    def partition(self, layout: Layout) -> Partition:
        kv_tokens = min(self.kv_tokens(devices, num_layers, index == 0, index == len(layout) - 1)
                        for index, (devices, num_layers) in enumerate(layout))
        stages, estimates, start, previous = [], [], 0, None
        for index, (devices, num_layers) in enumerate(layout):
            is_last = index == len(layout) - 1
            memory = self.stage_memory(devices, num_layers, index == 0, is_last, kv_tokens)
            estimates.append(StageEstimate(self.stage_time(devices, num_layers, is_last),
                                           self.transfer_time(previous, devices[0]), memory))
            stages.append(self._plan_stage(start, devices, num_layers, max(rank.kv_cache for rank in memory)))
            start, previous = start + num_layers, devices[-1]
        return Partition(Plan(tuple(stages)), tuple(estimates), kv_tokens)

    def _plan_stage(self, start: int, devices: StageDevices, num_layers: int, kv_cache: float) -> Stage:
        # Every rank gets the budget of the rank with the most heads: the engine sizes the cache by the
        # worker that fits the fewest blocks, and each worker then allocates only its own heads' share.
        heads = tuple(rank.kv_heads for rank in self.ranks(devices))
        return Stage(start, start + num_layers, tuple(device.plan_device for device in devices),
                     heads if len(set(heads)) > 1 else None,
                     devices[0].host if len(self.cluster.hosts) > 1 else None, int(kv_cache))


def _combine(rest: Score, time: float, kv_tokens: int) -> Score:
    """The score of a stage taking `time` and fitting `kv_tokens`, followed (or preceded) by `rest`."""
    return max(rest[0], time), rest[1] + round(time * 1e12), max(rest[2], -kv_tokens)


class _Choice(NamedTuple):
    score: Score
    unit: tuple[int, int] | None
    """(type index, tensor-parallel size) of the next stage; None once every layer is placed."""
    num_layers: int


class _Search:
    """The DP over (layers placed, devices left per type, previous stage's type). Types with the same
    links to every type share a state: the previous stage matters only through its link to the next."""

    def __init__(self, estimator: _Estimator, types: list[StageDevices], limit: float = math.inf):
        self.estimator = estimator
        self.types = types
        self.limit = limit
        """No stage may take longer; below it every layout ties on the bottleneck and latency decides."""
        self.empty: Score = (0.0 if limit == math.inf else limit, 0, -math.inf)
        self.units = [(index, size) for index, group in enumerate(types)
                      for size in estimator.tp_sizes if size <= len(group)]
        transfers = [[estimator.transfer_time(group[0], other[0]) for other in types] for group in types]
        self.link_class = [transfers.index(row) for row in transfers]
        self.transfer_in = {None: [0.0] * len(types), **dict(enumerate(transfers))}
        """Transfer time into a stage of each type, by the previous stage's type (None: first stage)."""
        self._stages: dict[tuple, tuple[float, int]] = {}
        self._choices: dict[tuple, _Choice | None] = {}

    def solve(self) -> tuple[Score, Layout] | None:
        """The best layout and its score, each type's devices taken in the cluster's order; None if
        nothing fits."""
        pools = [list(group) for group in self.types]
        layout, placed, remaining, previous = [], 0, tuple(len(group) for group in self.types), None
        first = self.best(placed, remaining, previous)
        if first is None:
            return None
        while placed < self.estimator.num_layers:
            choice = self.best(placed, remaining, previous)
            (index, size), num_layers = choice.unit, choice.num_layers
            layout.append((tuple(pools[index][:size]), num_layers))
            pools[index] = pools[index][size:]
            placed, remaining, previous = placed + num_layers, _take(remaining, index, size), index
        return first.score, layout

    def best(self, placed: int, remaining: tuple[int, ...], previous: int | None) -> _Choice | None:
        state = (placed, remaining, None if previous is None else self.link_class[previous])
        if state not in self._choices:
            self._choices[state] = self._search(placed, remaining, previous)
        return self._choices[state]

    def _search(self, placed: int, remaining: tuple[int, ...], previous: int | None) -> _Choice | None:
        if placed == self.estimator.num_layers:
            done = not (self.estimator.request.use_all_devices and any(remaining))
            return _Choice(self.empty, None, 0) if done else None
        best = None
        for unit in self.units:
            if remaining[unit[0]] >= unit[1]:
                best = self._search_layers(placed, remaining, previous, unit, best)
        return best

    def _search_layers(self, placed: int, remaining: tuple[int, ...], previous: int | None,
                       unit: tuple[int, int], best: _Choice | None) -> _Choice | None:
        """`best`, or a better choice that puts the next stage on `unit`."""
        index, size = unit
        transfer = self.transfer_in[previous][index]
        left = _take(remaining, index, size)
        for num_layers in range(1, self.estimator.num_layers - placed + 1):
            compute, kv_tokens = self._stage(unit, num_layers, placed == 0,
                                             placed + num_layers == self.estimator.num_layers)
            time = compute + transfer
            # More layers only make this stage slower and leave it less room.
            if kv_tokens < self.estimator.request.kv_tokens or time > self.limit or \
                    (best is not None and time > best.score[0]):
                break
            rest = self.best(placed + num_layers, left, index)
            if rest is not None:
                score = _combine(rest.score, time, kv_tokens)
                if best is None or score < best.score:
                    best = _Choice(score, unit, num_layers)
        return best

    def _stage(self, unit: tuple[int, int], num_layers: int, is_first: bool,
               is_last: bool) -> tuple[float, int]:
        """(stage time, KV tokens it fits) of `unit` holding `num_layers` layers."""
        key = (unit, num_layers, is_first, is_last)
        if key not in self._stages:
            devices = self.types[unit[0]][:unit[1]]
            self._stages[key] = (self.estimator.stage_time(devices, num_layers, is_last),
                                 self.estimator.kv_tokens(devices, num_layers, is_first, is_last))
        return self._stages[key]


def _take(remaining: tuple[int, ...], index: int, count: int) -> tuple[int, ...]:
    return remaining[:index] + (remaining[index] - count,) + remaining[index + 1:]


def _all_layouts(estimator: _Estimator) -> Iterator[Layout]:
    devices = estimator.cluster.devices
    for units in _unit_sequences(devices, estimator.tp_sizes):
        if estimator.request.use_all_devices and sum(len(unit) for unit in units) < len(devices):
            continue
        for counts in _compositions(estimator.num_layers, len(units)):
            yield list(zip(units, counts))


def _unit_sequences(devices: StageDevices, sizes: tuple[int, ...]) -> Iterator[tuple[StageDevices, ...]]:
    """Every non-empty ordered sequence of disjoint stage units drawn from `devices`."""
    for size in sizes:
        for unit in combinations(devices, size):
            if len({_type_key(device) for device in unit}) == 1:
                yield (unit,)
                rest = tuple(device for device in devices if device not in unit)
                yield from ((unit,) + tail for tail in _unit_sequences(rest, sizes))


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write `total` as an ordered sum of `parts` positive integers."""
    for cuts in combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(end - start for start, end in zip(bounds, bounds[1:]))


# -- when nothing fits ----------------------------------------------------------------------------


def _infeasible_error(estimator: _Estimator) -> InfeasiblePlanError:
    lacking = [(rank, layers) for rank, layers in _spread_by_memory(estimator) if rank.free < 0]
    return _memory_error(estimator, lacking) if lacking else _shape_error(estimator)


def _memory_error(estimator: _Estimator, lacking: list[tuple[DeviceMemory, int]]) -> InfeasiblePlanError:
    shape, request, num_devices = estimator.cost.shape, estimator.request, len(estimator.cluster.devices)
    shortages = "; ".join(f"{rank.device} lacks {_gib(-rank.free)} (needs {_gib(rank.used)} of "
                          f"its {_gib(rank.memory)} for {layers} layers: {rank.breakdown()})"
                          for rank, layers in lacking)
    per_thousand = 1000 * shape.num_layers * shape.kv_bytes_per_token()
    return InfeasiblePlanError(
        f"no plan fits the {shape.num_layers} layers with a KV cache of {request.kv_tokens:,} tokens on "
        f"{num_devices} device{'s' if num_devices > 1 else ''}. With one stage per device and the layers "
        f"placed by memory, {shortages}. To fit: add devices{_quantization_hint(shape)}; offload weights "
        f"to CPU memory or disk; or lower --kv-tokens / max_model_len (1,000 tokens of KV cache take "
        f"{_gib(per_thousand)}) or --max-batched-tokens (activations).")


def _shape_error(estimator: _Estimator) -> InfeasiblePlanError:
    shape, request = estimator.cost.shape, estimator.request
    all_devices = f", and use_all_devices a stage on each of the {len(estimator.cluster.devices)} devices" \
        if request.use_all_devices else ""
    return InfeasiblePlanError(
        f"the model fits in the devices' memory, but no plan has the asked-for shape: tensor-parallel "
        f"sizes {list(request.tp_sizes)} need that many identical devices on one host (and at most the "
        f"model's {shape.num_kv_heads} KV heads), every stage needs one of the {shape.num_layers} "
        f"layers{all_devices}")


def _spread_by_memory(estimator: _Estimator) -> list[tuple[DeviceMemory, int]]:
    """One stage per device (the largest devices, if there are more than layers), each layer given
    to the device with the most room left: in this order, no other split overflows less."""
    devices = sorted(estimator.cluster.devices, key=lambda device: -device.memory)[:estimator.num_layers]

    def memory(index: int, num_layers: int) -> DeviceMemory:
        return estimator.stage_memory((devices[index],), num_layers, index == 0, index == len(devices) - 1,
                                      estimator.request.kv_tokens)[0]

    layers = [1] * len(devices)
    for _ in range(estimator.num_layers - len(devices)):
        # A layer costs every device the same (all heads), so the one with the most room takes it.
        layers[max(range(len(devices)), key=lambda index: memory(index, layers[index]).free)] += 1
    return [(memory(index, count), count) for index, count in enumerate(layers)]


def _quantization_hint(shape: ModelShape) -> str:
    options = []
    for dtype in ("int8", "int4"):
        if DTYPE_BYTES[dtype] < shape.weight_bytes_per_param:
            saved = shape.total_weight_bytes - replace(shape, weight_dtype=dtype).total_weight_bytes
            options.append(f"{dtype} (saves {_gib(saved)})")
    return f"; quantize the weights to {' or '.join(options)}" if options else ""


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"
