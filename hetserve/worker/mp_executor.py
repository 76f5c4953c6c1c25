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
from multiprocessing import connection, get_context
from pathlib import Path

from hetserve.config import EngineConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.model.spec import ModelSpec
from hetserve.planner.plan import Plan
from hetserve.worker.distributed import (DistributedWorker, WorkerArgs, WorkerError, WorkerGroup, free_port,
                                         make_worker_args)

logger = logging.getLogger(__name__)

# Loading a big model from disk can take minutes; steps are held to ParallelConfig.worker_timeout.
STARTUP_TIMEOUT_S = 900.0


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: Path, plan: Plan):
        self.timeout_s = config.parallel.worker_timeout
        devices = [device for stage in plan.stages for device in stage.devices]
        num_cpu_workers = max(1, sum(d in ("cpu", "auto") for d in devices))
        self.args = make_worker_args(config, spec, model_path, plan,
                                     num_threads=max(1, (os.cpu_count() or 1) // num_cpu_workers))
        port = free_port()
        context = get_context("spawn")
        self.conns: list[connection.Connection] = []
        self._inboxes: list[deque[tuple]] = [deque() for _ in self.args]
        self.processes = []
        for args in self.args:
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_end, args, port), daemon=True,
                                      name=f"hetserve-worker-{args.placement.rank}")
            process.start()
            child_end.close()
            self.conns.append(parent_end)
            self.processes.append(process)
        self.group = WorkerGroup.from_infos(self.args, self._gather("ready", STARTUP_TIMEOUT_S))
        self.device, self.dtype = self.group.device, self.group.dtype
        self.max_batches_in_flight = len(plan.stages)

    # -- the executor interface ----------------------------------------------------------------

    def num_kv_blocks(self, config: EngineConfig) -> int:
        """Blocks every worker can hold: a request's blocks exist on every stage."""
        self._broadcast(("num_kv_blocks", config.cache))
        return min(self._gather("num_kv_blocks", STARTUP_TIMEOUT_S))

    def num_host_kv_blocks(self, config: EngineConfig) -> int:
        self._broadcast(("num_host_kv_blocks", config.cache))
        return min(self._gather("num_host_kv_blocks", STARTUP_TIMEOUT_S))

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int) -> None:
        self._broadcast(("init_kv_cache", num_blocks, block_size, num_host_blocks, self.group.transport_dtype))
        self._gather("init_kv_cache", STARTUP_TIMEOUT_S)

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        self._broadcast(("execute", scheduler_output))

    def collect(self) -> ModelRunnerOutput:
        """The output of the oldest submitted step."""
        return self._receive(self.group.sampler_rank, "execute")

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
        placement = self.args[rank].placement
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


def _worker_main(conn: connection.Connection, args: WorkerArgs, master_port: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    try:
        _serve(conn, DistributedWorker(args, "127.0.0.1", master_port))
    except BaseException as error:  # noqa: BLE001 - reported to the engine, which fails cleanly
        try:
            conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        except OSError:
            pass


def _serve(conn: connection.Connection, worker: DistributedWorker) -> None:
    conn.send(("ready", worker.info()))
    while True:
        kind, *args = conn.recv()
        if kind == "shutdown":
            worker.close()
            return
        result = getattr(worker, kind)(*args)
        if kind != "execute" or result is not None:
            conn.send((kind, result))
