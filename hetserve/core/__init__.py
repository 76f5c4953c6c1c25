"""Scheduling and KV-block bookkeeping. Pure Python: nothing here imports torch."""

from hetserve.core.block_manager import BlockManager
from hetserve.core.outputs import (
    ModelRunnerOutput,
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from hetserve.core.request import Request, RequestStatus
from hetserve.core.scheduler import Scheduler

__all__ = [
    "BlockManager",
    "ModelRunnerOutput",
    "NewRequestData",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "TokenLogprobs",
]
