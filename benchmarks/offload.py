"""Weight offload on this machine: decode throughput of the packaged model with all weights in memory
and with a memory budget of 40 % of them (the remaining layers streamed from per-layer files on disk),
next to the offload planner's prediction for the same placement. The prediction uses a quick profile
of this CPU for compute and the read speed the streamer measured for the transfers.

    .venv/bin/python benchmarks/offload.py --out results/offload.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from hetserve import LLM, SamplingParams
from hetserve.planner.cost_model import CostModel, ModelShape
from hetserve.planner.offload import OffloadPolicy, OffloadTarget, OffloadWorkload, evaluate_policy
from hetserve.planner.profile import DeviceProfile, Link
from hetserve.planner.profiler import profile_device

PROMPT_WORDS = "Describe the history of the harbour city and its merchants, mills and railways"


def decode_throughput(llm: LLM, batch: int, max_tokens: int, repeats: int) -> float:
    """Best of `repeats` runs: the machine is shared, and other work only ever slows a run down."""
    prompts = [f"{i}. {PROMPT_WORDS}" for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start))
    return best


def greedy_tokens(llm: LLM) -> list[list[int]]:
    outputs = llm.generate([PROMPT_WORDS, "The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    return [o.outputs[0].token_ids for o in outputs]


def predicted(llm: LLM, device: DeviceProfile, dtype: str, budget: int, disk_bandwidth: float,
              workload: OffloadWorkload) -> OffloadPolicy:
    """The planner's figure for the engine's budget: device memory is the weight budget plus the KV
    and activations of the batch, so the planner places the layers as the engine did."""
    cost = CostModel(ModelShape.from_spec(llm.engine.spec, dtype))
    shape, batch = cost.shape, workload.max_batch_size
    kv = batch * workload.max_context * shape.num_layers * shape.kv_bytes_per_token()
    target = OffloadTarget(device, budget + kv + shape.activation_bytes(batch),
                           disk=Link(bandwidth=disk_bandwidth, latency=0.0))
    return evaluate_policy(cost, target, workload, batch, kv_device_fraction=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--budget-fraction", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="Compute threads. On a shared machine two OpenMP threads wait for each other whenever "
                             "either is descheduled, which made in-memory runs 3-10x slower and erratic here.")
    parser.add_argument("--out", default="results/offload.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"dtype": args.dtype, "kv_cache_memory": "256MiB", "max_model_len": 512, "swap_space": 0}
    in_memory = LLM(**options)
    weight_bytes = sum(p.numel() * p.element_size() for p in in_memory.engine.executor.workers[0].model.parameters())
    reference = greedy_tokens(in_memory)
    in_memory_tps = decode_throughput(in_memory, args.batch, args.max_tokens, args.repeats)
    del in_memory
    budget = int(args.budget_fraction * weight_bytes)
    with tempfile.TemporaryDirectory() as layers_dir:
        offloaded = LLM(memory_budget=budget, disk_offload_dir=layers_dir, **options)
        worker = offloaded.engine.executor.workers[0]
        same_tokens = greedy_tokens(offloaded) == reference
        offloaded_tps = decode_throughput(offloaded, args.batch, args.max_tokens, args.repeats)
        stats = worker.offload.streamer.stats
        disk_bandwidth = stats.bytes_loaded / stats.load_seconds
        prompt_len = len(offloaded.engine.tokenizer.encode(f"0. {PROMPT_WORDS}"))
        workload = OffloadWorkload(prompt_len, args.max_tokens, args.batch)
        device = profile_device(offloaded.engine.spec, "cpu", [args.dtype], quick=True, threads=args.threads)
        policy = predicted(offloaded, device, args.dtype, budget, disk_bandwidth, workload)
        in_memory_policy = predicted(offloaded, device, args.dtype, weight_bytes, disk_bandwidth, workload)
        report = {
            "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
            "dtype": args.dtype, "batch": args.batch, "max_tokens": args.max_tokens,
            "weight_bytes": weight_bytes, "memory_budget": budget,
            "tiers": {tier: worker.offload.tiers.count(tier) for tier in ("device", "host", "disk")},
            "planner_tiers": {tier: policy.tiers.count(tier) for tier in ("device", "host", "disk")},
            "resident_weight_bytes_peak": sum(p.numel() * p.element_size() for p in worker.model.parameters())
            + stats.peak_resident_bytes,
            "greedy_tokens_equal_in_memory": same_tokens,
            "tokens_per_s": {"in_memory": in_memory_tps, "in_memory_predicted": in_memory_policy.tokens_per_s,
                             "offloaded": offloaded_tps, "offloaded_predicted": policy.tokens_per_s},
            "predicted_step_ms": {"compute": policy.compute_time * 1e3, "transfer": policy.transfer_time * 1e3,
                                  "step": policy.step_time * 1e3},
            "streamer": {"loads": stats.loads, "prefetched": stats.prefetched, "waited": stats.waited,
                         "read_bandwidth_gb_s": disk_bandwidth / 1e9},
        }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
