"""One process per worker on this host. The engine sends each step's SchedulerOutput to every
worker over a pipe; activations go stage to stage and tensor-parallel partial sums are all-reduced
over torch.distributed; the sampling worker answers with the sampled tokens.

Up to one micro-batch per stage is in flight: stage 0 starts step k+1 while stage 1 runs step k."""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing import connection, get_context
from pathlib import Path

from hetserve.config import CacheConfig, EngineConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.model.spec import ModelSpec
from hetserve.planner.plan import Plan, WorkerPlacement

logger = logging.getLogger(__name__)

# Loading a big model from disk can take minutes; steps are held to ParallelConfig.worker_timeout.
STARTUP_TIMEOUT_S = 900.0


class WorkerError(RuntimeError):
    """A worker died, hung past the timeout, or raised; the engine cannot go on with it."""


@dataclass
class WorkerInfo:
    device: str
    dtype: str
    samples: bool


@dataclass
class _WorkerArgs:
    placement: WorkerPlacement
    stage_ranks: list[list[int]]
    spec: ModelSpec
    model_path: Path
    dtype: str
    seed: int
    backend: str
    master_port: int
    timeout_s: float
    num_threads: int


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: Path, plan: Plan):
        from hetserve.worker.distributed import choose_backend, free_port

        self.timeout_s = config.parallel.worker_timeout
        self.placements = plan.placements(spec.num_kv_heads, spec.intermediate_size)
        stage_ranks = [[p.rank for p in self.placements if p.stage == s] for s in range(len(plan.stages))]
        devices = [p.device for p in self.placements]
        backend = choose_backend(devices)
        num_cpu_workers = max(1, sum(d in ("cpu", "auto") for d in devices))
        threads = max(1, (os.cpu_count() or 1) // num_cpu_workers)
        port = free_port()
        context = get_context("spawn")
        self.conns: list[connection.Connection] = []
        self._inboxes: list[deque[tuple]] = [deque() for _ in self.placements]
        self.processes = []
        for placement in self.placements:
            parent_end, child_end = context.Pipe()
            args = _WorkerArgs(placement, stage_ranks, spec, model_path, config.model.dtype, config.seed,
                               backend, port, self.timeout_s, threads)
            process = context.Process(target=_worker_main, args=(child_end, args), daemon=True,
                                      name=f"hetserve-worker-{placement.rank}")
            process.start()
            child_end.close()
            self.conns.append(parent_end)
            self.processes.append(process)
        infos: list[WorkerInfo] = self._gather("ready", STARTUP_TIMEOUT_S)
        self.sampler_rank = next(i for i, info in enumerate(infos) if info.samples)
        self.device = infos[self.sampler_rank].device
        self.dtype = infos[self.sampler_rank].dtype
        # Stages on different hardware may resolve "auto" to different dtypes; activations then
        # travel in float32 and each stage casts them to its own.
        dtypes = {info.dtype for info in infos}
        self.transport_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
        self.max_batches_in_flight = len(plan.stages)
        self._num_in_flight = 0
        logger.info("%d workers (%s): %s", len(infos), backend,
                    ", ".join(f"rank {p.rank} layers [{p.layers[0]}, {p.layers[1]}) kv heads "
                              f"[{p.kv_heads[0]}, {p.kv_heads[1]}) on {i.device} {i.dtype}"
                              for p, i in zip(self.placements, infos)))

    # -- the executor interface ----------------------------------------------------------------

    def num_kv_blocks(self, config: EngineConfig) -> int:
        """Blocks every worker can hold: a request's blocks exist on every stage."""
        self._broadcast(("num_kv_blocks", config.cache))
        return min(self._gather("num_kv_blocks", STARTUP_TIMEOUT_S))

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._broadcast(("init_kv_cache", num_blocks, block_size, self.transport_dtype))
        self._gather("init_kv_cache", STARTUP_TIMEOUT_S)

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        self._broadcast(("execute", scheduler_output))
        self._num_in_flight += 1

    def collect(self) -> ModelRunnerOutput:
        """The output of the oldest submitted step."""
        self._num_in_flight -= 1
        return self._receive(self.sampler_rank, "output")

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(scheduler_output)
        return self.collect()

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("shutdown",))
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(timeout=5)
        self._kill_all()

    # -- messages ------------------------------------------------------------------------------

    def _broadcast(self, message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payload)
            except OSError:
                self._fail(f"worker {rank} is gone: {self._describe_exit(rank)}")

    def _gather(self, kind: str, timeout_s: float) -> list:
        return [self._receive(rank, kind, timeout_s) for rank in range(len(self.conns))]

    def _receive(self, rank: int, kind: str, timeout_s: float | None = None):
        """The next message of worker `rank`, which must be of `kind`. Meanwhile every worker is
        watched: an error or an exit anywhere fails the executor instead of waiting forever."""
        timeout_s = timeout_s or self.timeout_s
        watched = {conn: i for i, conn in enumerate(self.conns)}
        watched.update({p.sentinel: i for i, p in enumerate(self.processes)})
        while not self._inboxes[rank]:
            ready = connection.wait(list(watched), timeout=timeout_s)
            if not ready:
                self._fail(f"no answer from worker {rank} for {timeout_s:.0f} s (hung?)")
            conns = [r for r in ready if isinstance(r, connection.Connection)]
            for conn in conns:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"worker {watched[conn]} is gone: {self._describe_exit(watched[conn])}")
                if message[0] == "error":
                    self._fail(f"worker {watched[conn]} failed: {message[1]}")
                self._inboxes[watched[conn]].append(message)
            if not conns:
                died = watched[ready[0]]
                self._fail(f"worker {died} exited: {self._describe_exit(died)}")
        message = self._inboxes[rank].popleft()
        if message[0] != kind:
            self._fail(f"worker {rank} sent {message[0]!r} while {kind!r} was expected")
        return message[1]

    def _describe_exit(self, rank: int) -> str:
        process = self.processes[rank]
        process.join(timeout=1)
        placement = self.placements[rank]
        where = f"layers [{placement.layers[0]}, {placement.layers[1]}) on {placement.device}"
        if process.exitcode is None:
            return f"{where}, still running"
        if process.exitcode < 0:
            return f"{where}, killed by signal {signal.Signals(-process.exitcode).name}"
        return f"{where}, exit code {process.exitcode}"

    def _fail(self, message: str):
        """Kill every worker (the others would wait forever on the failed one) and raise, naming
        first any worker that died, since the others' errors are often just its echo."""
        for process in self.processes:
            process.join(timeout=0.2)
        dead = [f"worker {rank} ({self._describe_exit(rank)})" for rank, p in enumerate(self.processes)
                if p.exitcode not in (None, 0)]
        self._kill_all()
        raise WorkerError("; ".join(dict.fromkeys([*(f"{d} died" for d in dead), message])))

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=5)


