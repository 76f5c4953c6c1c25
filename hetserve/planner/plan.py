"""Where the model runs: pipeline stages in layer order, each a half-open layer range [start, end)
on one or more devices (tensor parallel inside the stage). Pure Python, no torch, so planners
and their tests stay fast.

Stages may be uneven (PipeEdge: a faster or bigger device gets more layers) and so may the
tensor-parallel slices inside a stage (HexGen: a rank can hold more KV heads than another)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetserve.config import ParallelConfig

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Stage:
    start: int
    end: int
    devices: tuple[str, ...]
    """One device per tensor-parallel rank."""
    kv_heads: tuple[int, ...] | None = None
    """KV heads per rank (their query heads follow them); None splits them as evenly as possible."""
    host: str | None = None
    """Ray node IP that runs this stage; None: any node (or this host without Ray)."""
    kv_cache_memory: int | None = None
    """Bytes of KV cache per worker of this stage; None: from the cache config."""

    @property
    def tp_size(self) -> int:
        return len(self.devices)

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WorkerPlacement:
    """What one worker process holds: its global rank, stage, TP rank and slices."""

    rank: int
    stage: int
    tp_rank: int
    device: str
    layers: tuple[int, int]
    kv_heads: tuple[int, int]
    """[start, end) of the KV heads this rank holds."""
    mlp_columns: tuple[int, int]
    """[start, end) of the MLP intermediate columns this rank holds."""
    host: str | None = None
    kv_cache_memory: int | None = None


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_sizes(cls, num_layers: int, pipeline_size: int = 1, tensor_size: int = 1,
                   layer_split: list[int] | None = None, devices: list[str] | None = None,
                   default_device: str = "auto") -> Plan:
        """The plan that the --pipeline-parallel-size / --tensor-parallel-size / --pipeline-layer-split
        / --devices shorthands describe."""
        if pipeline_size < 1 or tensor_size < 1:
            raise ValueError("pipeline and tensor parallel sizes must be at least 1")
        if layer_split is None:
            layer_split = even_split(num_layers, pipeline_size)
        elif len(layer_split) != pipeline_size:
            raise ValueError(f"pipeline_layer_split has {len(layer_split)} entries for "
                             f"{pipeline_size} pipeline stages")
        world = pipeline_size * tensor_size
        devices = devices or [default_device] * world
        if len(devices) != world:
            raise ValueError(f"{len(devices)} devices given for {world} workers "
                             f"({pipeline_size} stages x {tensor_size} tensor-parallel ranks)")
        stages, start = [], 0
        for i, count in enumerate(layer_split):
            stages.append(Stage(start, start + count, tuple(devices[i * tensor_size:(i + 1) * tensor_size])))
            start += count
        return cls(tuple(stages))

    # -- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> str:
        stages = [{k: v for k, v in asdict(s).items() if v is not None} for s in self.stages]
        return json.dumps({"stages": stages}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            stages = tuple(
                Stage(int(s["start"]), int(s["end"]), tuple(s["devices"]),
                      tuple(s["kv_heads"]) if s.get("kv_heads") is not None else None,
                      s.get("host"), s.get("kv_cache_memory"))
                for s in data["stages"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"not a plan: {error!r} (expected {{\"stages\": [{{\"start\": 0, "
                             f"\"end\": 12, \"devices\": [\"cpu\"]}}, ...]}})") from None
        return cls(stages)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())

    # -- checks and placement ------------------------------------------------------------------

    def validate(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ValueError saying what is wrong: layers not covered, overlapping or out of range,
        malformed devices, or tensor-parallel slices that do not fit the heads."""
        if not self.stages:
            raise ValueError("plan has no stages")
        expected = 0
        for i, stage in enumerate(self.stages):
            where = f"stage {i} (layers [{stage.start}, {stage.end}))"
            if stage.start != expected:
                problem = "overlaps the previous stage" if stage.start < expected else \
                    f"leaves layers [{expected}, {stage.start}) uncovered"
                raise ValueError(f"{where} {problem}; stages must cover [0, {num_layers}) in order")
            if stage.end <= stage.start:
                raise ValueError(f"{where} has no layers")
            if not stage.devices:
                raise ValueError(f"{where} has no devices")
            for device in stage.devices:
                if not _DEVICE.fullmatch(device) and device != "auto":
                    raise ValueError(f"{where}: {device!r} is not a device (cpu, cuda, cuda:N)")
            self._check_heads(where, stage, num_kv_heads)
            expected = stage.end
        if expected != num_layers:
            problem = f"leave layers [{expected}, {num_layers}) uncovered" if expected < num_layers else \
                f"go past the model's {num_layers} layers"
            raise ValueError(f"stages {problem}")

    @staticmethod
    def _check_heads(where: str, stage: Stage, num_kv_heads: int) -> None:
        if stage.kv_heads is None:
            if stage.tp_size > num_kv_heads:
                raise ValueError(f"{where}: tensor parallel size {stage.tp_size} exceeds the model's "
                                 f"{num_kv_heads} KV heads")
            return
        if len(stage.kv_heads) != stage.tp_size or min(stage.kv_heads) < 1 or sum(stage.kv_heads) != num_kv_heads:
            raise ValueError(f"{where}: kv_heads {list(stage.kv_heads)} must give each of its "
                             f"{stage.tp_size} ranks at least one of the {num_kv_heads} KV heads")

    def placements(self, num_kv_heads: int, intermediate_size: int) -> list[WorkerPlacement]:
        """Workers in rank order: stage by stage, TP rank by TP rank."""
        workers = []
        for index, stage in enumerate(self.stages):
            counts = list(stage.kv_heads or even_split(num_kv_heads, stage.tp_size))
            head_start = 0
            for tp_rank, (device, count) in enumerate(zip(stage.devices, counts)):
                heads = (head_start, head_start + count)
                # The MLP is split in the same proportion as the heads, so a rank given more
                # heads (a faster device) also gets more of the MLP.
                columns = (intermediate_size * heads[0] // num_kv_heads,
                           intermediate_size * heads[1] // num_kv_heads)
                workers.append(WorkerPlacement(len(workers), index, tp_rank, device,
                                               (stage.start, stage.end), heads, columns,
                                               stage.host, stage.kv_cache_memory))
                head_start += count
        return workers

    @property
    def world_size(self) -> int:
        return sum(stage.tp_size for stage in self.stages)

    def describe(self) -> str:
        return "; ".join(f"layers [{s.start}, {s.end}) on {'+'.join(s.devices)}" for s in self.stages)


def even_split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` sizes differing by at most one, larger ones first."""
    if parts > total:
        raise ValueError(f"cannot split {total} into {parts} non-empty parts")
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def parse_int_list(text: str | None) -> list[int] | None:
    """"12,18" -> [12, 18]."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def plan_from_config(parallel: ParallelConfig, num_layers: int, num_kv_heads: int, device: str) -> Plan:
    """The plan file, or the plan the parallel-size shorthands describe; validated."""
    if parallel.plan is not None:
        plan = Plan.load(parallel.plan)
    else:
        devices = parallel.devices.split(",") if parallel.devices else None
        plan = Plan.from_sizes(num_layers, parallel.pipeline_parallel_size, parallel.tensor_parallel_size,
                               parse_int_list(parallel.pipeline_layer_split), devices, device)
    plan.validate(num_layers, num_kv_heads)
    return plan
