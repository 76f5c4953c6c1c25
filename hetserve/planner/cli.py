"""`hetserve profile` and `hetserve plan`: measure this machine's devices, and place a model on
measured or hypothetical devices."""

from __future__ import annotations

import argparse

from hetserve.bench.metrics import SLO
from hetserve.bench.workloads import WorkloadConfig, build_requests, word_vocabulary
from hetserve.config import KV_CACHE_DTYPES, CacheConfig, SchedulerConfig, parse_size
from hetserve.flags import add_dataclass_flags, collect
from hetserve.model.spec import ModelSpec
from hetserve.planner.cost_model import CostModel, ModelShape, StepShape
from hetserve.planner.disaggregation import DisaggregationPlanner
from hetserve.planner.models import KNOWN_MODELS, planning_model
from hetserve.planner.offload import OffloadTarget, OffloadWorkload, search_offload_policy
from hetserve.planner.partition import PartitionRequest, plan_partition, uniform_partition
from hetserve.planner.plan import parse_int_list
from hetserve.planner.profile import ClusterProfile, Link


def add_model_and_devices_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --quantization and --devices, shared by `plan` and `simulate`."""
    parser.add_argument("--model", default=None,
                        help="Model: anything `serve` takes, a config.json (or its directory), or a known "
                             f"architecture ({', '.join(KNOWN_MODELS)}); default: the packaged SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="Compute and KV-cache dtype (devices without it use the nearest they compute).")
    parser.add_argument("--quantization", default=None, choices=("int8", "int4"),
                        help="Weight-only quantized storage to plan memory and bandwidth for.")
    parser.add_argument("--devices", default=None, metavar="FILE",
                        help="Device profile JSON (from `hetserve profile --out`, or written from datasheets for "
                             "hardware that is not here, see docs/planning.md); default: this machine's profile, "
                             "measured once and cached.")
    parser.add_argument("--refresh-profile", action="store_true",
                        help="Measure this machine again instead of reading the cached profile.")


def load_cluster(devices_file: str | None, spec: ModelSpec, model_path: str | None,
                 refresh: bool = False) -> ClusterProfile:
    """The profile in `devices_file`, else this machine's, measured once for the model (with the
    engine's overheads when its weights are here) and cached."""
    if devices_file is not None:
        return ClusterProfile.load(devices_file)
    from hetserve.planner.profiler import cached_profile  # imports torch: only when measuring

    return cached_profile(spec, refresh=refresh, model=model_path)


# -- hetserve profile -----------------------------------------------------------------------------


def add_profile_parser(subparsers: argparse._SubParsersAction) -> None:
    profile = subparsers.add_parser(
        "profile", help="Measure this machine's devices for a model (cached; `plan` and `simulate` use it).",
        description="Time the model's matmuls, attention and decoder layers on the CPU and every GPU, the "
                    "link between worker processes, and the engine's and server's per-step overheads.")
    profile.add_argument("--model", default=None, help="Model to profile (default: the packaged SmolLM2).")
    profile.add_argument("--quick", action="store_true", help="Fewer measurements (about 4x faster, coarser).")
    profile.add_argument("--refresh", action="store_true", help="Measure again even if a profile is cached.")
    profile.add_argument("--out", default=None, help="Also write the profile to this JSON file.")


def run_profile(args: argparse.Namespace) -> int:
    from hetserve.planner.profiler import cached_profile, profile_cache_path

    spec, model_path = planning_model(args.model)
    cluster = cached_profile(spec, quick=args.quick, refresh=args.refresh, model=model_path)
    print(format_profile(cluster))
    print(f"cached at {profile_cache_path(cluster.fingerprint)}")
    if args.out:
        print(f"wrote {cluster.save(args.out)}")
    return 0


def format_profile(cluster: ClusterProfile) -> str:
    lines = []
    for device in cluster.devices:
        flops = ", ".join(f"{dtype} {value / 1e12:.2f}" for dtype, value in device.flops.items())
        lines.append(f"{device.name} ({device.kind}, {device.cores} cores, {device.memory / 2**30:.1f} GiB): "
                     f"matmul TFLOP/s {flops}; memory {device.memory_bandwidth / 1e9:.1f} GB/s; "
                     f"decode attention {(device.attention_bandwidth or 0) / 1e9:.1f} GB/s; overheads: "
                     f"{device.layer_overhead * 1e6:.0f} us/layer, {device.token_overhead * 1e6:.1f} us/token/layer, "
                     f"{device.step_overhead * 1e3:.2f} ms/step")
    link = cluster.intra_host
    lines.append(f"process to process: {link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.0f} us; engine and "
                 f"server: {cluster.engine_step_overhead * 1e3:.2f} ms/step + "
                 f"{cluster.engine_request_overhead * 1e3:.3f} ms/request/step")
    return "\n".join(lines)


