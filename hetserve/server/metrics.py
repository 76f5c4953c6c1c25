"""Prometheus metrics, named like vLLM's with the prefix `hetserve:`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hetserve.engine.llm_engine import LLMEngine
from hetserve.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


@dataclass
class _Progress:
    num_tokens: int = 0
    last_token_time: float | None = None


class _EngineStateCollector:
    """Gauges and totals read from the scheduler when /metrics is scraped."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        scheduler = self.engine.scheduler
        stats = scheduler.stats()
        yield _gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield _gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                     stats.kv_used_fraction)
        yield _gauge("kv_cache_used_blocks", "KV-cache blocks held by requests.",
                     scheduler.block_manager.num_used_blocks)
        yield _gauge("kv_cache_total_blocks", "KV-cache blocks in the pool.", scheduler.block_manager.num_blocks)
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        yield _gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
                     hit_rate)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                       stats.prefix_cache_queries)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield _counter("num_preemptions", "Requests preempted (KV freed, recomputed later).",
                       stats.num_preemptions)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"hetserve:{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"hetserve:{name}", documentation, value=value)


class ServerMetrics:
    def __init__(self, engine: LLMEngine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStateCollector(engine))
        self.prompt_tokens = Counter("hetserve:prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("hetserve:generation_tokens", "Generated tokens.",
                                         registry=self.registry)
        self.request_success = Counter("hetserve:request_success", "Finished requests.", ["finished_reason"],
                                       registry=self.registry)
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = self._histogram("inter_token_latency_seconds", "Time between consecutive tokens.")
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue_time = self._histogram("request_queue_time_seconds", "Arrival to first scheduled.")
        self._progress: dict[str, _Progress] = {}
        self._lock = threading.Lock()

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(f"hetserve:{name}", documentation, buckets=LATENCY_BUCKETS, registry=self.registry)

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Called by the engine loop with each step's outputs."""
        now = time.monotonic()
        with self._lock:
            for output in outputs:
                self._observe(output, now)

    def on_abort(self, request_id: str) -> None:
        with self._lock:
            self._progress.pop(request_id, None)

    def _observe(self, output: RequestOutput, now: float) -> None:
        progress = self._progress.setdefault(output.request_id, _Progress())
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        new_tokens = num_tokens - progress.num_tokens
        metrics = output.metrics
        if new_tokens > 0:
            self.generation_tokens.inc(new_tokens)
            if progress.last_token_time is None:
                self.ttft.observe(metrics.first_token_time - metrics.arrival_time)
            else:
                self.itl.observe(now - progress.last_token_time)
            progress.num_tokens, progress.last_token_time = num_tokens, now
        if output.finished:
            del self._progress[output.request_id]
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.e2e.observe(now - metrics.arrival_time)
            if metrics.first_scheduled_time is not None:
                self.queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
            for completion in output.outputs:
                self.request_success.labels(completion.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
