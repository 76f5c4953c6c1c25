"""Weight offload: decoder layers kept off the compute device, in pinned host RAM or in per-layer
safetensors files on disk, and streamed in one at a time, the next ones prefetched on a background
thread (and, on a GPU, copied on a side stream) while the current one computes: FlexGen's overlap,
"LLM in a flash"'s windowed loading. Where each layer goes is hetserve.planner.offload's decision.

Disk layers are written once per model, dtype and tensor-parallel slice (GGUF weights dequantized),
so a restart memory-maps the same files; only the layers in flight are ever resident."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from hetserve.config import EngineConfig, OffloadConfig
from hetserve.model.llama import LlamaForCausalLM
from hetserve.model.loader import iter_weights
from hetserve.model.quantization import QUANTIZATIONS
from hetserve.planner.offload import LayerBudget, layer_tiers

logger = logging.getLogger(__name__)

LayerWeights = dict[str, torch.Tensor]
# Bump when the files' layout changes, so old caches are not read.
_DISK_FORMAT_VERSION = 1
_LAYER_PREFIX = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class StreamStats:
    loads: int = 0
    """Layers read from disk or copied from host RAM."""
    prefetched: int = 0
    """Layers asked for that were already being loaded ahead."""
    waited: int = 0
    """Of those, layers whose load had not finished when the compute reached them."""
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    """Time the loader thread spent reading (and, on a GPU, queueing copies)."""
    resident_bytes: int = 0
    """Streamed weights held on the device now: the layer computing and those loaded ahead."""
    peak_resident_bytes: int = 0


class LayerStreamer:
    """Hands out the weights of streamed layers in layer order, keeping the next `window` of them
    (cyclically: after the last comes the next step's first) loading in the background."""

    def __init__(self, sources: dict[int, Callable[[], LayerWeights]], device: torch.device, window: int):
        self._sources = sources
        self._order = sorted(sources)
        self._device = device
        self._window = window
        self._pending: dict[int, Future] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="hetserve-offload")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._lock = threading.Lock()
        self.stats = StreamStats()

    def acquire(self, layer: int) -> LayerWeights:
        """The weights of `layer` on the device, ready for the current stream to compute with."""
        future = self._pending.pop(layer, None)
        if future is None:
            future = self._loader.submit(self._load, layer)
        else:
            self.stats.prefetched += 1
            self.stats.waited += not future.done()
        # Queued behind this layer's load, before waiting for it.
        self._prefetch_after(layer, include_self=False)
        weights, ready = future.result()
        if ready is not None:
            # Compute waits for this layer's copy only, not for the prefetches queued behind it.
            compute_stream = torch.cuda.current_stream(self._device)
            compute_stream.wait_event(ready)
            for tensor in weights.values():
                tensor.record_stream(compute_stream)
        return weights

    def release(self, layer: int, weights: LayerWeights) -> None:
        """Drop `layer`'s weights (the caller holds no other reference) and load ahead into its room."""
        self._account(-_nbytes(weights))
        self._prefetch_after(layer, include_self=True)

    def close(self) -> None:
        for future in self._pending.values():
            future.add_done_callback(self._forget)
        self._pending.clear()
        self._loader.shutdown(wait=True, cancel_futures=True)

    def _prefetch_after(self, layer: int, include_self: bool) -> None:
        position = self._order.index(layer)
        ahead = [self._order[(position + k) % len(self._order)] for k in range(1, self._window + 1)]
        wanted = dict.fromkeys(a for a in ahead if include_self or a != layer)
        for stale in [p for p in self._pending if p not in wanted]:
            # Left behind by a step that stopped early: drop it to stay within the window.
            self._pending.pop(stale).add_done_callback(self._forget)
        for ahead_layer in wanted:
            if ahead_layer not in self._pending:
                self._pending[ahead_layer] = self._loader.submit(self._load, ahead_layer)

    def _load(self, layer: int) -> tuple[LayerWeights, torch.cuda.Event | None]:
        start = time.perf_counter()
        weights = self._sources[layer]()
        ready = None
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                weights = {name: t.to(self._device, non_blocking=True) for name, t in weights.items()}
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        with self._lock:
            self.stats.loads += 1
            self.stats.bytes_loaded += _nbytes(weights)
            self.stats.load_seconds += time.perf_counter() - start
        self._account(_nbytes(weights))
        return weights, ready

    def _forget(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._account(-_nbytes(future.result()[0]))

    def _account(self, delta: int) -> None:
        with self._lock:
            self.stats.resident_bytes += delta
            self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)


