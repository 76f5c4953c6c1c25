"""Benchmark metrics as vLLM defines them (`vllm bench serve`), as pure functions of the per-request
results and the run's duration. Failed requests are counted, never averaged into a latency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hetserve.bench.load import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency over requests (or, for ITL, over every gap), in milliseconds."""

    count: int
    mean: float
    std: float
    median: float
    p90: float
    p99: float


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; goodput counts requests meeting every one given."""

    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None

    def met_by(self, result: RequestResult) -> bool:
        # A one-token output has no time per output token: it meets any TPOT objective (vLLM).
        measured = {"ttft": result.ttft, "tpot": tpot(result) or 0.0, "e2el": result.e2e}
        return all(getattr(self, name) is None or measured[name] * 1000 <= getattr(self, name)
                   for name in SLO_METRICS)


@dataclass(frozen=True)
class BenchmarkSummary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution


def parse_slo(items: Sequence[str]) -> SLO:
    """An SLO from ["ttft:200", "tpot:50"] (milliseconds)."""
    values = {}
    for item in items:
        name, _, number = item.partition(":")
        if name not in SLO_METRICS:
            raise ValueError(f"goodput: {item!r}: the metric must be one of {', '.join(SLO_METRICS)}")
        try:
            values[name] = float(number)
        except ValueError:
            raise ValueError(f"goodput: {item!r}: expected METRIC:MILLISECONDS, e.g. ttft:200") from None
        if values[name] <= 0:
            raise ValueError(f"goodput: {item!r}: the objective must be positive")
    return SLO(**values)


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, in seconds; None for outputs of one token."""
    if result.output_tokens < 2:
        return None
    return (result.e2e - result.ttft) / (result.output_tokens - 1)


def distribution(seconds: Sequence[float]) -> Distribution:
    if len(seconds) == 0:
        return Distribution(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    ms = np.asarray(seconds, dtype=float) * 1000
    median, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
    return Distribution(len(ms), float(ms.mean()), float(ms.std()), median, p90, p99)


def summarize(results: Sequence[RequestResult], duration: float, slo: SLO | None = None) -> BenchmarkSummary:
    """Metrics of one run; throughputs are per second of `duration`, over completed requests only."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    done = [result for result in results if result.success]
    input_tokens = sum(result.prompt_len for result in done)
    output_tokens = sum(result.output_tokens for result in done)
    tpots = [value for value in map(tpot, done) if value is not None]
    return BenchmarkSummary(
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        goodput=None if slo is None else sum(map(slo.met_by, done)) / duration,
        ttft=distribution([result.ttft for result in done]),
        tpot=distribution(tpots),
        itl=distribution([gap for result in done for gap in result.itl]),
        e2el=distribution([result.e2e for result in done]),
    )


@dataclass
class RateRun:
    """One run of a sweep: its request rate (inf: all at once), summary and per-request results."""

    request_rate: float
    summary: BenchmarkSummary
    results: list[RequestResult]
