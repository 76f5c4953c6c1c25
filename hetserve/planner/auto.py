"""The plan `hetserve serve` makes by itself on a host with several GPUs, when the user gives none:
the partition planner's, for this host's measured profile, at a moderate decode batch."""

from __future__ import annotations

from hetserve.config import EngineConfig, ParallelConfig
from hetserve.model.quantization import QUANTIZATIONS
from hetserve.model.spec import ModelSpec
from hetserve.planner.cost_model import CostModel, ModelShape, StepShape
from hetserve.planner.partition import PartitionRequest, plan_partition
from hetserve.planner.plan import Plan
from hetserve.planner.profile import ClusterProfile

TARGET_BATCH, TARGET_CONTEXT = 32, 1024


def wants_auto_plan(parallel: ParallelConfig, device: str, num_gpus: int) -> bool:
    """`--plan auto`, or nothing said about placement on a host with more than one GPU."""
    if parallel.plan == "auto":
        return True
    unspecified = (parallel.plan is None and parallel.pipeline_parallel_size == 1
                   and parallel.tensor_parallel_size == 1 and not parallel.devices
                   and not parallel.pipeline_layer_split)
    return unspecified and device in ("auto", "cuda") and num_gpus > 1


def auto_plan(config: EngineConfig, spec: ModelSpec, cluster: ClusterProfile, dtype: str, max_model_len: int) -> Plan:
    """The fastest placement at a decode batch of up to 32 sequences, every worker holding at least
    one full-length sequence of KV cache (the rest of its free memory goes to the cache too)."""
    # GPUs run "auto" unquantized (resolve_quantization).
    weights = config.model.quantization if config.model.quantization in QUANTIZATIONS else None
    cost = CostModel(ModelShape.from_spec(spec, dtype, weights, config.cache.kv_cache_dtype))
    scheduler = config.scheduler
    batch = min(scheduler.max_num_seqs, TARGET_BATCH, scheduler.max_num_batched_tokens)
    request = PartitionRequest(StepShape.decode(batch, min(max_model_len, TARGET_CONTEXT)), kv_tokens=max_model_len,
                               max_batched_tokens=scheduler.max_num_batched_tokens)
    plan = plan_partition(cost, cluster, request).plan
    plan.validate(spec.num_layers, spec.num_kv_heads)
    return plan
