"""Executors run a step on the workers. All of them drive the same Worker class.

An executor takes a step with `submit` and hands back its sampled tokens with `collect`, oldest
first; `max_batches_in_flight` steps may be submitted before collecting (one per pipeline stage
for process-based executors, so that every stage has work)."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Protocol

import torch

from hetserve.config import EngineConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.model.spec import ModelSpec
from hetserve.planner.auto import auto_plan, wants_auto_plan
from hetserve.planner.plan import Plan, plan_from_config
from hetserve.worker.device import resolve_dtype
from hetserve.worker.worker import Worker

logger = logging.getLogger(__name__)


class Executor(Protocol):
    device: object
    dtype: object
    max_batches_in_flight: int

    def num_kv_blocks(self, config: EngineConfig) -> int: ...
    def num_host_kv_blocks(self, config: EngineConfig) -> int: ...
    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int) -> None: ...
    def submit(self, scheduler_output: SchedulerOutput) -> None: ...
    def collect(self) -> ModelRunnerOutput: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """All workers in the engine's own process, one per pipeline stage (e.g. a cuda:0 stage and a
    cpu stage), run one after the other."""

    max_batches_in_flight = 1

    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: Path, plan: Plan):
        if any(stage.tp_size > 1 for stage in plan.stages):
            raise ValueError("tensor parallelism needs one process per rank: use "
                             "distributed_executor_backend mp or ray")
        self.workers = [
            Worker(spec, model_path, config, device=stage.devices[0], layer_range=(stage.start, stage.end),
                   kv_cache_memory=stage.kv_cache_memory)
            for stage in plan.stages
        ]
        self.device = self.workers[-1].device
        self.dtype = self.workers[-1].dtype
        self._outputs: deque[ModelRunnerOutput] = deque()

    def num_kv_blocks(self, config: EngineConfig) -> int:
        return min(worker.num_kv_blocks(config.cache) for worker in self.workers)

    def num_host_kv_blocks(self, config: EngineConfig) -> int:
        return min(worker.num_host_kv_blocks(config.cache) for worker in self.workers)

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int) -> None:
        for worker in self.workers:
            worker.init_kv_cache(num_blocks, block_size, num_host_blocks)

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        result = None
        for worker in self.workers:
            result = worker.execute_model(scheduler_output, result)
        self._outputs.append(result)

    def collect(self) -> ModelRunnerOutput:
        return self._outputs.popleft()

    def shutdown(self) -> None:
        self.workers = []


def make_executor(config: EngineConfig, spec: ModelSpec, model_path: Path) -> Executor:
    """The executor the parallel config asks for (auto: in-process for one worker, else one
    process per worker)."""
    plan = resolve_plan(config, spec)
    backend = config.parallel.distributed_executor_backend
    if backend == "auto":
        backend = "local" if plan.world_size == 1 else "mp"
    if backend == "local":
        return LocalExecutor(config, spec, model_path, plan)
    if backend == "mp":
        from hetserve.worker.mp_executor import MultiprocExecutor

        return MultiprocExecutor(config, spec, model_path, plan)
    from hetserve.worker.ray_executor import RayExecutor

    return RayExecutor(config, spec, model_path, plan)


def resolve_plan(config: EngineConfig, spec: ModelSpec) -> Plan:
    """The plan the config gives, or on a host with several GPUs and no placement given (or with
    `--plan auto`), the one the partition planner makes from this host's measured profile."""
    if not wants_auto_plan(config.parallel, config.device.device, torch.cuda.device_count()):
        return plan_from_config(config.parallel, spec.num_layers, spec.num_kv_heads, config.device.device)
    from hetserve.planner.profiler import cached_profile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
    plan = auto_plan(config, spec, cached_profile(spec), dtype, config.model.max_model_len or spec.max_position)
    logger.info("planned the placement from this host's device profile: %s", plan.describe())
    return plan
