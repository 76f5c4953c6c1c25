"""Per-step costs outside the matmuls and attention, measured on the real engine and server.

The profiler times the model's operators; a served step also spends time preparing inputs,
sampling, scheduling, detokenizing, building outputs and streaming them over HTTP. This runs the
engine on decode batches of several sizes, splits each step into the executor's share and the
engine's own, and fits both as a + b * requests by least squares against the cost model's
prediction of the forward pass; then it serves decode batches over HTTP (server and client on this
host, as `hetserve bench` runs) and fits what a served step costs beyond that. Like Vidur's
CPU-overhead profiles, they make a simulated step last as long as a served one."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import numpy as np

from hetserve.bench.load import BenchClient, LoadConfig, first_model, run_requests
from hetserve.bench.metrics import tpot
from hetserve.bench.workloads import Request, word_vocabulary

from hetserve.model.spec import ModelSpec
from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape
from hetserve.planner.fit import fit_nonnegative_line
from hetserve.planner.profile import ClusterProfile

BATCH_SIZES = (1, 4, 16, 32)
SERVED_CONCURRENCIES = (1, 4, 16, 32)


@dataclass(frozen=True)
class StepTiming:
    num_requests: int
    step: StepShape
    executor_s: float
    engine_s: float


def calibrate(cluster: ClusterProfile, spec: ModelSpec, model: str, dtype: str) -> ClusterProfile:
    """`cluster` with the overheads of the engine and the server serving `model`."""
    cost = CostModel(ModelShape.from_spec(spec, dtype))
    device, timings = measure_steps(model, dtype)
    cluster = fit_overheads(cost, cluster, device, timings)
    return fit_serving_overheads(cost, cluster, device, measure_served_tpot(model, dtype))


def measure_steps(model: str, dtype: str, batch_sizes=BATCH_SIZES, num_tokens: int = 24,
                  prompt_len: int = 64) -> tuple[str, list[StepTiming]]:
    """Decode steps of the real engine in this process (one worker, all threads), and its device."""
    from hetserve import LLM, SamplingParams  # imports torch: only when measuring

    # Float weights, as the cost model that the fits subtract assumes (ModelShape.from_spec(spec, dtype)).
    llm = LLM(model, dtype=dtype, quantization=None, max_num_seqs=max(batch_sizes), enable_prefix_caching=False)
    engine, executor = llm.engine, llm.engine.executor
    submitted, timings = [], []
    executor_time = [0.0]

    def timed(method):
        def call(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                executor_time[0] += time.perf_counter() - start
        return call

    submit, executor.collect = executor.submit, timed(executor.collect)
    executor.submit = timed(lambda output: (submitted.append(output), submit(output)))
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    llm.generate([[1] * prompt_len], SamplingParams(max_tokens=4))  # warm-up
    for batch in batch_sizes:
        for i in range(batch):
            engine.add_request(f"calibrate-{batch}-{i}", None, params,
                               prompt_token_ids=[(i * 7 + j) % 1000 + 1 for j in range(prompt_len)])
        while engine.has_unfinished_requests():
            submitted.clear()
            executor_time[0] = 0.0
            start = time.perf_counter()
            engine.step()
            total = time.perf_counter() - start
            for output in submitted:
                chunks = [(s.start_pos, len(s.token_ids), s.sample) for s in output.scheduled]
                if all(num_new == 1 for _, num_new, _ in chunks):  # decode steps only: prefill is modelled
                    timings.append(StepTiming(len(chunks), StepShape.from_chunks(chunks), executor_time[0],
                                              total - executor_time[0]))
    engine.shutdown()
    return str(engine.executor.device), timings


def fit_overheads(cost: CostModel, cluster: ClusterProfile, device_name: str,
                  timings: list[StepTiming]) -> ClusterProfile:
    """`cluster` with the step overhead of the device the timings were taken on and the engine's
    overheads fitted to them."""
    device = cluster.device(device_name)
    rank = Rank(device, cost.shape.num_kv_heads)
    predicted = [cost.stage_time((rank,), cost.shape.num_layers, t.step, is_last=True) - device.step_overhead
                 for t in timings]
    sizes = [t.num_requests for t in timings]
    worker_fixed, worker_per_request = fit_nonnegative_line(
        sizes, [t.executor_s - p for t, p in zip(timings, predicted)], scales=[t.executor_s for t in timings])
    engine_fixed, engine_per_request = fit_nonnegative_line(
        sizes, [t.engine_s for t in timings], scales=[t.engine_s for t in timings])
    devices = tuple(replace(d, step_overhead=worker_fixed) if d is device else d for d in cluster.devices)
    return replace(cluster, devices=devices, engine_step_overhead=engine_fixed,
                   engine_request_overhead=engine_per_request + worker_per_request)


def measure_served_tpot(model: str, dtype: str, concurrencies=SERVED_CONCURRENCIES, num_tokens: int = 32,
                        prompt_len: int = 64) -> dict[int, float]:
    """Median time per output token of decode batches served over HTTP, by concurrency."""
    from hetserve.server.process import ServerProcess

    with ServerProcess("--model", model, "--dtype", dtype, "--quantization", "none", "--kv-cache-memory", "1GiB"
                       ) as server:
        return {c: asyncio.run(_served_tpot(server.url, c, num_tokens, prompt_len)) for c in concurrencies}


async def _served_tpot(url: str, concurrency: int, num_tokens: int, prompt_len: int) -> float:
    config = LoadConfig(base_url=url, max_concurrency=concurrency, ignore_eos=True)
    client = BenchClient(config, await first_model(config))
    vocab, rng = word_vocabulary(), np.random.default_rng(concurrency)
    requests = [Request(vocab.words(rng, prompt_len), prompt_len, num_tokens) for _ in range(2 * concurrency)]
    results, _ = await run_requests(client, requests, [0.0] * len(requests))
    failed = [r.error for r in results if not r.success]
    if failed:
        raise RuntimeError(f"serving calibration: a request failed: {failed[0]}")
    return float(np.median([tpot(r) for r in results]))


def fit_serving_overheads(cost: CostModel, cluster: ClusterProfile, device_name: str,
                          served: dict[int, float], context: int = 80) -> ClusterProfile:
    """`cluster` with what a served decode step takes beyond the calibrated engine's prediction
    added to the engine's overheads."""
    rank = Rank(cluster.device(device_name), cost.shape.num_kv_heads)
    sizes = sorted(served)
    predicted = [cost.stage_time((rank,), cost.shape.num_layers, StepShape.decode(c, context), is_last=True)
                 + cluster.engine_step_overhead + c * cluster.engine_request_overhead for c in sizes]
    fixed, per_request = fit_nonnegative_line(sizes, [served[c] - p for c, p in zip(sizes, predicted)],
                                              scales=[served[c] for c in sizes])
    return replace(cluster, engine_step_overhead=cluster.engine_step_overhead + fixed,
                   engine_request_overhead=cluster.engine_request_overhead + per_request)
