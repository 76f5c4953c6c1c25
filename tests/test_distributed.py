"""Same answer, any layout: pipeline and tensor parallel workers in separate processes (gloo)
give the single worker's greedy tokens, with continuous batching, chunked prefill and
preemption active; dead or hung workers fail the engine cleanly."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import torch

from hetserve import LLM, SamplingParams
from hetserve.worker.distributed import WorkerError
from tests.live_server import Server
from tests.test_batch_invariance import make_prompts, run_staggered
from tests.tiny_models import make_hf_model

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
# Few blocks and a small token budget: prompts are chunked and requests get preempted.
ENGINE = dict(dtype="float32", num_kv_blocks=12, max_num_batched_tokens=40, max_num_seqs=6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("dist") / "llama", num_layers=5, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def prompts(llm):
    return make_prompts(llm.get_tokenizer(), 10)


def run_layout(llm: LLM, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs, requests arriving at different steps."""
    return {rid: (c.token_ids, [lp.logprob for lp in c.logprobs])
            for rid, c in run_staggered(llm, prompts, GREEDY).items()}


@pytest.fixture(scope="module")
def reference(tiny_model, prompts):
    llm = LLM(model=str(tiny_model), **ENGINE)
    results = run_layout(llm, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    return results


@pytest.mark.parametrize("layout", [
    dict(pipeline_parallel_size=2),
    dict(pipeline_parallel_size=3, pipeline_layer_split="1,3,1"),
    dict(tensor_parallel_size=2),
    dict(pipeline_parallel_size=2, tensor_parallel_size=2, pipeline_layer_split="3,2"),
    dict(pipeline_parallel_size=2, distributed_executor_backend="local"),
], ids=["pp2", "pp3-uneven", "tp2", "pp2xtp2", "pp2-local"])
def test_every_layout_gives_the_single_worker_tokens(tiny_model, prompts, reference, layout):
    llm = LLM(model=str(tiny_model), **ENGINE, **layout)
    try:
        results = run_layout(llm, prompts)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.num_used_blocks == 0
    finally:
        llm.engine.shutdown()
    assert results.keys() == reference.keys()
    for request_id, (tokens, logprobs) in results.items():
        assert tokens == reference[request_id][0], request_id
        torch.testing.assert_close(logprobs, reference[request_id][1], atol=1e-4, rtol=0)


def test_uneven_tensor_parallel_smollm_matches_one_worker(llm, prompts):
    """SmolLM2 has 3 KV heads: TP=2 gives one rank 2 heads (6 query heads, 2/3 of the MLP) and
    the other 1 head (HexGen-style uneven slices)."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], params)]
    tp = LLM(dtype="float32", kv_cache_memory="32MiB", max_model_len=512, tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in tp.generate(prompts[:4], params)] == expected
    finally:
        tp.engine.shutdown()


def test_pipeline_keeps_a_step_in_flight_per_stage(tiny_model, prompts):
    llm = LLM(model=str(tiny_model), **ENGINE, pipeline_parallel_size=2)
    try:
        engine = llm.engine
        for i, ids in enumerate(prompts[:6]):
            engine.add_request(f"r{i}", None, GREEDY, prompt_token_ids=ids)
        most_in_flight = 0
        while engine.has_unfinished_requests():
            engine.step()
            most_in_flight = max(most_in_flight, len(engine._in_flight) + 1)
        assert most_in_flight == 2
    finally:
        llm.engine.shutdown()


# -- faults --------------------------------------------------------------------------------------


def start_requests(llm: LLM, prompts: list[list[int]]) -> None:
    for i, ids in enumerate(prompts):
        llm.engine.add_request(f"r{i}", None, GREEDY, prompt_token_ids=ids)
    llm.engine.step()


def test_a_killed_worker_fails_the_step_and_leaves_no_process(tiny_model, prompts):
    llm = LLM(model=str(tiny_model), **ENGINE, pipeline_parallel_size=2)
    processes = llm.engine.executor.processes
    start_requests(llm, prompts[:3])
    os.kill(processes[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"^worker 1 \(layers \[3, 5\) on auto, killed by signal SIGKILL\) died"):
        for _ in range(50):
            llm.engine.step()
    assert not any(p.is_alive() for p in processes)
    llm.engine.shutdown()


def test_a_hung_worker_times_out(tiny_model, prompts):
    llm = LLM(model=str(tiny_model), **ENGINE, pipeline_parallel_size=2, worker_timeout=3)
    processes = llm.engine.executor.processes
    start_requests(llm, prompts[:3])
    os.kill(processes[0].pid, signal.SIGSTOP)
    with pytest.raises(WorkerError, match="no answer from worker 1 for 3 s"):
        for _ in range(50):
            llm.engine.step()
    assert not any(p.is_alive() for p in processes)


def test_impossible_plans_are_rejected_at_start(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"leaves layers \[2, 3\) uncovered"):
        plan = tmp_path / "plan.json"
        plan.write_text('{"stages": [{"start": 0, "end": 2, "devices": ["cpu"]}, '
                        '{"start": 3, "end": 5, "devices": ["cpu"]}]}')
        LLM(model=str(tiny_model), plan=str(plan))
    if not torch.cuda.is_available():
        with pytest.raises(WorkerError, match="CUDA is not available"):
            LLM(model=str(tiny_model), pipeline_parallel_size=2, devices="cpu,cuda:0")
    monkeypatch.setattr("hetserve.worker.worker.available_memory", lambda device: 2**16)
    with pytest.raises(ValueError, match=r"layers \[0, 3\) need [\d.]+ GiB of float32 weights on cpu, but only"):
        LLM(model=str(tiny_model), dtype="float32", distributed_executor_backend="local",
            pipeline_parallel_size=2, devices="cpu,cpu")


def children_of(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


def test_server_survives_a_dead_worker_and_reports_unhealthy(tiny_model):
    server = Server("--model", str(tiny_model), "--pipeline-parallel-size", "2", "--worker-timeout", "20")
    try:
        model = httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"][0]["id"]
        completion = {"model": model, "prompt": "Hello", "max_tokens": 4}
        assert httpx.post(f"{server.url}/v1/completions", json=completion, timeout=60).status_code == 200
        workers = [pid for pid in children_of(server.process.pid) if b"spawn_main" in cmdline(pid)]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        response = httpx.post(f"{server.url}/v1/completions", json={**completion, "max_tokens": 64}, timeout=60)
        assert response.status_code in (500, 503) and "error" in response.json()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health stayed 200 with a dead worker"
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and _is_running(pid)]


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _is_running(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("layout", [
    dict(pipeline_parallel_size=2, devices="cuda:0,cpu", distributed_executor_backend="local"),
    dict(pipeline_parallel_size=2, devices="cuda:0,cpu"),
    dict(tensor_parallel_size=2, devices="cuda:0,cuda:0"),
], ids=["gpu+cpu-local", "gpu+cpu-mp", "tp2-nccl"])
def test_cuda_layouts_give_the_single_worker_tokens(tiny_model, prompts, reference, layout):
    llm = LLM(model=str(tiny_model), **ENGINE, **layout)
    try:
        results = run_layout(llm, prompts)
    finally:
        llm.engine.shutdown()
    for request_id, (tokens, _) in results.items():
        assert tokens == reference[request_id][0], request_id
