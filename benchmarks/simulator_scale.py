"""How long `hetserve simulate` takes at scale: 10,000 chat requests on a 16-GPU plan of Llama-3-70B
(8 pipeline stages x tensor parallel 2, datasheet A100s), arriving at 6 requests/s.

    .venv/bin/python benchmarks/simulator_scale.py --out results/simulator_scale.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hetserve.bench.load import arrival_times
from hetserve.bench.metrics import summarize
from hetserve.bench.workloads import WorkloadConfig, build_requests, word_vocabulary
from hetserve.config import CacheConfig, SchedulerConfig
from hetserve.planner.cost_model import CostModel, ModelShape
from hetserve.planner.models import KNOWN_MODELS
from hetserve.planner.plan import Plan
from hetserve.planner.profile import ClusterProfile, DeviceProfile, Link
from hetserve.sim.simulator import Simulator, num_kv_blocks, plan_stages
from hetserve.sim.workload import to_sim_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=10_000)
    parser.add_argument("--request-rate", type=float, default=6.0)
    parser.add_argument("--out", default="results/simulator_scale.json")
    args = parser.parse_args()
    gpus = tuple(DeviceProfile(f"a100-{i}", "cuda", int(80e9), {"bfloat16": 312e12}, 2.0e12, device=f"cuda:{i % 8}",
                               host=f"node{i // 8}") for i in range(16))
    cluster = ClusterProfile(gpus, intra_host=Link(300e9, 5e-6), inter_host=Link(25e9, 10e-6))
    spec = KNOWN_MODELS["llama-3-70b"]
    cost = CostModel(ModelShape.from_spec(spec))
    plan = Plan.from_sizes(spec.num_layers, 8, 2, devices=[g.plan_device for g in gpus])
    plan = Plan(tuple(replace(stage, host=f"node{i // 4}") for i, stage in enumerate(plan.stages)))
    stages = plan_stages(plan, cluster, spec.num_kv_heads)
    simulator = Simulator(cost, stages, SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
                          num_kv_blocks(cost, plan, stages, CacheConfig(kv_cache_memory_fraction=0.9)))
    workload = WorkloadConfig(workload="chat", num_prompts=args.num_prompts, chat_input_len=512, chat_output_len=128)
    requests = build_requests(workload, word_vocabulary())
    times = arrival_times(len(requests), args.request_rate, 1.0, np.random.default_rng(0))
    start = time.perf_counter()
    run = simulator.run(to_sim_requests(requests, times))
    elapsed = time.perf_counter() - start
    summary = summarize(run.results, run.duration)
    report = {"requests": args.num_prompts, "devices": len(gpus), "plan": plan.describe(), "steps": run.num_steps,
              "wall_seconds": elapsed, "simulated_seconds": run.duration,
              "output_throughput": summary.output_throughput, "median_tpot_ms": summary.tpot.median}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
