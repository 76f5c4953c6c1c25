"""Weight offload placement (FlexGen): which decoder layers stay on the compute device, which live in
host RAM and which on disk, and, for `hetserve plan`, the split of weights and KV cache between the
tiers and the batch size that maximize decode throughput within a memory budget.

Pure Python, no torch: the worker asks `layer_tiers` where its layers go, the plan command asks
`search_offload_policy` what to run. Layers off the device are streamed in one at a time while the
layer before computes, so on a GPU a decode step costs max(compute, transfer) (FlexGen's overlapped
cost model) plus what cannot overlap (the LM head, per-step overheads); on a CPU device the copies
compete with the compute for the same memory bus, and the two add."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetserve.planner.cost_model import CostModel, Rank, StepShape
from hetserve.planner.profile import DeviceProfile, Link

TIERS = ("device", "host", "disk")
# KV-cache fractions on the device tried by the search (the rest lives in host RAM).
KV_DEVICE_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class LayerBudget:
    """What placing one worker's decoder layers depends on, in bytes."""

    num_layers: int
    layer_bytes: float
    """Weights of one decoder layer."""
    fixed_bytes: float
    """Weights always on the device: embedding, final norm, LM head."""
    device_budget: float
    """Device bytes for weights, the streamed layers in flight included."""
    host_budget: float = 0.0
    """Host RAM for offloaded layers (0 on a CPU device, where host RAM is the device)."""
    window: int = 1
    """Streamed layers loaded ahead of the one computing."""

    def streamed_in_flight(self, num_streamed: int) -> int:
        """Streamed layers held at once: the one computing and the `window` being loaded."""
        return min(self.window + 1, num_streamed)


def max_device_layers(budget: LayerBudget) -> int:
    """Most layers that stay resident on the device, leaving room for the streamed ones in flight.
    Raises ValueError when not even the fixed weights and one streamed layer fit."""
    for resident in range(budget.num_layers, -1, -1):
        in_flight = budget.streamed_in_flight(budget.num_layers - resident)
        if budget.fixed_bytes + (resident + in_flight) * budget.layer_bytes <= budget.device_budget:
            return resident
    needed = budget.fixed_bytes + budget.streamed_in_flight(budget.num_layers) * budget.layer_bytes
    raise ValueError(f"memory budget {_mib(budget.device_budget)} is too small: the embedding and LM head take "
                     f"{_mib(budget.fixed_bytes)} and streaming needs {budget.streamed_in_flight(budget.num_layers)} "
                     f"layers of {_mib(budget.layer_bytes)} in flight; give at least {_mib(needed)}")