# -- the worker process --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: be killed when the engine process dies, however it dies, so no worker is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn: connection.Connection, args: _WorkerArgs) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    try:
        _serve(conn, args)
    except BaseException as error:  # noqa: BLE001 - reported to the engine, which fails cleanly
        try:
            conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        except OSError:
            pass


def _serve(conn: connection.Connection, args: _WorkerArgs) -> None:
    import torch

    from hetserve.model.llama import TensorShard
    from hetserve.worker.distributed import StageLinks, init_process_group
    from hetserve.worker.worker import Worker

    torch.set_num_threads(args.num_threads)
    placement = args.placement
    world_size = sum(len(ranks) for ranks in args.stage_ranks)
    # The engine's own timeout notices a hung peer first and names it; this one is a backstop.
    init_process_group(args.backend, placement.rank, world_size, "127.0.0.1", args.master_port,
                       args.timeout_s + 60)
    device = torch.device("cuda", int(placement.device.split(":")[1])) if ":" in placement.device \
        else torch.device(placement.device if placement.device != "auto" else "cpu")
    links = StageLinks(placement, args.stage_ranks, device, args.backend)
    worker = Worker(args.spec, args.model_path, device=placement.device, dtype=args.dtype,
                    layer_range=placement.layers,
                    shard=TensorShard(placement.kv_heads, placement.mlp_columns, placement.tp_rank),
                    all_reduce=links.all_reduce if links.tensor_parallel else None,
                    kv_cache_memory=placement.kv_cache_memory, seed=args.seed)
    conn.send(("ready", WorkerInfo(str(worker.device), str(worker.dtype).removeprefix("torch."),
                                   worker.samples)))
    while True:
        message = conn.recv()
        if message[0] == "execute":
            _execute(conn, worker, links, message[1])
        elif message[0] == "num_kv_blocks":
            cache: CacheConfig = message[1]
            conn.send(("num_kv_blocks", worker.num_kv_blocks(cache)))
        elif message[0] == "init_kv_cache":
            worker.init_kv_cache(message[1], message[2])
            links.transport_dtype = getattr(torch, message[3])
            conn.send(("init_kv_cache", None))
        else:
            links.wait_for_sends()
            return


def _execute(conn: connection.Connection, worker, links, scheduler_output: SchedulerOutput) -> None:
    hidden_in = None
    if not worker.model.is_first and scheduler_output.scheduled:
        hidden_in = links.recv_from_prev(scheduler_output.num_tokens, worker.spec.hidden_size)
    result = worker.execute_model(scheduler_output, hidden_in)
    if isinstance(result, ModelRunnerOutput):
        if worker.samples:
            conn.send(("output", result))
    elif links.is_leader:
        links.send_to_next(result)
