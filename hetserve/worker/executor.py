"""Executors run a step on the workers. All of them drive the same Worker class."""

from __future__ import annotations

from pathlib import Path

from hetserve.config import EngineConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.model.spec import ModelSpec
from hetserve.worker.worker import Worker


class LocalExecutor:
    """One worker holding the whole model, in the engine's own process."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: Path):
        self.worker = Worker(spec, model_path, device=config.device.device, dtype=config.model.dtype,
                             seed=config.seed)
        self.device = self.worker.device
        self.dtype = self.worker.dtype

    def num_kv_blocks(self, config: EngineConfig) -> int:
        return self.worker.num_kv_blocks(config.cache)

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.worker.init_kv_cache(num_blocks, block_size)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def shutdown(self) -> None:
        self.worker = None
