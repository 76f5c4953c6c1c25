"""`hetserve simulate`: a `hetserve bench` run predicted instead of measured, for any plan on any
(possibly hypothetical) devices. Same workloads, same metrics, same report and JSON."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from hetserve.bench.load import LoadConfig, arrival_times
from hetserve.bench.metrics import SLO_METRICS, RateRun, parse_slo, summarize
from hetserve.bench.report import format_summary, report_runs
from hetserve.bench.workloads import WorkloadConfig, build_requests, load_vocabulary
from hetserve.config import CacheConfig, SchedulerConfig
from hetserve.flags import add_dataclass_flags, collect
from hetserve.planner.cost_model import CostModel, ModelShape
from hetserve.planner.cli import add_model_and_devices_flags, load_cluster
from hetserve.planner.models import planning_model
from hetserve.planner.plan import Plan, parse_int_list
from hetserve.sim.simulator import Simulator, num_kv_blocks, plan_stages
from hetserve.sim.workload import to_sim_requests

LOAD_FLAGS = ("request_rate", "burstiness", "max_concurrency")


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    simulate = subparsers.add_parser(
        "simulate", help="Predict a `hetserve bench` run of a plan with the cost model and the real scheduler.",
        description="Discrete-event simulation of the engine: the scheduler and block manager decide every step, "
                    "the cost model of the device profile times it. Reports what `hetserve bench` reports.")
    add_model_and_devices_flags(simulate)
    layout = simulate.add_argument_group("plan")
    layout.add_argument("--plan", default=None, help="Plan JSON (from `hetserve plan --out`); default: the "
                                                     "shorthands below.")
    layout.add_argument("--pipeline-parallel-size", type=int, default=1)
    layout.add_argument("--tensor-parallel-size", type=int, default=1)
    layout.add_argument("--pipeline-layer-split", default=None, help="Layers per stage, e.g. 12,18.")
    layout.add_argument("--device", default="auto", help="Device of every worker of a shorthand plan.")
    for cls in (SchedulerConfig, CacheConfig, WorkloadConfig):
        add_dataclass_flags(simulate, cls)
    add_dataclass_flags(simulate, LoadConfig, only=LOAD_FLAGS)
    simulate.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                          help=f"Service-level objectives ({', '.join(SLO_METRICS)}) in milliseconds.")
    simulate.add_argument("--out", default=None, help="Write the results as `hetserve bench --out` does.")
    simulate.add_argument("--plot-dir", default=None, help="Write the plots `hetserve bench` draws.")


def run_simulate(args: argparse.Namespace) -> int:
    spec, model_path = planning_model(args.model)
    cluster = load_cluster(args.devices, spec, model_path, args.refresh_profile)
    cache = CacheConfig(**collect(args, CacheConfig))
    cost = CostModel(ModelShape.from_spec(spec, args.dtype, args.quantization, cache.kv_cache_dtype))
    plan = Plan.load(args.plan) if args.plan else Plan.from_sizes(
        spec.num_layers, args.pipeline_parallel_size, args.tensor_parallel_size,
        parse_int_list(args.pipeline_layer_split), default_device=args.device)
    plan.validate(spec.num_layers, spec.num_kv_heads)
    stages = plan_stages(plan, cluster, spec.num_kv_heads)
    scheduler = SchedulerConfig(**collect(args, SchedulerConfig))
    workload, load = WorkloadConfig(**collect(args, WorkloadConfig)), LoadConfig(**collect(args, LoadConfig))
    slo = parse_slo(args.goodput) if args.goodput else None
    simulator = Simulator(cost, stages, scheduler, num_kv_blocks(cost, plan, stages, cache), cache.block_size,
                          cache.enable_prefix_caching, cluster.engine_step_overhead,
                          cluster.engine_request_overhead, load.max_concurrency)
    vocab = load_vocabulary(workload.tokenizer)
    requests = build_requests(workload, vocab)
    print(f"simulating {plan.describe()} on {', '.join(d.name for d in cluster.devices)}: "
          f"{simulator.num_blocks} KV blocks of {cache.block_size} tokens")
    runs = []
    for rate in load.rates:
        times = arrival_times(len(requests), rate, load.burstiness, np.random.default_rng(workload.seed))
        result = simulator.run(to_sim_requests(requests, times))
        runs.append(RateRun(rate, summarize(result.results, result.duration, slo), result.results))
        print(format_summary(runs[-1], vocab.exact))
    config = {"model": args.model or "default", "simulated": True, "plan": plan.describe(),
              "workload": dataclasses.asdict(workload), "load": dataclasses.asdict(load),
              "goodput": dataclasses.asdict(slo) if slo else None, "exact_input_lengths": vocab.exact}
    report_runs(runs, config, args.out, args.plot_dir)
    return 0
