"""What the process-based executors (mp, Ray) share on the worker side: one torch.distributed
group over all workers, a tensor-parallel group per stage, point-to-point sends of activations
from each stage's first rank to every rank of the next stage, and the DistributedWorker that a
worker process or actor runs."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hetserve.config import CacheConfig, EngineConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.model.spec import ModelSpec
from hetserve.planner.plan import Plan, WorkerPlacement

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker died, hung past the timeout, or raised; the engine cannot go on with it."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def choose_backend(devices: list[str]) -> str:
    """NCCL when every worker is on a GPU; otherwise gloo, with GPU tensors staged through host
    memory (gloo moves CPU tensors, and a GPU/CPU pipeline crosses the host anyway)."""
    return "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"


def init_process_group(backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
                       timeout_s: float) -> None:
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


class StageLinks:
    """One worker's connections: to the previous stage's first rank, to the next stage's ranks,
    and to the other tensor-parallel ranks of its own stage."""

    def __init__(self, placement: WorkerPlacement, stage_ranks: list[list[int]], device: torch.device,
                 backend: str):
        stage = placement.stage
        self.is_leader = placement.tp_rank == 0
        self.prev_leader = stage_ranks[stage - 1][0] if stage > 0 else None
        self.next_ranks = stage_ranks[stage + 1] if stage + 1 < len(stage_ranks) else []
        # new_group is collective: every rank creates every group, in the same order.
        groups = {tuple(ranks): dist.new_group(ranks) for ranks in stage_ranks if len(ranks) > 1}
        self.tp_group = groups.get(tuple(stage_ranks[stage]))
        self.transport_device = device if backend == "nccl" else torch.device("cpu")
        self.transport_dtype = torch.float32
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_group is not None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        staged = x.to(self.transport_device)
        dist.all_reduce(staged, group=self.tp_group)
        return staged.to(x.device)

    def send_to_next(self, hidden: torch.Tensor) -> None:
        """Send without waiting for the receivers, so this stage can start its next micro-batch;
        the previous send is completed first so at most one is outstanding."""
        self.wait_for_sends()
        staged = hidden.to(self.transport_device, self.transport_dtype).contiguous()
        self._sends = [(dist.isend(staged, dst), staged) for dst in self.next_ranks]

    def wait_for_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def recv_from_prev(self, num_tokens: int, hidden_size: int) -> torch.Tensor:
        buffer = torch.empty(num_tokens, hidden_size, dtype=self.transport_dtype, device=self.transport_device)
        dist.recv(buffer, src=self.prev_leader)
        return buffer


@dataclass
class WorkerArgs:
    """Everything a worker process or actor needs to build its Worker and join the group."""

    placement: WorkerPlacement
    stage_ranks: list[list[int]]
    spec: ModelSpec
    model_path: Path
    config: EngineConfig
    backend: str
    num_threads: int


@dataclass
class WorkerInfo:
    device: str
    dtype: str
    samples: bool


def make_worker_args(config: EngineConfig, spec: ModelSpec, model_path: Path, plan: Plan,
                     num_threads: int) -> list[WorkerArgs]:
    placements = plan.placements(spec.num_kv_heads, spec.intermediate_size)
    stage_ranks = [[p.rank for p in placements if p.stage == s] for s in range(len(plan.stages))]
    backend = choose_backend([p.device for p in placements])
    return [WorkerArgs(p, stage_ranks, spec, model_path, config, backend, num_threads) for p in placements]


@dataclass
class WorkerGroup:
    """What the engine learns from the workers once they are up."""

    sampler_rank: int
    device: str
    dtype: str
    transport_dtype: str

    @classmethod
    def from_infos(cls, args: list[WorkerArgs], infos: list[WorkerInfo]) -> WorkerGroup:
        sampler = next(i for i, info in enumerate(infos) if info.samples)
        # Stages on different hardware may resolve "auto" to different dtypes; activations then
        # travel in float32 and each stage casts them to its own.
        dtypes = {info.dtype for info in infos}
        logger.info("%d workers (%s): %s", len(infos), args[0].backend, ", ".join(
            f"rank {a.placement.rank} layers [{a.placement.layers[0]}, {a.placement.layers[1]}) kv heads "
            f"[{a.placement.kv_heads[0]}, {a.placement.kv_heads[1]}) on {i.device} {i.dtype}"
            for a, i in zip(args, infos)))
        return cls(sampler, infos[sampler].device, infos[sampler].dtype,
                   dtypes.pop() if len(dtypes) == 1 else "float32")


class DistributedWorker:
    """A Worker with its links to the other workers: what runs inside a worker process (mp
    executor) or a Ray actor. Every rank receives every step and plays its part of it."""

    def __init__(self, args: WorkerArgs, master_addr: str, master_port: int):
        from hetserve.model.llama import TensorShard
        from hetserve.worker.device import resolve_device
        from hetserve.worker.worker import Worker

        torch.set_num_threads(args.num_threads)
        placement = args.placement
        world_size = sum(len(ranks) for ranks in args.stage_ranks)
        # The engine's own timeout notices a hung peer first and names it; this one is a backstop.
        init_process_group(args.backend, placement.rank, world_size, master_addr, master_port,
                           args.config.parallel.worker_timeout + 60)
        self.links = StageLinks(placement, args.stage_ranks, resolve_device(placement.device), args.backend)
        self.worker = Worker(args.spec, args.model_path, args.config, device=placement.device,
                             layer_range=placement.layers,
                             shard=TensorShard(placement.kv_heads, placement.mlp_columns, placement.tp_rank),
                             all_reduce=self.links.all_reduce if self.links.tensor_parallel else None,
                             kv_cache_memory=placement.kv_cache_memory)

    def info(self) -> WorkerInfo:
        return WorkerInfo(str(self.worker.device), str(self.worker.dtype).removeprefix("torch."),
                          self.worker.samples)

    def num_kv_blocks(self, cache: CacheConfig) -> int:
        return self.worker.num_kv_blocks(cache)

    def num_host_kv_blocks(self, cache: CacheConfig) -> int:
        return self.worker.num_host_kv_blocks(cache)

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int, transport_dtype: str) -> None:
        self.worker.init_kv_cache(num_blocks, block_size, num_host_blocks)
        self.links.transport_dtype = getattr(torch, transport_dtype)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """This rank's part of a step; the sampled tokens on the sampling rank, else None."""
        hidden_in = None
        if not self.worker.model.is_first and scheduler_output.scheduled:
            hidden_in = self.links.recv_from_prev(scheduler_output.num_tokens, self.worker.spec.hidden_size)
        result = self.worker.execute_model(scheduler_output, hidden_in)
        if isinstance(result, torch.Tensor):
            if self.links.is_leader:
                self.links.send_to_next(result)
            return None
        return result if self.worker.samples else None

    def close(self) -> None:
        self.links.wait_for_sends()
        dist.destroy_process_group()
