"""DistServe-style disaggregation planning on hypothetical devices (pure Python, simulated)."""

from __future__ import annotations

import pytest

from hetserve.bench.metrics import SLO
from hetserve.bench.workloads import Request
from hetserve.config import CacheConfig, SchedulerConfig
from hetserve.planner.cost_model import CostModel, ModelShape
from hetserve.planner.disaggregation import DisaggregationPlanner, InstanceRate, balance
from hetserve.planner.plan import Plan
from hetserve.planner.profile import ClusterProfile, DeviceProfile, Link

SHAPE = ModelShape(num_layers=8, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=4,
                   head_dim=64, vocab_size=1024)
GPUS = tuple(DeviceProfile(f"gpu{i}", "cuda", memory=2**30, flops={"bfloat16": 2e12}, memory_bandwidth=2e11,
                           device=f"cuda:{i}", layer_overhead=2e-5, step_overhead=5e-4) for i in range(4))
CLUSTER = ClusterProfile(GPUS, intra_host=Link(bandwidth=2e10, latency=1e-5))


def instance(role: str, devices: int, rate: float) -> InstanceRate:
    return InstanceRate(role, Plan.from_sizes(8), devices, rate)


@pytest.mark.parametrize("prefill, decode, devices, expected", [
    ((1, 10.0), (1, 10.0), 4, (2, 2)),
    ((1, 30.0), (1, 10.0), 4, (1, 3)),   # decode is the bottleneck: it gets three devices
    ((1, 5.0), (2, 40.0), 6, (4, 1)),    # one 2-device decode instance keeps up with four prefills
    ((2, 8.0), (1, 5.0), 5, (1, 3)),    # the 2-device prefill instance leaves three devices to decode
])
def test_balance_maximizes_the_slower_phase(prefill, decode, devices, expected):
    assert balance(instance("prefill", *prefill), instance("decode", *decode), devices) == expected


def test_balance_refuses_too_few_devices():
    with pytest.raises(ValueError, match="cannot hold a prefill instance"):
        balance(instance("prefill", 2, 1.0), instance("decode", 2, 1.0), 3)


def planner(prompt_len: int, output_len: int, slo: SLO = SLO(ttft=100, tpot=20)) -> DisaggregationPlanner:
    workload = [Request("word " * prompt_len, prompt_len, output_len) for _ in range(30)]
    return DisaggregationPlanner(CostModel(SHAPE), CLUSTER, workload, slo,
                                 SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048),
                                 CacheConfig(kv_cache_memory=2**28))


def test_instance_shapes_cover_tensor_and_pipeline_splits_that_fit():
    shapes = {(len(plan.stages), plan.stages[0].tp_size, size) for plan, size in planner(64, 8).instance_plans()}
    assert {(1, 1, 1), (2, 1, 2), (3, 1, 3), (4, 1, 4), (1, 2, 2), (2, 2, 4), (1, 4, 4)} == shapes


def test_long_prompts_get_more_prefill_instances_than_long_outputs_do():
    prefill_heavy = planner(prompt_len=1500, output_len=4).plan()
    decode_heavy = planner(prompt_len=32, output_len=200).plan()
    assert prefill_heavy.num_prefill > decode_heavy.num_prefill
    assert decode_heavy.num_decode > prefill_heavy.num_decode
    for plan in (prefill_heavy, decode_heavy):
        assert plan.num_prefill * plan.prefill.num_devices + plan.num_decode * plan.decode.num_devices <= 4
        assert plan.goodput == pytest.approx(min(plan.num_prefill * plan.prefill.rate,
                                                 plan.num_decode * plan.decode.rate))


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_found_rate_meets_the_objective_and_a_much_higher_one_does_not(role):
    search = planner(1024, 32, SLO(ttft=5, tpot=1.5))
    plan = Plan.from_sizes(8, devices=["cuda:0"])
    rate = search.max_rate(role, plan)
    assert 0 < rate <= search._capacity(role, plan)
    assert search._attainment(role, plan, rate) >= search.attainment
    assert search._attainment(role, plan, rate * 4) < search.attainment


def test_objectives_out_of_reach_are_reported():
    with pytest.raises(ValueError, match="no prefill instance meets the objectives"):
        planner(1500, 4, SLO(ttft=0.001, tpot=20)).plan()
    with pytest.raises(ValueError, match="needs both a TTFT and a TPOT"):
        planner(64, 8, SLO(ttft=100)).plan()
