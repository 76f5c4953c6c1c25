"""What the planner knows about hardware: each device's speed and memory and the links between
them. A profile is either measured on this machine (`hetserve profile`, hetserve.planner.profiler)
or written by hand from datasheets to plan for hardware that is not here (`--devices FILE`).

Pure Python, no torch: the cost model and the planners read profiles, they never measure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
DEVICE_KINDS = ("cpu", "cuda")


@dataclass(frozen=True)
class Link:
    """A transport: time to move n bytes is latency + n / bandwidth."""

    bandwidth: float
    """Bytes per second."""
    latency: float
    """Seconds per message."""

    def transfer_time(self, num_bytes: float) -> float:
        return self.latency + num_bytes / self.bandwidth if num_bytes > 0 else 0.0


@dataclass(frozen=True)
class LinearTiming:
    """A measured y = x @ W.T: x is [tokens, in_features], W is [out_features, in_features]."""

    tokens: int
    out_features: int
    in_features: int
    seconds: float


@dataclass(frozen=True)
class DeviceProfile:
    """One device as the planner sees it.

    Datasheet devices give `flops`, `memory_bandwidth` and `memory`; a measured device adds linear
    timings at the model's own shapes, which the cost model prefers where they exist."""

    name: str
    """Unique label: "cpu", "cuda:0", or e.g. "a100-0" for a hypothetical device."""
    kind: str
    """"cpu" or "cuda"."""
    memory: int
    """Bytes this device may fill with weights, KV cache and activations."""
    flops: dict[str, float]
    """Dense matmul FLOP/s reached per dtype name ("bfloat16", "float32", ...)."""
    memory_bandwidth: float
    """Bytes per second of streaming reads from device memory (weights, KV)."""
    host: str = "localhost"
    """Host the device sits in; tensor parallelism stays inside one host."""
    device: str | None = None
    """Device string a Plan uses for it on its host ("cpu", "cuda:1"); default: `name`."""
    cores: int = 1
    """CPU cores (threads of one worker that has the CPU to itself); 1 for GPUs."""
    thread_scaling: dict[int, float] = field(default_factory=dict)
    """CPU only: compute time with N threads over the time with all `cores` (1.9 at 1 thread of 2
    cores means 1.9x slower). Missing counts scale as cores / N."""
    host_link: Link | None = None
    """Copies between this device and host memory (GPUs)."""
    attention_bandwidth: float | None = None
    """Effective bytes/s of decode attention reading KV; default: memory_bandwidth."""
    attention_flops: dict[str, float] = field(default_factory=dict)
    """Effective FLOP/s of prefill attention per dtype; default: `flops`."""
    linear: dict[str, tuple[LinearTiming, ...]] = field(default_factory=dict)
    """Measured linear layers per dtype, at the profiled model's shapes."""
    layer_overhead: float = 0.0
    """Seconds per decoder layer per step beyond its matmuls and attention (norms, RoPE, launches)."""
    token_overhead: float = 0.0
    """Seconds per token per decoder layer beyond its matmuls and attention (elementwise work)."""
    step_overhead: float = 0.0
    """Seconds per step of one worker outside the layers (inputs, embedding, sampling setup)."""

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"device {self.name!r}: kind must be one of {', '.join(DEVICE_KINDS)}, "
                             f"got {self.kind!r}")
        if self.memory <= 0 or self.memory_bandwidth <= 0 or not self.flops:
            raise ValueError(f"device {self.name!r} needs positive memory, memory_bandwidth and flops")
        if any(value <= 0 for value in self.flops.values()):
            raise ValueError(f"device {self.name!r}: flops must be positive")
        if self.cores < 1:
            raise ValueError(f"device {self.name!r}: cores must be at least 1")

    @property
    def plan_device(self) -> str:
        return self.device or self.name

    def slowdown(self, threads: int) -> float:
        """How much slower compute is with `threads` of this CPU's cores than with all of them."""
        if threads >= self.cores:
            return 1.0
        return self.thread_scaling.get(threads, self.cores / threads)


@dataclass(frozen=True)
class ClusterProfile:
    """Every device a plan may use, and how processes talk within a host and between hosts."""

    devices: tuple[DeviceProfile, ...]
    intra_host: Link = Link(bandwidth=5e9, latency=50e-6)
    """Process to process on one host (the executor's transport: gloo over loopback, or NVLink/PCIe)."""
    inter_host: Link = Link(bandwidth=1.25e9, latency=100e-6)
    """Host to host (10 Gbit/s Ethernet unless measured or given)."""
    fingerprint: str | None = None
    """Hardware identity of a measured profile (cache key); None for hand-written ones."""
    engine_step_overhead: float = 0.0
    """Seconds per step in the engine and server process (scheduling, output processing), serial with
    the workers (hetserve.planner.calibrate measures it)."""
    engine_request_overhead: float = 0.0
    """Seconds per scheduled request per step (sampling, detokenizing, streaming over HTTP)."""

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("a cluster profile needs at least one device")
        names = [device.name for device in self.devices]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"device names must be unique; repeated: {', '.join(duplicated)}")

    def device(self, name: str) -> DeviceProfile:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(f"no device {name!r} in the profile (devices: {', '.join(d.name for d in self.devices)})")

    def link(self, a: DeviceProfile, b: DeviceProfile) -> Link:
        return self.intra_host if a.host == b.host else self.inter_host

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys(device.host for device in self.devices))

    # -- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterProfile:
        try:
            data = json.loads(text)
            devices = tuple(_device_from_dict(d) for d in data["devices"])
            links = {k: Link(**data[k]) for k in ("intra_host", "inter_host") if k in data}
            extras = {k: data[k] for k in ("fingerprint", "engine_step_overhead", "engine_request_overhead")
                      if k in data}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"not a device profile: {error!r}; expected {{\"devices\": [{{\"name\": "
                             f"\"a100-0\", \"kind\": \"cuda\", \"memory\": 40e9, \"flops\": {{\"bfloat16\": "
                             f"312e12}}, \"memory_bandwidth\": 1.5e12, \"host\": \"node0\"}}, ...]}}") from None
        return cls(devices, **links, **extras)

    @classmethod
    def load(cls, path: str | Path) -> ClusterProfile:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"cannot read device profile {path}: {error.strerror}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def with_devices(self, devices: tuple[DeviceProfile, ...]) -> ClusterProfile:
        return replace(self, devices=devices)


def _device_from_dict(data: dict) -> DeviceProfile:
    data = dict(data)
    data["memory"] = int(float(data["memory"]))
    data["flops"] = {k: float(v) for k, v in data["flops"].items()}
    data["thread_scaling"] = {int(k): float(v) for k, v in data.get("thread_scaling", {}).items()}
    if data.get("host_link") is not None:
        data["host_link"] = Link(**data["host_link"])
    data["linear"] = {dtype: tuple(LinearTiming(**t) for t in timings)
                      for dtype, timings in data.get("linear", {}).items()}
    return DeviceProfile(**data)