def layer_tiers(budget: LayerBudget) -> tuple[str, ...]:
    """The tier of each layer: as many on the device as fit, then host RAM, then disk. Resident layers
    are spread evenly between the streamed ones, so every load overlaps some resident compute."""
    resident = max_device_layers(budget)
    num_streamed = budget.num_layers - resident
    num_host = int(min(num_streamed, budget.host_budget // budget.layer_bytes))
    device_layers = {(2 * k + 1) * budget.num_layers // (2 * resident) for k in range(resident)}
    tiers, streamed = [], 0
    for layer in range(budget.num_layers):
        if layer in device_layers:
            tiers.append("device")
        else:
            tiers.append("host" if streamed < num_host else "disk")
            streamed += 1
    return tuple(tiers)


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB"


# -- FlexGen-style policy search ---------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadWorkload:
    prompt_len: int
    output_len: int
    max_batch_size: int = 256

    def __post_init__(self) -> None:
        if min(self.prompt_len, self.output_len, self.max_batch_size) < 1:
            raise ValueError("prompt_len, output_len and max_batch_size must be positive")

    @property
    def mean_context(self) -> int:
        """Context a decode step reads on average over the output."""
        return self.prompt_len + self.output_len // 2

    @property
    def max_context(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class OffloadTarget:
    """Where a policy may put things: the compute device, host RAM and disk, and how fast each moves."""

    device: DeviceProfile
    device_memory: float
    """Device bytes for weights, KV cache and activations."""
    host_memory: float = 0.0
    """Host RAM for offloaded weights and KV (ignored on a CPU device: host RAM is the device)."""
    disk: Link = Link(bandwidth=2e9, latency=100e-6)
    """Reads of offloaded weights from disk (an NVMe SSD unless measured)."""
    window: int = 1
    kv_in_host: bool = False
    """Let the KV cache live partly in host RAM (FlexGen); the engine serves KV from the device only."""

    @property
    def host_link(self) -> Link | None:
        """Copies from host RAM to the device; None when the device is the CPU."""
        if self.device.kind == "cpu":
            return None
        return self.device.host_link or Link(bandwidth=16e9, latency=10e-6)


@dataclass(frozen=True)
class OffloadPolicy:
    batch_size: int
    tiers: tuple[str, ...]
    """Tier of each decoder layer."""
    kv_device_fraction: float
    weight_device_bytes: float
    """Device bytes for weights (resident layers, fixed weights, layers in flight): serve's memory_budget."""
    kv_device_bytes: float
    host_weight_bytes: float
    compute_time: float
    transfer_time: float
    step_time: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size / self.step_time

    def weight_fractions(self) -> dict[str, float]:
        return {tier: self.tiers.count(tier) / len(self.tiers) for tier in TIERS}

    def describe(self) -> str:
        fractions = ", ".join(f"{tier} {share:.0%}" for tier, share in self.weight_fractions().items())
        bound = "transfer" if self.transfer_time > self.compute_time else "compute"
        return (f"offload policy: batch {self.batch_size}; decoder weights {fractions}; KV cache device "
                f"{self.kv_device_fraction:.0%}, host {1 - self.kv_device_fraction:.0%}\n"
                f"predicted decode step {self.step_time * 1e3:.2f} ms ({bound} bound: compute "
                f"{self.compute_time * 1e3:.2f} ms, weight and KV transfers {self.transfer_time * 1e3:.2f} ms), "
                f"{self.tokens_per_s:,.1f} tokens/s\n"
                + (f"serve with: {' '.join(self.serve_flags())}" if self.kv_device_fraction == 1.0 else
                   "(hetserve serves the KV cache from the device only: this KV split is FlexGen's, not servable)"))

    def serve_flags(self) -> list[str]:
        flags = ["--memory-budget", str(int(self.weight_device_bytes)), "--kv-cache-memory",
                 str(int(self.kv_device_bytes)), "--max-num-seqs", str(self.batch_size)]
        if "host" in self.tiers:
            # Rounded up, so the host layers still fit the flag's value.
            flags += ["--cpu-offload-gb", f"{math.ceil(self.host_weight_bytes / 2**30 * 1000) / 1000:.3f}"]
        if "disk" in self.tiers:
            flags += ["--disk-offload-dir", "DIR"]
        return flags


def search_offload_policy(cost: CostModel, target: OffloadTarget, workload: OffloadWorkload) -> OffloadPolicy:
    """The batch size, KV split and weight placement with the highest predicted decode throughput
    within the device and host memory. Batches are powers of two; for each batch and KV split the
    weights fill the device, then host RAM, then disk, since a layer on a faster tier never makes a
    step slower. Raises ValueError when nothing fits."""
    best = None
    for batch in _batch_sizes(workload.max_batch_size):
        for kv_fraction in _kv_fractions(target):
            policy = evaluate_policy(cost, target, workload, batch, kv_fraction)
            if policy is not None and (best is None or policy.tokens_per_s > best.tokens_per_s):
                best = policy
    if best is None:
        raise ValueError(f"no offload policy fits {_mib(target.device_memory)} of device memory: even batch 1 "
                         "needs more for the embedding, the layers in flight and its KV cache")
    return best


def evaluate_policy(cost: CostModel, target: OffloadTarget, workload: OffloadWorkload, batch: int,
                    kv_device_fraction: float, num_device_layers: int | None = None,
                    num_host_layers: int | None = None) -> OffloadPolicy | None:
    """The policy with this batch and KV split (and layer counts per tier, default: the most that
    fit on the faster tiers), or None if it does not fit in memory."""
    shape = cost.shape
    kv_bytes = batch * workload.max_context * shape.num_layers * shape.kv_bytes_per_token()
    kv_device = kv_bytes * kv_device_fraction
    device_for_weights = target.device_memory - kv_device - shape.activation_bytes(batch)
    host_for_weights = target.host_memory - (kv_bytes - kv_device) if target.host_link else 0.0
    if device_for_weights <= 0 or host_for_weights < 0:
        return None
    budget = LayerBudget(shape.num_layers, shape.layer_weight_bytes(), _fixed_weight_bytes(cost),
                         device_for_weights, host_for_weights, target.window)
    try:
        tiers = layer_tiers(budget)
    except ValueError:
        return None
    if num_device_layers is not None:
        tiers = _tiers_with_counts(budget, tiers, num_device_layers, num_host_layers or 0)
        if tiers is None:
            return None
    return _timed_policy(cost, target, workload, batch, kv_device_fraction, budget, tiers, kv_device)


def _tiers_with_counts(budget: LayerBudget, best: tuple[str, ...], num_device: int, num_host: int
                       ) -> tuple[str, ...] | None:
    """A placement with exactly these counts, if it fits (for brute-force checks of the search)."""
    if best.count("device") < num_device or num_device + num_host > budget.num_layers:
        return None
    if num_host * budget.layer_bytes > budget.host_budget:
        return None
    num_disk = budget.num_layers - num_device - num_host
    return ("device",) * num_device + ("host",) * num_host + ("disk",) * num_disk


def _timed_policy(cost: CostModel, target: OffloadTarget, workload: OffloadWorkload, batch: int,
                  kv_device_fraction: float, budget: LayerBudget, tiers: tuple[str, ...],
                  kv_device: float) -> OffloadPolicy:
    shape = cost.shape
    step = StepShape.decode(batch, workload.mean_context)
    rank = Rank(target.device, shape.num_kv_heads)
    compute = shape.num_layers * cost.layer_time(rank, step)
    transfer = _weight_transfer_time(target, budget.layer_bytes, tiers)
    if target.host_link is not None:
        # KV in host RAM crosses to the device at every step, as FlexGen's policy without CPU attention.
        host_kv_per_layer = (1 - kv_device_fraction) * step.decode_kv_tokens * shape.kv_bytes_per_token()
        transfer += shape.num_layers * target.host_link.transfer_time(host_kv_per_layer)
    # A GPU copies on its copy engine while it computes; a CPU device copies on the cores and memory bus
    # that its (memory-bound) decode uses, so there the two add up (benchmarks/RESULTS.md).
    layers_time = max(compute, transfer) if target.host_link is not None else compute + transfer
    step_time = layers_time + cost.lm_head_time(rank, step) + target.device.step_overhead
    resident = tiers.count("device") + budget.streamed_in_flight(len(tiers) - tiers.count("device"))
    weight_device = budget.fixed_bytes + resident * budget.layer_bytes
    host_weights = tiers.count("host") * budget.layer_bytes
    return OffloadPolicy(batch, tiers, kv_device_fraction, weight_device, kv_device, host_weights, compute, transfer,
                         step_time)


def _weight_transfer_time(target: OffloadTarget, layer_bytes: float, tiers: tuple[str, ...]) -> float:
    host = target.host_link
    disk_time = target.disk.transfer_time(layer_bytes)
    if host is not None:
        # Disk reads land in host RAM and then cross to the device; the two overlap across layers.
        disk_time = max(disk_time, host.transfer_time(layer_bytes))
    host_time = host.transfer_time(layer_bytes) if host is not None else 0.0
    return tiers.count("host") * host_time + tiers.count("disk") * disk_time


def _fixed_weight_bytes(cost: CostModel) -> float:
    # The engine loads a tied LM head as a copy of the embedding, so both are on the device.
    return 2 * cost.shape.embedding_bytes()


def _batch_sizes(largest: int) -> list[int]:
    return [2**k for k in range(int(math.log2(largest)) + 1)]


def _kv_fractions(target: OffloadTarget) -> tuple[float, ...]:
    return KV_DEVICE_FRACTIONS if target.kv_in_host and target.host_link is not None else (1.0,)
