"""Weight offload: layers streamed from disk (or pinned host RAM on a GPU) give the same greedy tokens
as the model held in memory, within the memory budget, with loads running ahead of the compute."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hetserve import LLM, SamplingParams
from hetserve.config import OffloadConfig
from hetserve.model.offload import LayerStreamer
from tests.tiny_models import make_hf_model

PROMPTS = [[1, 5, 9, 33, 100, 7], [7, 8, 9], [200, 3, 3, 41, 17, 250, 99, 12, 5]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = {"dtype": "float32", "num_kv_blocks": 64}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # Decoder layers dominate the weights (a small vocabulary), as in real models.
    return make_hf_model(tmp_path_factory.mktemp("offload") / "model", num_layers=10, hidden_size=64,
                         intermediate_size=256, vocab_size=256, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def in_memory(tiny_model):
    llm = LLM(model=str(tiny_model), **ENGINE)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.executor.workers[0].model.parameters())
    return weight_bytes, _greedy(llm)


def _greedy(llm: LLM) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(PROMPTS, GREEDY)]


def _device_weight_bytes(worker) -> int:
    return sum(p.numel() * p.element_size() for p in worker.model.parameters())


@pytest.fixture(scope="module")
def offloaded(tiny_model, in_memory, tmp_path_factory):
    """The tiny model with 40 % of its weights' bytes as the budget, the rest on disk."""
    options = {"model": str(tiny_model), "memory_budget": int(0.4 * in_memory[0]),
               "disk_offload_dir": str(tmp_path_factory.mktemp("layers")), **ENGINE}
    return LLM(**options), options


def test_forty_percent_budget_streams_from_disk_with_the_same_greedy_tokens(offloaded, in_memory):
    llm, options = offloaded
    worker = llm.engine.executor.workers[0]
    assert worker.offload.tiers.count("device") == 1 and worker.offload.tiers.count("disk") == 9
    assert _greedy(llm) == in_memory[1]
    stats = worker.offload.streamer.stats
    assert _device_weight_bytes(worker) + stats.peak_resident_bytes <= options["memory_budget"]
    assert stats.loads >= stats.prefetched > 0.9 * stats.loads


def test_a_restart_reuses_the_layer_files(offloaded, in_memory):
    _, options = offloaded
    files = {f: f.stat().st_mtime_ns for f in Path(options["disk_offload_dir"]).rglob("layer-*.safetensors")}
    assert len(files) == 9
    time.sleep(0.01)
    assert _greedy(LLM(**options)) == in_memory[1]
    assert {f: f.stat().st_mtime_ns for f in files} == files


def test_pipeline_stages_each_offload_their_own_layers(tiny_model, in_memory, tmp_path):
    weight_bytes, expected = in_memory
    llm = LLM(model=str(tiny_model), memory_budget=int(0.4 * weight_bytes), disk_offload_dir=str(tmp_path),
              pipeline_parallel_size=2, distributed_executor_backend="local", **ENGINE)
    assert _greedy(llm) == expected
    for worker in llm.engine.executor.workers:
        assert "disk" in worker.offload.tiers
    assert len(list(tmp_path.rglob("layer-*.safetensors"))) == 10 - sum(
        w.offload.tiers.count("device") for w in llm.engine.executor.workers)


@pytest.mark.slow
def test_tensor_parallel_ranks_each_stream_their_own_slices(tiny_model, in_memory, tmp_path):
    weight_bytes, expected = in_memory
    llm = LLM(model=str(tiny_model), memory_budget=int(0.3 * weight_bytes), disk_offload_dir=str(tmp_path),
              tensor_parallel_size=2, distributed_executor_backend="mp", **ENGINE)
    try:
        assert _greedy(llm) == expected
    finally:
        llm.engine.shutdown()
    assert len({f.parent for f in tmp_path.rglob("layer-*.safetensors")}) == 2  # one directory per slice


def test_a_wider_window_keeps_more_layers_in_flight(tiny_model, in_memory, tmp_path):
    weight_bytes, expected = in_memory
    llm = LLM(model=str(tiny_model), memory_budget=int(0.6 * weight_bytes), disk_offload_dir=str(tmp_path),
              offload_prefetch_window=3, **ENGINE)
    worker = llm.engine.executor.workers[0]
    assert _greedy(llm) == expected
    layer_bytes = worker.offload.streamer.stats.bytes_loaded // worker.offload.streamer.stats.loads
    assert worker.offload.streamer.stats.peak_resident_bytes == 4 * layer_bytes
    assert _device_weight_bytes(worker) + 4 * layer_bytes <= 0.6 * weight_bytes