class StreamedLayer(nn.Module):
    """A decoder layer whose weights live off the device: taken from the streamer on entry, given
    back on exit."""

    def __init__(self, layer: nn.Module, index: int, streamer: LayerStreamer):
        super().__init__()
        # A plain list hides the skeleton (meta tensors) from parameters() and load_weights: its
        # weights belong to the streamer, not to the model.
        self._skeleton = [layer]
        self.index = index
        self.streamer = streamer

    def forward(self, *args) -> torch.Tensor:
        weights = self.streamer.acquire(self.index)
        try:
            return functional_call(self._skeleton[0], weights, args)
        finally:
            self.streamer.release(self.index, weights)


@dataclass
class LayerOffload:
    """A worker's streamed layers (indices local to its layer range) and their streamer."""

    model: LlamaForCausalLM
    tiers: tuple[str, ...]
    streamer: LayerStreamer

    def resident_weight(self, name: str) -> bool:
        """Whether the checkpoint tensor `name` is loaded into the model (not streamed)."""
        if not self.model.wants_weight(name):
            return False
        match = _LAYER_PREFIX.match(name)
        return match is None or self.tiers[int(match.group(1)) - self.model.start] == "device"


def offload_layers(model: LlamaForCausalLM, model_path: Path, config: EngineConfig, device: torch.device,
                   dtype: torch.dtype) -> LayerOffload | None:
    """Move the layers of `model` (still on meta) that the offload settings keep off the device to
    host RAM or disk, and swap them for StreamedLayers; None when every layer stays."""
    offload = config.offload
    if not offload.enabled:
        return None
    if config.model.quantization in QUANTIZATIONS:
        raise ValueError("weight offload streams unquantized layers: use either quantization or "
                         "memory_budget / cpu_offload_gb, not both")
    budget = _layer_budget(model, offload, device, dtype)
    tiers = layer_tiers(budget) if budget is not None else ("device",) * model.num_layers
    if "disk" in tiers and offload.disk_offload_dir is None:
        raise ValueError(f"memory_budget {offload.memory_budget} leaves {tiers.count('disk')} of {len(tiers)} layers "
                         "for disk: give disk_offload_dir (or a larger memory_budget / cpu_offload_gb)")
    if set(tiers) == {"device"}:
        logger.info("weight offload: all %d layers fit the memory budget", len(tiers))
        return None
    sources = (_host_sources(model, model_path, tiers, dtype)
               | _disk_sources(model, model_path, tiers, dtype, device, offload))
    streamer = LayerStreamer(sources, device, offload.offload_prefetch_window)
    for index in sources:
        model.layers[index] = StreamedLayer(model.layers[index], index, streamer)
    logger.info("weight offload on %s: %d layers resident, %d in host RAM, %d on disk; %d streamed at once",
                device, tiers.count("device"), tiers.count("host"), tiers.count("disk"),
                budget.streamed_in_flight(len(sources)))
    return LayerOffload(model, tiers, streamer)


