"""torch.distributed plumbing shared by the process-based executors: one process group over all
workers, a tensor-parallel group per stage, and point-to-point sends of activations from each
stage's first rank to every rank of the next stage."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from hetserve.planner.plan import WorkerPlacement


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