def _fake_layer(index: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((4,), float(index))}


def test_the_streamer_prefetches_the_next_layers_cyclically_and_holds_at_most_the_window():
    streamer = LayerStreamer({i: (lambda i=i: _fake_layer(i)) for i in (1, 3, 4, 6)}, torch.device("cpu"), window=2)
    for _ in range(3):  # steps: after the last layer come the next step's first
        for layer in (1, 3, 4, 6):
            weights = streamer.acquire(layer)
            assert weights["weight"][0].item() == layer
            streamer.release(layer, weights)
    streamer.close()
    assert streamer.stats.prefetched == 11  # all but the very first load
    assert streamer.stats.peak_resident_bytes <= 3 * 16


def test_loads_left_behind_by_an_interrupted_step_are_dropped():
    streamer = LayerStreamer({i: (lambda i=i: _fake_layer(i)) for i in range(4)}, torch.device("cpu"), window=2)
    streamer.release(0, streamer.acquire(0))  # layers 1 and 2 now load ahead
    streamer.release(3, streamer.acquire(3))  # a step that failed after layer 0 and a fresh one at 3
    assert streamer.stats.peak_resident_bytes <= 3 * 16
    streamer.close()
    assert streamer.stats.resident_bytes == 0


def test_a_load_error_reaches_the_compute_thread():
    def broken() -> dict[str, torch.Tensor]:
        raise OSError("disk gone")

    streamer = LayerStreamer({0: broken}, torch.device("cpu"), window=1)
    with pytest.raises(OSError, match="disk gone"):
        streamer.acquire(0)
    streamer.close()


@pytest.mark.parametrize("options, message", [
    ({"memory_budget": "lots"}, "not a size"),
    ({"memory_budget": 0}, "memory_budget must be positive"),
    ({"cpu_offload_gb": -1.0}, "cpu_offload_gb must not be negative"),
    ({"offload_prefetch_window": 0}, "offload_prefetch_window"),
    ({"disk_offload_dir": " "}, "disk_offload_dir"),
])
def test_invalid_offload_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        OffloadConfig(**options)


@pytest.mark.parametrize("options, message", [
    ({"memory_budget": 4096}, "too small"),
    ({"memory_budget": 0.4}, "give disk_offload_dir"),
    ({"memory_budget": 0.4, "disk_offload_dir": "x", "quantization": "int8"}, "not both"),
])
def test_budgets_that_cannot_work_are_clear_errors(tiny_model, in_memory, tmp_path, options, message):
    if isinstance(options["memory_budget"], float):
        options = {**options, "memory_budget": int(options["memory_budget"] * in_memory[0])}
    if "disk_offload_dir" in options:
        options["disk_offload_dir"] = str(tmp_path)
    with pytest.raises(ValueError, match=message):
        LLM(model=str(tiny_model), **options, **ENGINE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_streams_host_and_disk_layers_through_a_side_stream(tiny_model, tmp_path):
    reference = _greedy(LLM(model=str(tiny_model), device="cuda", **ENGINE))
    llm = LLM(model=str(tiny_model), device="cuda", cpu_offload_gb=1e-3, disk_offload_dir=str(tmp_path),
              memory_budget=int(1.2e6), **ENGINE)
    worker = llm.engine.executor.workers[0]
    assert {"device", "host", "disk"} <= set(worker.offload.tiers)
    assert _greedy(llm) == reference
    assert worker.offload.streamer.stats.prefetched > 0


@pytest.mark.slow
def test_packaged_model_at_forty_percent_matches_in_memory(llm, tmp_path):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    budget = int(0.4 * _device_weight_bytes(llm.engine.executor.workers[0]))
    offloaded = LLM(dtype="float32", kv_cache_memory="64MiB", max_model_len=256, swap_space=0,
                    memory_budget=budget, disk_offload_dir=str(tmp_path))
    worker = offloaded.engine.executor.workers[0]
    assert [o.outputs[0].token_ids for o in offloaded.generate(prompts, params)] == expected
    assert _device_weight_bytes(worker) + worker.offload.streamer.stats.peak_resident_bytes <= budget
    assert worker.offload.tiers.count("disk") > 20
