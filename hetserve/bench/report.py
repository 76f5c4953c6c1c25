"""What a benchmark leaves behind: a summary table on stdout, a JSON file, and PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hetserve.bench.metrics import BenchmarkSummary, Distribution, RateRun, tpot

WIDTH = 50
LATENCIES = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _line(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label + ':':<40}{text:>10}"


def _section(title: str, fill: str = "-") -> str:
    return f" {title} ".center(WIDTH, fill)


def _latency_lines(summary: BenchmarkSummary) -> list[str]:
    lines = []
    for key, title, short in LATENCIES:
        stats: Distribution = getattr(summary, key)
        lines.append(_section(title))
        lines += [_line(f"{name} {short} (ms)", getattr(stats, attr))
                  for name, attr in (("Mean", "mean"), ("Median", "median"), ("P90", "p90"), ("P99", "p99"),
                                     ("Std", "std"))]
    return lines


def format_summary(run: RateRun, exact_lengths: bool) -> str:
    """vLLM's result table for one run."""
    summary = run.summary
    lines = [
        _section("Serving Benchmark Result", "="),
        _line("Request rate (req/s)", rate_label(run.request_rate)),
        _line("Successful requests", summary.completed),
        _line("Failed requests", summary.failed),
        _line("Benchmark duration (s)", summary.duration_s),
        _line("Total input tokens", summary.total_input_tokens),
        _line("Total generated tokens", summary.total_output_tokens),
        _line("Request throughput (req/s)", summary.request_throughput),
        _line("Output token throughput (tok/s)", summary.output_throughput),
        _line("Total token throughput (tok/s)", summary.total_token_throughput),
    ]
    if summary.goodput is not None:
        lines.append(_line("Request goodput (req/s)", summary.goodput))
    lines += _latency_lines(summary)
    if not exact_lengths:
        lines.append("Input token counts are approximate (words); pass --tokenizer for exact counts.")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep(runs: list[RateRun]) -> str:
    """One row per request rate: throughput and the p99 latencies a sweep is read by."""
    header = f"{'rate':>6} {'ok':>5} {'failed':>6} {'req/s':>7} {'out tok/s':>10} " \
             f"{'p99 TTFT':>9} {'p99 TPOT':>9} {'p99 E2EL':>9}"
    rows = [f"{rate_label(run.request_rate):>6} {run.summary.completed:>5} {run.summary.failed:>6} "
            f"{run.summary.request_throughput:>7.2f} {run.summary.output_throughput:>10.2f} "
            f"{run.summary.ttft.p99:>9.2f} {run.summary.tpot.p99:>9.2f} {run.summary.e2el.p99:>9.2f}"
            for run in runs]
    return "\n".join([_section("Request rate sweep (latencies in ms)", "="), header, *rows])


def to_json(config: dict[str, Any], runs: list[RateRun]) -> dict[str, Any]:
    # JSON has no infinity: an unbounded rate is written "inf".
    return {"config": config,
            "runs": [{"request_rate": rate_label(run.request_rate) if math.isinf(run.request_rate)
                      else run.request_rate,
                      "summary": asdict(run.summary),
                      "requests": [asdict(result) for result in run.results]} for run in runs]}


def write_json(path: str | Path, config: dict[str, Any], runs: list[RateRun]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(config, runs), indent=2) + "\n")
    return path


def _latencies_ms(run: RateRun) -> dict[str, list[float]]:
    done = [result for result in run.results if result.success]
    return {"TTFT": [result.ttft * 1000 for result in done],
            "TPOT": [value * 1000 for value in map(tpot, done) if value is not None],
            "E2EL": [result.e2e * 1000 for result in done]}


def write_plots(plot_dir: str | Path, runs: list[RateRun]) -> list[Path]:
    """latency_cdf.png (one line per rate) and, for a sweep, sweep.png (throughput and p99
    latencies against the request rate)."""
    import matplotlib  # lazily: only runs that plot pay for it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = [_plot_cdfs(plt, plot_dir / "latency_cdf.png", runs)]
    if len(runs) > 1:
        paths.append(_plot_sweep(plt, plot_dir / "sweep.png", runs))
    return paths


def _plot_cdfs(plt, path: Path, runs: list[RateRun]) -> Path:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        for ax, (name, values) in zip(axes, _latencies_ms(run).items()):
            values = sorted(values)[:1] + sorted(values)  # the curve rises from 0 at the fastest request
            fractions = [i / (len(values) - 1) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=f"{rate_label(run.request_rate)} req/s")
            ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, figure, path)


def _plot_sweep(plt, path: Path, runs: list[RateRun]) -> Path:
    # Rates sit at even positions so that "inf" has a place on the axis.
    positions = range(len(runs))
    labels = [rate_label(run.request_rate) for run in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot(positions, [run.summary.output_throughput for run in runs], marker="o")
    left.set(title="Output token throughput", ylabel="tokens/s")
    for key, _, short in LATENCIES:
        right.plot(positions, [getattr(run.summary, key).p99 for run in runs], marker="o", label=f"p99 {short}")
    right.set(title="p99 latencies", ylabel="ms")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(list(positions), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    return _save(plt, figure, path)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def report_runs(runs: list[RateRun], config: dict[str, Any], out: str | None, plot_dir: str | None) -> None:
    """What follows the per-rate summaries: the sweep table (for several rates), the JSON file and the
    plots, each where asked."""
    if len(runs) > 1:
        print(format_sweep(runs))
    if out:
        print(f"wrote {write_json(out, config, runs)}")
    if plot_dir:
        for path in write_plots(plot_dir, runs):
            print(f"wrote {path}")