def _layer_budget(model: LlamaForCausalLM, offload: OffloadConfig, device: torch.device, dtype: torch.dtype
                  ) -> LayerBudget | None:
    layer_bytes = sum(p.numel() for p in model.layers[0].parameters()) * dtype.itemsize
    fixed_bytes = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers.")) * dtype.itemsize
    on_gpu = device.type == "cuda"
    window = offload.offload_prefetch_window
    if not on_gpu and offload.cpu_offload_gb > 0:
        logger.info("cpu_offload_gb has no effect on a CPU device: host RAM is its memory")
    if offload.memory_budget is not None:
        host_budget = offload.cpu_offload_bytes if on_gpu else 0
        return LayerBudget(model.num_layers, layer_bytes, fixed_bytes, offload.memory_budget, host_budget, window)
    if not on_gpu:
        return None
    # cpu_offload_gb alone (vLLM's meaning): that many bytes of layers leave the GPU for host RAM.
    total = fixed_bytes + model.num_layers * layer_bytes
    least = fixed_bytes + min(window + 1, model.num_layers) * layer_bytes
    return LayerBudget(model.num_layers, layer_bytes, fixed_bytes, max(total - offload.cpu_offload_bytes, least),
                       math.inf, window)


def _host_sources(model: LlamaForCausalLM, model_path: Path, tiers: tuple[str, ...], dtype: torch.dtype
                  ) -> dict[int, Callable[[], LayerWeights]]:
    sources = {}
    for index, tier in enumerate(tiers):
        if tier == "host":
            # Pinned, so host-to-device copies run asynchronously at full bus speed.
            pinned = {name: t.pin_memory() for name, t in layer_weights(model, model_path, index, dtype).items()}
            sources[index] = lambda pinned=pinned: pinned
    return sources


def _disk_sources(model: LlamaForCausalLM, model_path: Path, tiers: tuple[str, ...], dtype: torch.dtype,
                  device: torch.device, offload: OffloadConfig) -> dict[int, Callable[[], LayerWeights]]:
    sources = {}
    directory = disk_cache_dir(Path(offload.disk_offload_dir or "."), model, model_path, dtype)
    for index, tier in enumerate(tiers):
        if tier == "disk":
            file = directory / f"layer-{model.start + index:04d}.safetensors"
            if not file.is_file():
                _write_atomically(layer_weights(model, model_path, index, dtype), file)
            sources[index] = lambda file=file: read_layer_file(file, copy=device.type == "cpu")
    return sources


def read_layer_file(file: Path, copy: bool) -> LayerWeights:
    """A layer's weights from its memory-mapped file. safetensors hands out views of the mapping, read
    lazily when first touched; `copy` reads them here, into memory of their own, so a CPU device
    computes on loaded weights (a GPU's host-to-device copy reads them anyway)."""
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name).clone() if copy else f.get_tensor(name) for name in f.keys()}


def layer_weights(model: LlamaForCausalLM, model_path: Path, index: int, dtype: torch.dtype) -> LayerWeights:
    """Layer `index` (local to `model`'s range) of the checkpoint, named as the layer's parameters,
    for this model's tensor-parallel slice. A one-layer model reuses the loader's renaming, fusing
    and slicing; on the first and last layers it also reads the embedding, which is then dropped."""
    layer = model.start + index
    with torch.device("meta"):
        single = LlamaForCausalLM(model.spec, (layer, layer + 1), model.shard)
    single = single.to_empty(device="cpu").to(dtype)
    single.load_weights(iter_weights(model_path, model.spec, single.wants_weight))
    return {name: param.detach() for name, param in single.layers[0].named_parameters()}


def disk_cache_dir(root: Path, model: LlamaForCausalLM, model_path: Path, dtype: torch.dtype) -> Path:
    """Where this model's layers are kept: one directory per checkpoint version (files, sizes and
    modification times), dtype and tensor-parallel slice."""
    files = [model_path] if model_path.is_file() else sorted(model_path.glob("*.safetensors"))
    identity = {
        "format": _DISK_FORMAT_VERSION,
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "dtype": str(dtype),
        "kv_heads": model.shard.kv_heads,
        "mlp_columns": model.shard.mlp_columns,
    }
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return root / f"{model_path.stem}-{digest}"


def _write_atomically(weights: LayerWeights, file: Path) -> None:
    # Another worker (or a crash) must never see half a file: write aside, then rename.
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    save_file(weights, str(partial))
    os.replace(partial, file)


def _nbytes(weights: LayerWeights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())
