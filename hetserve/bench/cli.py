"""`hetserve bench`: flags, and one benchmark run per request rate against a running server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from hetserve.bench import option
from hetserve.bench.load import BenchClient, LoadConfig, arrival_times, first_model, run_requests
from hetserve.bench.metrics import SLO, SLO_METRICS, RateRun, parse_slo, summarize
from hetserve.bench.report import format_summary, report_runs
from hetserve.bench.workloads import Request, WorkloadConfig, build_requests, load_vocabulary
from hetserve.flags import add_dataclass_flags, collect

@dataclass
class OutputConfig:
    out: str | None = option("Write the config, each rate's summary and every request's record to this JSON file.",
                             None)
    plot_dir: str | None = option(
        "Write PNG plots here: latency CDFs and, for a sweep, throughput and p99 latencies against rate.", None)
    disable_tqdm: bool = option("No progress bar.", False)


CONFIGS = (WorkloadConfig, LoadConfig, OutputConfig)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="Benchmark an OpenAI-compatible server (like `vllm bench serve`).",
        description="Send a workload to an OpenAI-compatible server at one or more request rates and report "
                    "TTFT, TPOT, ITL, end-to-end latency, throughput and goodput as vLLM defines them.")
    for cls in CONFIGS:
        add_dataclass_flags(bench, cls)
    bench.add_argument(
        "--goodput", nargs="+", default=None, metavar="METRIC:MS",
        help=f"Service-level objectives ({', '.join(SLO_METRICS)}) in milliseconds, e.g. ttft:200 tpot:50; "
             "goodput counts the completed requests meeting all of them, per second.")


def _config(args: argparse.Namespace, cls):
    return cls(**collect(args, cls))


def run_bench(args: argparse.Namespace) -> int:
    workload, load, output = (_config(args, cls) for cls in CONFIGS)
    slo = parse_slo(args.goodput) if args.goodput else None
    vocab = load_vocabulary(workload.tokenizer)
    requests = build_requests(workload, vocab)
    model = load.model or asyncio.run(first_model(load))
    # Output tokens are counted by the server's usage; a tokenizer is the next best counter.
    client = BenchClient(load, model, vocab.count if vocab.exact else None)
    runs = asyncio.run(_run_rates(client, requests, workload.seed, slo, output.disable_tqdm, vocab.exact))
    config = {"model": model, "workload": dataclasses.asdict(workload), "load": dataclasses.asdict(load),
              "goodput": dataclasses.asdict(slo) if slo else None, "exact_input_lengths": vocab.exact}
    config["load"]["api_key"] = None  # never write a secret to a results file
    report_runs(runs, config, output.out, output.plot_dir)
    return 0


async def _run_rates(client: BenchClient, requests: list[Request], seed: int, slo: SLO | None,
                     disable_tqdm: bool, exact_lengths: bool) -> list[RateRun]:
    """One run per request rate, each summarized on stdout as soon as it ends."""
    runs = []
    for rate in client.config.rates:
        times = arrival_times(len(requests), rate, client.config.burstiness, np.random.default_rng(seed))
        with tqdm(total=len(requests), disable=disable_tqdm, desc=f"rate {rate:g}") as bar:
            results, duration = await run_requests(client, requests, times, lambda: bar.update(1))
        runs.append(RateRun(rate, summarize(results, duration, slo), results))
        print(format_summary(runs[-1], exact_lengths))
        sys.stdout.flush()
    return runs
