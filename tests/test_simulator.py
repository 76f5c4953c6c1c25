"""The simulator: the real scheduler's steps timed by the cost model, checked against the cost model's
own figures for cases small enough to add up by hand, and the `hetserve simulate` command."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys

import pytest

from hetserve.config import CacheConfig, SchedulerConfig
from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape
from hetserve.planner.plan import Plan
from hetserve.planner.profile import ClusterProfile, DeviceProfile, Link
from hetserve.sim.simulator import SimRequest, SimStage, Simulator, num_kv_blocks, plan_stages

SHAPE = ModelShape(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                   head_dim=16, vocab_size=256)
GPU = DeviceProfile("gpu", "cuda", memory=2**30, flops={"bfloat16": 1e9}, memory_bandwidth=1e9,
                    device="cuda:0", layer_overhead=1e-4, step_overhead=1e-3)
CPU = DeviceProfile("cpu", "cpu", memory=2**30, flops={"bfloat16": 2e8}, memory_bandwidth=5e8, cores=4,
                    thread_scaling={2: 1.8})
LINK = Link(bandwidth=1e8, latency=1e-4)
CLUSTER = ClusterProfile((GPU, CPU), intra_host=LINK)
COST = CostModel(SHAPE)


def one_stage(device: DeviceProfile = GPU) -> list[SimStage]:
    return [SimStage((Rank(device, 2),), SHAPE.num_layers, None)]


def simulator(stages: list[SimStage], num_blocks: int = 256, **kwargs) -> Simulator:
    return Simulator(COST, stages, SchedulerConfig(max_num_batched_tokens=kwargs.pop("budget", 2048)),
                     num_blocks, 16, **kwargs)


def stage_time(step: StepShape, num_layers: int = SHAPE.num_layers, device: DeviceProfile = GPU) -> float:
    return COST.stage_time((Rank(device, 2),), num_layers, step, is_last=True)


def test_lone_request_takes_a_prefill_then_one_decode_step_per_token():
    result = simulator(one_stage()).run([SimRequest(list(range(40)), 5, 0.0)]).results[0]
    prefill = stage_time(StepShape.from_chunks([(0, 40, True)]))
    decodes = [stage_time(StepShape.decode(1, 40 + i + 1)) for i in range(4)]
    assert result.output_tokens == 5
    assert result.ttft == pytest.approx(prefill)
    assert result.itl == pytest.approx(decodes)
    assert result.e2e == pytest.approx(prefill + sum(decodes))


def test_engine_overheads_add_to_every_step():
    plain = simulator(one_stage()).run([SimRequest([1] * 8, 3, 0.0)]).results[0]
    slowed = simulator(one_stage(), engine_step_overhead=0.01, engine_request_overhead=0.002).run(
        [SimRequest([1] * 8, 3, 0.0)]).results[0]
    assert slowed.e2e == pytest.approx(plain.e2e + 3 * 0.012)


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    result = simulator(one_stage(), budget=32).run([SimRequest(list(range(80)), 1, 0.0)]).results[0]
    chunks = [(0, 32, False), (32, 32, False), (64, 16, True)]
    assert result.ttft == pytest.approx(sum(stage_time(StepShape.from_chunks([c])) for c in chunks))


def test_requests_arriving_later_start_later_and_wait_for_a_running_step():
    requests = [SimRequest([1] * 16, 4, 0.0), SimRequest([2] * 16, 4, 0.5)]
    first, second = simulator(one_stage()).run(requests).results
    assert second.start == pytest.approx(0.5) or second.start > 0.5
    assert first.ttft == pytest.approx(stage_time(StepShape.from_chunks([(0, 16, True)])))


def test_two_stage_pipeline_adds_the_transfer_and_overlaps_steps():
    stages = [SimStage((Rank(GPU, 2),), 2, None), SimStage((Rank(GPU, 2),), 2, LINK)]
    result = simulator(stages).run([SimRequest([1] * 10, 1, 0.0)]).results[0]
    step = StepShape.from_chunks([(0, 10, True)])
    expected = (COST.stage_time((Rank(GPU, 2),), 2, step, False)
                + COST.activation_transfer_time(LINK, 10) + COST.stage_time((Rank(GPU, 2),), 2, step, True))
    assert result.ttft == pytest.approx(expected)
    # Requests arriving while a step is in flight go into the next one, which the first stage runs
    # while the second works on the step ahead: the run is shorter than the summed busy time.
    many = simulator(stages).run([SimRequest([i] * 10, 32, 0.002 * i) for i in range(16)])
    assert len(many.results) == 16 and all(r.output_tokens == 32 for r in many.results)
    assert many.duration < sum(many.busy_time)


def test_prefix_cache_hits_shorten_the_first_token():
    prefix = list(range(100, 228))
    requests = [SimRequest(prefix + [i, i + 1], 2, 1.0 * i) for i in range(4)]
    cached = simulator(one_stage()).run(requests).results
    uncached = simulator(one_stage(), enable_prefix_caching=False).run(requests).results
    assert cached[0].ttft == pytest.approx(uncached[0].ttft)
    assert all(c.ttft < u.ttft for c, u in zip(cached[1:], uncached[1:]))


def test_small_kv_cache_preempts_yet_every_request_finishes():
    requests = [SimRequest([i] * 30, 40, 0.0) for i in range(6)]
    run = simulator(one_stage(), num_blocks=12).run(requests)
    assert run.num_preemptions > 0
    assert [r.output_tokens for r in run.results] == [40] * 6


def test_a_request_larger_than_the_kv_cache_fails_as_the_server_rejects_it():
    requests = [SimRequest([1] * 100, 60, 0.0), SimRequest([2] * 10, 4, 0.0)]
    too_big, fits = simulator(one_stage(), num_blocks=8).run(requests).results  # 8 blocks x 16 = 128 tokens
    assert not too_big.success and "do not fit the KV cache" in too_big.error
    assert fits.success and fits.output_tokens == 4


def test_max_concurrency_bounds_the_requests_in_flight():
    requests = [SimRequest([i] * 8, 6, 0.0) for i in range(9)]
    results = simulator(one_stage(), max_concurrency=3).run(requests).results
    spans = [(r.start, r.start + r.e2e) for r in results]
    for start, _ in spans:
        overlapping = sum(1 for s, e in spans if s <= start < e)
        assert overlapping <= 3
    assert max(s for s, _ in spans) > 0  # later requests waited for a slot


def test_decode_group_gets_prompts_prefilled_elsewhere():
    prompt = SimRequest(list(range(512)), 4, 0.0)
    full = simulator(one_stage()).run([prompt]).results[0]
    decode_only = simulator(one_stage(), prefilled_link=LINK).run([prompt]).results[0]
    kv_transfer = LINK.transfer_time(511 * SHAPE.num_layers * SHAPE.kv_bytes_per_token())
    assert decode_only.ttft == pytest.approx(kv_transfer + stage_time(StepShape.decode(1, 512)))
    assert decode_only.ttft < full.ttft
    assert decode_only.itl == pytest.approx(full.itl)


def test_plan_stages_share_a_cpu_between_its_workers():
    plan = Plan.from_sizes(4, pipeline_size=3, layer_split=[2, 1, 1], devices=["cuda:0", "cpu", "cpu"])
    stages = plan_stages(plan, CLUSTER, SHAPE.num_kv_heads)
    assert [s.ranks[0].device.name for s in stages] == ["gpu", "cpu", "cpu"]
    assert [s.ranks[0].threads for s in stages] == [None, 2, 2]
    assert [s.link_in for s in stages] == [None, LINK, LINK]
    with pytest.raises(ValueError, match="'cuda:3'.*does not have"):
        plan_stages(Plan.from_sizes(4, devices=["cuda:3"]), CLUSTER, SHAPE.num_kv_heads)


def test_kv_blocks_are_the_fewest_any_worker_fits():
    plan = Plan.from_sizes(4, pipeline_size=2, layer_split=[3, 1], devices=["cuda:0", "cpu"])
    stages = plan_stages(plan, CLUSTER, SHAPE.num_kv_heads)
    per_token_per_layer = SHAPE.kv_bytes_per_token()
    blocks = num_kv_blocks(COST, plan, stages, CacheConfig(kv_cache_memory=2**20))
    assert blocks == 2**20 // (16 * 3 * per_token_per_layer)  # the 3-layer stage holds fewer tokens
    assert num_kv_blocks(COST, plan, stages, CacheConfig(num_kv_blocks=7)) == 7
    int8 = CostModel(replace(SHAPE, kv_cache_dtype="int8"))  # head_dim 16: 16 + 4 bytes a row, not 32
    assert num_kv_blocks(int8, plan, stages, CacheConfig(kv_cache_memory=2**20)) == 2**20 // (16 * 3 * 2 * 2 * 20)


def test_simulate_command_writes_a_bench_report(tmp_path):
    profile = tmp_path / "devices.json"
    profile.write_text(ClusterProfile((GPU,)).to_json())
    out = tmp_path / "sim.json"
    command = [sys.executable, "-m", "hetserve.cli", "simulate", "--devices", str(profile), "--num-prompts", "20",
               "--random-input-len", "64", "--random-output-len", "8", "--request-rate", "4,inf",
               "--goodput", "ttft:1000", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Output token throughput" in done.stdout
    report = json.loads(out.read_text())
    assert [run["summary"]["completed"] for run in report["runs"]] == [20, 20]
    assert report["runs"][0]["summary"]["total_output_tokens"] == 160
    assert report["config"]["simulated"] is True
