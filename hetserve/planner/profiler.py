"""Measure this machine's devices at a model's shapes and fill in the ClusterProfile that the
planner reads (hetserve.planner.profile); `cached_profile` keeps one per hardware and model.

Each figure is measured to mean what hetserve.planner.cost_model assumes of it:

- `linear`: the model's own linear op (hetserve.model.llama.linear), at each layer shape and the LM head. Weights are cold:
  successive calls read different copies, as a step reads each layer's weights from memory once,
  where repeating one call would time a warm cache (up to twice as fast for SmolLM2 shapes).
- `memory_bandwidth`: a streaming read (sum) of a tensor larger than the caches. The cost model
  uses it only where no timing applies (shapes or weight dtypes not measured, datasheet-like), so it
  stands for the hardware; a figure derived from 1-token matmuls would fold their per-call cost in.
- `attention_bandwidth`, `attention_flops`: the model's paged decode and causal prefill attention.
- `layer_overhead`, `token_overhead`: what a real decoder layer takes beyond the cost model's
  prediction from the figures above (norms, RoPE, KV writes, launches), fitted as a + b * tokens;
  a layer of a step that the native decoder takes is timed inside it, as the engine runs it.
- `thread_scaling`: a decoder layer's time with fewer threads over its time with all cores.
- `host_link` (GPUs): pinned copies to and from the device; the cluster's `intra_host`: a gloo
  ping-pong between two processes, the transport of the multiprocess executor."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import multiprocessing.process
import multiprocessing.queues
import os
import platform
import queue
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hetserve.cache import cache_dir
from hetserve.config import CacheConfig
from hetserve.model.attention import (AttentionMetadata, PrefillChunk, decode_attention, kv_cache_shape,
                                      prefill_attention)
from hetserve.model.cpu_kernels import kernels_version
from hetserve.model.llama import DecoderLayer, RotaryEmbedding, TensorShard, linear
from hetserve.model.native_decoder import NativeDecoder
from hetserve.model.spec import ModelSpec
from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape
from hetserve.planner.fit import fit_nonnegative_line
from hetserve.planner.profile import ClusterProfile, DeviceProfile, LinearTiming, Link
from hetserve.worker.device import available_memory, resolve_device, resolve_dtype
from hetserve.worker.distributed import free_port, init_process_group

logger = logging.getLogger(__name__)

PROFILER_VERSION = 5
"""Part of the fingerprint: bump it when a figure changes meaning, so cached profiles are redone."""
COLD_BYTES = 256 * 2**20
"""Working set a timed call cycles through so that its reads come from memory: beyond the
last-level cache of the CPUs and GPUs we plan for (here, reads turn cold past ~128 MiB)."""
MAX_LAYER_COPIES = 64
"""Decoder layers are deep-copied one by one; tiny test models would otherwise want thousands."""
MIN_SAMPLE_SECONDS = 2e-3
"""A timed sample repeats a call this long: a timer read or a GPU sync costs more than a tiny kernel."""
BLOCK_SIZE = CacheConfig().block_size
DECODE_CONTEXT = 256
"""Context of every sequence in the decoder-layer timings."""
ATTENTION_BATCH, ATTENTION_CONTEXT = 32, 512
PREFILL_TOKENS = 512
THREAD_SCALING_BATCH = 16
LINK_SIZES = (2**10, 2**16, 2**20, 2**23)
"""Message bytes of the link fits: one token's activations up to a long prefill's."""


@dataclass(frozen=True)
class MeasurementSettings:
    token_counts: tuple[int, ...]
    """Rows of x in the linear timings."""
    samples: int
    """Timed samples per figure; the median is kept."""
    layer_batches: tuple[int, ...]
    """Decode batch sizes of the decoder-layer timings that the overheads are fitted to."""
    link_iterations: int
    """Round trips per message size in the gloo ping-pong."""


FULL = MeasurementSettings(tuple(2**i for i in range(12)), 7, (1, 4, 16, 64), 50)
QUICK = MeasurementSettings((1, 8, 64, 512), 3, (1, 16), 10)


# -- cluster and cache ---------------------------------------------------------------------------


def available_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def profile_cluster(spec: ModelSpec, dtypes: list[str] | None = None, quick: bool = False,
                    devices: list[str] | None = None, model: str | None = None) -> ClusterProfile:
    """Measure `devices` (default: the CPU and every GPU) at `spec`'s shapes in `dtypes` (default:
    per device, the engine's `auto` dtype first, see `default_dtypes`), and the link between two
    processes on this host. `quick` measures fewer points (SmolLM2 on 2 cores: 4 s instead of 17 s).
    With `model` (a model file the engine can load), the engine's own per-step overheads are
    measured too (hetserve.planner.calibrate)."""
    devices = devices or available_devices()
    settings = QUICK if quick else FULL
    measured = tuple(profile_device(spec, name, dtypes, quick) for name in devices)
    logger.info("profiling the gloo link between two processes")
    cluster = ClusterProfile(measured, intra_host=measure_intra_host_link(settings.link_iterations),
                             fingerprint=profile_fingerprint(spec, dtypes, quick, devices, model))
    if model is None:
        return cluster
    from hetserve.planner.calibrate import calibrate

    logger.info("measuring the engine's per-step overheads")
    return calibrate(cluster, spec, model, next(iter(measured[0].linear)))


def cached_profile(spec: ModelSpec, dtypes: list[str] | None = None, quick: bool = False,
                   devices: list[str] | None = None, refresh: bool = False,
                   model: str | None = None) -> ClusterProfile:
    """The profile cached for this hardware, model shape and options, measured (and cached) if
    there is none, it cannot be read, or `refresh` is set."""
    devices = devices or available_devices()
    path = profile_cache_path(profile_fingerprint(spec, dtypes, quick, devices, model))
    if path.exists() and not refresh:
        try:
            return ClusterProfile.load(path)
        except ValueError as error:
            logger.warning("measuring again: %s", error)
    profile = profile_cluster(spec, dtypes, quick, devices, model)
    profile.save(path)
    logger.info("device profile saved to %s", path)
    return profile


def profile_cache_path(fingerprint: str) -> Path:
    return cache_dir("profiles") / f"{fingerprint}.json"


def profile_fingerprint(spec: ModelSpec, dtypes: list[str] | None, quick: bool, devices: list[str],
                        model: str | None = None) -> str:
    """Stable hash of what a profile depends on: this machine's CPU, RAM, GPUs, torch and CPU kernels, the
    model's shapes (the timings are at those shapes), and the options it was measured with."""
    identity = {
        "profiler": PROFILER_VERSION,
        "cpu": _cpu_model_name(),
        "cores": os.cpu_count(),
        "ram": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "cpu_kernels": kernels_version(),
        "shapes": measured_shapes(spec),
        "heads": (spec.num_heads, spec.num_kv_heads, spec.head_dim),
        "dtypes": dtypes,
        "quick": quick,
        "devices": devices,
        "calibrated_with": model,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


# -- one device ----------------------------------------------------------------------------------


def default_dtypes(device: torch.device) -> list[str]:
    """The engine's `auto` dtype for the device, then the other one it may be asked for."""
    auto = _dtype_name(resolve_dtype("auto", device))
    other = "float16" if device.type == "cuda" else "float32"
    return list(dict.fromkeys((auto, other)))


def profile_device(spec: ModelSpec, name: str, dtypes: list[str] | None = None, quick: bool = False,
                   threads: int | None = None) -> DeviceProfile:
    """Measure one device ("cpu", "cuda:0") at `spec`'s shapes. The layer, decode attention and
    overhead figures use the first dtype (by default the one the engine picks). A CPU is measured
    with `threads` threads as its cores (default: all of them)."""
    device = resolve_device(name)
    dtypes = dtypes or default_dtypes(device)
    settings = QUICK if quick else FULL
    threads = threads or os.cpu_count() or 1
    cores = threads if device.type == "cpu" else 1
    with torch.inference_mode(), torch_threads(threads):
        logger.info("profiling %s (%s)", device, ", ".join(dtypes))
        profile = base_profile(spec, device, dtypes, settings, cores)
        bench = LayerBench(spec, device, getattr(torch, dtypes[0]))
        layer_overhead, token_overhead = fit_layer_overheads(bench, profile, dtypes[0], settings)
        profile = replace(profile, layer_overhead=layer_overhead, token_overhead=token_overhead)
        if device.type == "cpu":
            return replace(profile, thread_scaling=measure_thread_scaling(bench, cores, settings.samples))
        return replace(profile, host_link=measure_host_link(device, settings.samples))


def base_profile(spec: ModelSpec, device: torch.device, dtypes: list[str], settings: MeasurementSettings,
                    cores: int) -> DeviceProfile:
    """The device before its overheads are fitted: memory, linear timings, bandwidths and attention."""
    memory = device_memory(device)  # before the measurements take their share
    linear = {dtype: time_linears(measured_shapes(spec), settings.token_counts, device, getattr(torch, dtype),
                                  settings.samples) for dtype in dtypes}
    return DeviceProfile(
        name=str(device), kind=device.type, memory=memory,
        flops={dtype: peak_flops(timings) for dtype, timings in linear.items()},
        memory_bandwidth=streaming_bandwidth(device, settings.samples),
        cores=cores,
        attention_bandwidth=decode_attention_bandwidth(spec, device, getattr(torch, dtypes[0]), settings.samples),
        attention_flops={dtype: prefill_attention_flops(spec, device, getattr(torch, dtype), settings.samples)
                         for dtype in dtypes},
        linear=linear)


def device_memory(device: torch.device) -> int:
    """GPUs: total memory; the CPU: RAM available now (the rest belongs to other programs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return available_memory(device)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- timing --------------------------------------------------------------------------------------


def median_seconds(call: Callable[[int], object], device: torch.device, samples: int) -> float:
    """Median seconds of `call(i)` after a warm-up call; `i` counts the calls so that `call` can
    cycle through cold copies of its inputs."""
    calls = itertools.count()
    call(next(calls))  # one-time costs: kernel selection, allocator growth
    repeat = max(1, math.ceil(MIN_SAMPLE_SECONDS / _elapsed(call, calls, 1, device)))
    return statistics.median(_elapsed(call, calls, repeat, device) / repeat for _ in range(samples))


def _elapsed(call: Callable[[int], object], calls: Iterator[int], repeat: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        call(next(calls))
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cold_count(nbytes: int) -> int:
    """Copies of an `nbytes` input that fill COLD_BYTES."""
    return max(1, math.ceil(COLD_BYTES / nbytes))


def stacked_copies(tensor: torch.Tensor, count: int) -> torch.Tensor:
    return tensor.expand(count, *tensor.shape).clone()


# -- matmuls and memory --------------------------------------------------------------------------


def measured_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(out_features, in_features) of a decoder layer's matmuls and of the LM head, each once."""
    linears = ModelShape.from_spec(spec).linears()
    return list(dict.fromkeys((*linears, (spec.vocab_size, spec.hidden_size))))


def time_linears(shapes: list[tuple[int, int]], token_counts: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype, samples: int) -> tuple[LinearTiming, ...]:
    return tuple(timing for out_features, in_features in shapes
                 for timing in _time_linear(out_features, in_features, token_counts, device, dtype, samples))


def _time_linear(out_features: int, in_features: int, token_counts: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype, samples: int) -> Iterator[LinearTiming]:
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
    weights = stacked_copies(weight, cold_count(weight.nbytes))
    for tokens in token_counts:
        x = torch.randn(tokens, in_features, device=device, dtype=dtype)
        yield LinearTiming(tokens, out_features, in_features, _linear_seconds(x, weights, samples))


def _linear_seconds(x: torch.Tensor, weights: torch.Tensor, samples: int) -> float:
    return median_seconds(lambda i: linear(x, weights[i % len(weights)]), x.device, samples)


def peak_flops(timings: tuple[LinearTiming, ...]) -> float:
    return max(2.0 * t.tokens * t.out_features * t.in_features / t.seconds for t in timings)


def streaming_bandwidth(device: torch.device, samples: int) -> float:
    data = torch.ones(COLD_BYTES // 4, device=device)
    return data.nbytes / median_seconds(lambda _: data.sum(), device, samples)


# -- attention -----------------------------------------------------------------------------------


@dataclass
class DecodeStep:
    """The attention inputs of a decode step: `batch` sequences whose context (the new token
    included) lies in shuffled KV blocks, as after a while of serving."""

    positions: torch.Tensor
    meta: AttentionMetadata
    num_blocks: int


def decode_step(batch: int, context: int, device: torch.device) -> DecodeStep:
    blocks_per_sequence = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_sequence
    tables = torch.randperm(num_blocks, device=device).reshape(batch, blocks_per_sequence)
    new_position = context - 1
    slots = tables[:, new_position // BLOCK_SIZE] * BLOCK_SIZE + new_position % BLOCK_SIZE
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=batch, decode_block_tables=tables,
                             decode_context_lens=torch.full((batch,), context, device=device), prefills=[])
    return DecodeStep(torch.full((batch,), new_position, device=device), meta, num_blocks)


def kv_cache_copies(spec: ModelSpec, num_blocks: int, count: int, device: torch.device, dtype: torch.dtype
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` separate (K, V) caches of `num_blocks` blocks of random values."""
    shape = kv_cache_shape(num_blocks, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim)
    caches = stacked_copies(torch.randn(2, *shape, device=device, dtype=dtype), count)
    return [(pair[0], pair[1]) for pair in caches]


def decode_attention_bandwidth(spec: ModelSpec, device: torch.device, dtype: torch.dtype, samples: int) -> float:
    """KV bytes read per second by the model's decode attention (paged, over cold caches) at
    ATTENTION_BATCH sequences of ATTENTION_CONTEXT tokens: the cost model's decode_kv_tokens *
    kv_bytes_per_token over the time."""
    step = decode_step(ATTENTION_BATCH, ATTENTION_CONTEXT, device)
    bytes_per_token = ModelShape.from_spec(spec, _dtype_name(dtype)).kv_bytes_per_token()
    copies = cold_count(int(step.num_blocks * BLOCK_SIZE * bytes_per_token))
    caches = kv_cache_copies(spec, step.num_blocks, copies, device, dtype)
    q = torch.randn(ATTENTION_BATCH, spec.num_heads, spec.head_dim, device=device, dtype=dtype)
    scale = spec.head_dim ** -0.5
    seconds = median_seconds(lambda i: decode_attention(q, caches[i % len(caches)], step.meta, scale),
                             device, samples)
    return ATTENTION_BATCH * ATTENTION_CONTEXT * bytes_per_token / seconds


def prefill_attention_flops(spec: ModelSpec, device: torch.device, dtype: torch.dtype, samples: int) -> float:
    """FLOP/s of the model's prefill attention on a PREFILL_TOKENS prompt, counting 4 * heads *
    head_dim per causal (query, key) pair as the cost model does."""
    q = torch.randn(PREFILL_TOKENS, spec.num_heads, spec.head_dim, device=device, dtype=dtype)
    k, v = torch.randn(2, PREFILL_TOKENS, spec.num_kv_heads, spec.head_dim, device=device, dtype=dtype)
    # A chunk that starts its sequence attends to its own keys and never reads the cache.
    chunk = PrefillChunk(0, PREFILL_TOKENS, 0, block_table=torch.empty(0, dtype=torch.long, device=device))
    no_cache = torch.empty(0, device=device, dtype=dtype)
    scale = spec.head_dim ** -0.5
    seconds = median_seconds(lambda _: prefill_attention(q, k, v, (no_cache, no_cache), chunk, scale),
                             device, samples)
    return 4.0 * StepShape.prefill(PREFILL_TOKENS).prefill_pairs * spec.num_heads * spec.head_dim / seconds


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- decoder layer -------------------------------------------------------------------------------


class LayerBench:
    """Copies of one decoder layer with random weights, built by the model's own code, each with
    its own KV cache. Timed calls cycle through them as a step goes through the model's layers,
    so weights and KV come from memory."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        with torch.device(device):
            layer = DecoderLayer(spec, TensorShard.whole(spec), all_reduce=nn.Identity()).to(dtype)
            self.rope = RotaryEmbedding(spec)
        weight_bytes = sum(p.nbytes for p in layer.parameters())
        count = min(MAX_LAYER_COPIES, cold_count(weight_bytes))
        self.layers = [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]

    def decode_seconds(self, batch: int, context: int, samples: int) -> float:
        """One layer's time on a decode step of `batch` sequences of `context` tokens."""
        step = decode_step(batch, context, self.device)
        caches = kv_cache_copies(self.spec, step.num_blocks, len(self.layers), self.device, self.dtype)
        x = torch.randn(batch, self.spec.hidden_size, device=self.device, dtype=self.dtype)
        rotation = self.rope.at(step.positions, x.dtype)
        native = self._native_decoder(caches) if batch <= NativeDecoder.MAX_TOKENS else None
        if native is not None:
            # As the engine runs such a step: every layer of the stage in one call.
            seconds = median_seconds(lambda _: native.forward(x, rotation.cos, rotation.sin, step.meta),
                                     self.device, samples)
            return seconds / len(self.layers)

        def forward(i: int) -> torch.Tensor:
            index = i % len(self.layers)
            return self.layers[index](x, rotation, caches[index], step.meta)

        return median_seconds(forward, self.device, samples)

    def _native_decoder(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> NativeDecoder | None:
        """The copies as one stage for NativeDecoder, where its kernels cover them."""
        stage = SimpleNamespace(spec=self.spec, shard=TensorShard.whole(self.spec), layers=self.layers)
        return NativeDecoder.build(stage, caches)


def fit_layer_overheads(bench: LayerBench, profile: DeviceProfile, dtype: str, settings: MeasurementSettings
                        ) -> tuple[float, float]:
    """(layer_overhead, token_overhead): the decoder layer's measured time minus the cost model's
    prediction from `profile`'s matmuls and attention, fitted as a + b * tokens over decode steps."""
    cost_model = CostModel(ModelShape.from_spec(bench.spec, dtype))
    rank = Rank(profile, bench.spec.num_kv_heads)
    batches = settings.layer_batches
    measured = [bench.decode_seconds(batch, DECODE_CONTEXT, settings.samples) for batch in batches]
    predicted = [cost_model.layer_time(rank, StepShape.decode(batch, DECODE_CONTEXT)) for batch in batches]
    logger.info("%s decoder layer at batches %s: measured %s us, predicted %s us", profile.name, batches,
                [round(m * 1e6) for m in measured], [round(p * 1e6) for p in predicted])
    residuals = [m - p for m, p in zip(measured, predicted)]
    return fit_nonnegative_line(batches, residuals, scales=measured)


def measure_thread_scaling(bench: LayerBench, cores: int, samples: int) -> dict[int, float]:
    """Decoder-layer time with 1, 2, 4, ... threads (below `cores`) over the time with `cores`."""

    def seconds(threads: int) -> float:
        with torch_threads(threads):
            return bench.decode_seconds(THREAD_SCALING_BATCH, DECODE_CONTEXT, samples)

    all_cores = seconds(cores)
    return {threads: seconds(threads) / all_cores for threads in (2**i for i in range(cores.bit_length()))
            if threads < cores}


def fit_link(sizes: list[int], seconds: list[float]) -> Link:
    """latency + bytes / bandwidth fitted to message times."""
    latency, seconds_per_byte = fit_nonnegative_line(sizes, seconds, scales=seconds)
    if seconds_per_byte <= 0:
        raise RuntimeError(f"message times {seconds} did not grow with sizes {sizes}")
    return Link(bandwidth=1.0 / seconds_per_byte, latency=latency)


# -- links ---------------------------------------------------------------------------------------


def measure_host_link(device: torch.device, samples: int) -> Link:
    """Copies between pinned host memory and the GPU, the mean of both directions per size."""
    seconds = []
    for size in LINK_SIZES:
        host = torch.empty(size, dtype=torch.uint8).pin_memory()
        gpu = torch.empty(size, dtype=torch.uint8, device=device)
        to_gpu = median_seconds(lambda _: gpu.copy_(host), device, samples)
        to_host = median_seconds(lambda _: host.copy_(gpu), device, samples)
        seconds.append((to_gpu + to_host) / 2)
    return fit_link(list(LINK_SIZES), seconds)


def measure_intra_host_link(iterations: int) -> Link:
    """gloo send/recv between two processes on 127.0.0.1, fitted over LINK_SIZES."""
    one_way = ping_pong_seconds(list(LINK_SIZES), iterations)
    return fit_link(list(one_way), list(one_way.values()))


def ping_pong_seconds(sizes: list[int], iterations: int, timeout_s: float = 300) -> dict[int, float]:
    """One-way seconds per message of each size (bytes) between two spawned processes over gloo:
    half a round trip, averaged over `iterations` after one warm-up."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_ping_pong, args=(rank, port, sizes, iterations, results))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        return _first_result(results, processes, timeout_s)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def _first_result(results: multiprocessing.queues.Queue, processes: list[multiprocessing.process.BaseProcess],
                  timeout_s: float) -> dict[int, float]:
    """The result rank 0 reports, without waiting out the timeout for a process that died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            failed = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a ping-pong process failed (exit code {failed[0]})") from None
    raise RuntimeError(f"the gloo ping-pong gave no result in {timeout_s:.0f} s")


def _ping_pong(rank: int, port: int, sizes: list[int], iterations: int, results: multiprocessing.queues.Queue
               ) -> None:
    """One side of the ping-pong, in its own process: rank 0 sends, rank 1 sends back."""
    torch.set_num_threads(1)
    init_process_group("gloo", rank, 2, "127.0.0.1", port, timeout_s=60)
    one_way = {size: _round_trip_seconds(rank, size, iterations) / 2 for size in sizes}
    if rank == 0:
        results.put(one_way)
    dist.destroy_process_group()


def _round_trip_seconds(rank: int, size: int, iterations: int) -> float:
    buffer = torch.zeros(size, dtype=torch.uint8)
    _round_trip(rank, buffer)  # the first message of a size sets up buffers on both sides
    start = time.perf_counter()
    for _ in range(iterations):
        _round_trip(rank, buffer)
    return (time.perf_counter() - start) / iterations


def _round_trip(rank: int, buffer: torch.Tensor) -> None:
    if rank == 0:
        dist.send(buffer, 1)
        dist.recv(buffer, 1)
    else:
        dist.recv(buffer, 0)
        dist.send(buffer, 0)