# -- hetserve plan --------------------------------------------------------------------------------


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser(
        "plan", help="Place a model's layers and KV cache on devices; write the plan `serve --plan` takes.",
        description="PipeEdge-style partition: contiguous layer ranges per device (tensor-parallel groups inside a "
                    "host) minimizing the slowest stage at the target batch, within each device's memory. With "
                    "--slo-ttft and --slo-tpot, also DistServe-style prefill/decode disaggregation.")
    add_model_and_devices_flags(plan)
    target = plan.add_argument_group("target")
    target.add_argument("--batch-size", type=int, default=32, help="Decode batch per step to plan for.")
    target.add_argument("--context-len", type=int, default=1024, help="Context length of that batch.")
    target.add_argument("--kv-tokens", type=int, default=None,
                        help="KV-cache tokens every worker must hold (default: batch size x context length).")
    target.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="KV-cache storage the workers will use (as `serve --kv-cache-dtype`).")
    target.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="Largest step in tokens (sizes the activation memory).")
    target.add_argument("--tp-sizes", default="1,2,4,8", help="Tensor-parallel group sizes a stage may have.")
    target.add_argument("--use-all-devices", action="store_true", help="Give every device a stage.")
    target.add_argument("--out", default=None, help="Write the plan JSON here (for `hetserve serve --plan`).")
    offload = plan.add_argument_group("weight offload (FlexGen)")
    offload.add_argument("--memory-budget", default=None,
                         help="Device memory (e.g. 2GiB) for weights and KV cache: search the split of weights between "
                              "device, host RAM and disk, of KV between device and host, and the batch size (up to "
                              "--batch-size) that maximize decode throughput on one device.")
    offload.add_argument("--cpu-offload-gb", type=float, default=0.0,
                         help="GiB of host RAM the offload policy may fill (on a GPU).")
    offload.add_argument("--disk-bandwidth", type=float, default=2.0,
                         help="GB/s read from the offload disk (default: an NVMe SSD's).")
    offload.add_argument("--offload-kv", action="store_true",
                         help="Let the search put KV cache in host RAM too, as FlexGen does (hetserve itself serves "
                              "KV from the device, so such a policy is a prediction only).")
    offload.add_argument("--prompt-len", type=int, default=512, help="Prompt tokens per request.")
    offload.add_argument("--output-len", type=int, default=128, help="Output tokens per request.")
    slo = plan.add_argument_group("disaggregation (DistServe)")
    slo.add_argument("--slo-ttft", type=float, default=None, help="Time-to-first-token objective in ms.")
    slo.add_argument("--slo-tpot", type=float, default=None, help="Time-per-output-token objective in ms.")
    add_dataclass_flags(plan, WorkloadConfig, only=("workload", "num_prompts", "seed", "random_input_len",
                                                    "random_output_len", "chat_input_len", "chat_output_len"))


def run_plan(args: argparse.Namespace) -> int:
    spec, model_path = planning_model(args.model)
    cluster = load_cluster(args.devices, spec, model_path, args.refresh_profile)
    cost = CostModel(ModelShape.from_spec(spec, args.dtype, args.quantization, args.kv_cache_dtype))
    if args.memory_budget is not None:
        return run_offload_plan(args, cost, cluster)
    request = PartitionRequest(StepShape.decode(args.batch_size, args.context_len),
                               args.kv_tokens or args.batch_size * args.context_len, args.max_num_batched_tokens,
                               tuple(parse_int_list(args.tp_sizes)), args.use_all_devices)
    partition = plan_partition(cost, cluster, request)
    print(partition.describe())
    print(f"predicted decode throughput: {args.batch_size / partition.bottleneck:,.0f} tokens/s "
          f"({len(partition.plan.stages)} batches of {args.batch_size} in flight, one per stage)")
    accelerators = [d for d in cluster.devices if d.kind != "cpu"] or list(cluster.devices)
    uniform = uniform_partition(cost, cluster, request, accelerators)
    print("uniform split over " + ", ".join(d.name for d in accelerators) + ": " + (
        f"bottleneck {uniform.bottleneck * 1e3:.2f} ms/step, KV cache {uniform.kv_tokens:,} tokens"
        if uniform else "does not fit"))
    if args.out:
        with open(args.out, "w") as f:
            f.write(partition.plan.to_json() + "\n")
        print(f"wrote {args.out}: hetserve serve --plan {args.out}")
    if args.slo_ttft is not None or args.slo_tpot is not None:
        workload = WorkloadConfig(**collect(args, WorkloadConfig))
        planner = DisaggregationPlanner(
            cost, cluster, build_requests(workload, word_vocabulary()), SLO(ttft=args.slo_ttft, tpot=args.slo_tpot),
            SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens), CacheConfig(kv_cache_memory_fraction=0.9))
        print(planner.plan().describe())
        print(f"(simulated on the {workload.workload} workload, {workload.num_prompts} requests per run)")
    return 0


def run_offload_plan(args: argparse.Namespace, cost: CostModel, cluster: ClusterProfile) -> int:
    """FlexGen's policy search on the fastest kind of device here (a GPU if there is one)."""
    device = next((d for d in cluster.devices if d.kind == "cuda"), cluster.devices[0])
    target = OffloadTarget(device, parse_size(args.memory_budget), args.cpu_offload_gb * 2**30,
                           Link(bandwidth=args.disk_bandwidth * 1e9, latency=100e-6), kv_in_host=args.offload_kv)
    workload = OffloadWorkload(args.prompt_len, args.output_len, args.batch_size)
    print(f"on {device.name}: " + search_offload_policy(cost, target, workload).describe())
    return 0
