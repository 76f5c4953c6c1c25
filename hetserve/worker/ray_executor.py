"""Workers as Ray actors on the nodes of a Ray cluster (`ray start --head`, then `ray start
--address` on each other host): the way past one machine, with no RPC of our own. The actors run
the same DistributedWorker as the multiprocess executor and pass activations over torch.distributed;
Ray carries each step's SchedulerOutput to them and the sampled tokens back.

A stage's `host` in the plan places its actors: an IP address means that node, any other name a
custom resource that a node was started with (`ray start --resources '{"gpu-box": 1}'`). The model
file must be at the same path on every node."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import deque
from dataclasses import replace
from pathlib import Path

from hetserve.config import EngineConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.model.spec import ModelSpec
from hetserve.planner.plan import Plan
from hetserve.worker.distributed import (DistributedWorker, WorkerArgs, WorkerError, WorkerGroup, WorkerInfo,
                                         free_port, make_worker_args)
from hetserve.worker.mp_executor import STARTUP_TIMEOUT_S

logger = logging.getLogger(__name__)


class RayWorker:
    """The actor: a DistributedWorker built once every actor exists and the group's address is known."""

    def __init__(self):
        self.worker: DistributedWorker | None = None

    def address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def setup(self, args: WorkerArgs, master_addr: str, master_port: int) -> WorkerInfo:
        self.worker = DistributedWorker(args, master_addr, master_port)
        return self.worker.info()

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


class RayExecutor:
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: Path, plan: Plan):
        import ray

        if not ray.is_initialized():
            # Attach to the cluster that `ray start` made (RAY_ADDRESS, or the local one). On a
            # loopback cluster the driver must say it is on loopback too, or Ray picks the LAN IP.
            address = os.environ.get("RAY_ADDRESS", "auto")
            loopback = address.startswith(("127.", "localhost"))
            ray.init(address=address, log_to_driver=False,
                     **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
        self.timeout_s = config.parallel.worker_timeout
        # Ray gives each GPU actor one GPU, which it sees as cuda:0.
        self.args = [replace(a, placement=replace(a.placement, device="cuda:0"))
                     if a.placement.device.startswith("cuda") else a
                     for a in make_worker_args(config, spec, model_path, plan, num_threads=1)]
        actor_class = ray.remote(RayWorker)
        self.actors = [actor_class.options(**_placement_options(args)).remote() for args in self.args]
        nodes = self._get([actor.node_id.remote() for actor in self.actors], STARTUP_TIMEOUT_S)
        logger.info("Ray workers on nodes: %s", ", ".join(f"rank {rank} on {node}" for rank, node in enumerate(nodes)))
        master_addr, master_port = self._get(self.actors[0].address.remote(), STARTUP_TIMEOUT_S)
        infos = self._get([actor.setup.remote(args, master_addr, master_port)
                           for actor, args in zip(self.actors, self.args)], STARTUP_TIMEOUT_S)
        self.group = WorkerGroup.from_infos(self.args, infos)
        self.device, self.dtype = self.group.device, self.group.dtype
        self.max_batches_in_flight = len(plan.stages)
        self._in_flight: deque[list] = deque()

    def num_kv_blocks(self, config: EngineConfig) -> int:
        return min(self._call_all("num_kv_blocks", config.cache))

    def num_host_kv_blocks(self, config: EngineConfig) -> int:
        return min(self._call_all("num_host_kv_blocks", config.cache))

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int) -> None:
        self._call_all("init_kv_cache", num_blocks, block_size, num_host_blocks, self.group.transport_dtype)

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        import ray

        payload = ray.put(scheduler_output)
        # Actor calls run in submission order, so every rank sees the steps in the same order.
        self._in_flight.append([actor.call.remote("execute", payload) for actor in self.actors])

    def collect(self) -> ModelRunnerOutput:
        results = self._get(self._in_flight.popleft(), self.timeout_s)
        return results[self.group.sampler_rank]

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _call_all(self, method: str, *args) -> list:
        return self._get([actor.call.remote(method, *args) for actor in self.actors], STARTUP_TIMEOUT_S)

    def _get(self, refs, timeout_s: float):
        """ray.get, with a dead actor, a worker's exception or a timeout as a WorkerError (after
        killing every actor: the others would wait forever on the failed one)."""
        import ray

        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            message = f"no answer from the Ray workers for {timeout_s:.0f} s (hung?)"
        except ray.exceptions.RayActorError as error:
            message = f"a Ray worker died: {error}"
        except ray.exceptions.RayTaskError as error:
            message = f"a Ray worker failed: {error}"
        self.shutdown()
        raise WorkerError(message)


def _placement_options(args: WorkerArgs) -> dict:
    options: dict = {"num_cpus": 1}
    if args.placement.device.startswith("cuda"):
        options["num_gpus"] = 1
    host = args.placement.host
    if host is not None:
        try:
            ipaddress.ip_address(host)
            options["resources"] = {f"node:{host}": 0.001}
        except ValueError:
            options["resources"] = {host: 0.001}
    return options
