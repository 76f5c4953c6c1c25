"""The offload planner: per-layer tiers within a budget, and the FlexGen-style policy search (pure, no torch)."""

from __future__ import annotations

import itertools
import math

import pytest

from hetserve.planner.cost_model import CostModel, ModelShape
from hetserve.planner.offload import (KV_DEVICE_FRACTIONS, LayerBudget, OffloadTarget, OffloadWorkload,
                                      evaluate_policy, layer_tiers, search_offload_policy)
from hetserve.planner.profile import DeviceProfile, Link

D, H, K = "device", "host", "disk"


@pytest.mark.parametrize("budget, expected", [
    # Everything fits: nothing streams, so no room is kept for layers in flight.
    (LayerBudget(4, 10, 5, 45), (D, D, D, D)),
    # 2 resident + 2 in flight fill the 40 bytes beside the fixed 5; resident layers spread out.
    (LayerBudget(10, 10, 5, 45), (K, K, D, K, K, K, K, D, K, K)),
    # Host RAM takes the first three streamed layers.
    (LayerBudget(10, 10, 5, 45, host_budget=30), (H, H, D, H, K, K, K, D, K, K)),
    # cpu_offload_gb alone: host RAM takes every streamed layer.
    (LayerBudget(4, 10, 5, 35, host_budget=math.inf), (H, H, D, H)),
    # A wider prefetch window holds more layers in flight, leaving no room for resident ones.
    (LayerBudget(10, 10, 5, 45, window=3), (K,) * 10),
    # Just short of all resident: streaming takes the room of two layers in flight.
    (LayerBudget(4, 10, 5, 44), (K, K, D, K)),
])
def test_layer_tiers(budget, expected):
    assert layer_tiers(budget) == expected


def test_a_budget_without_room_for_the_layers_in_flight_is_a_clear_error():
    with pytest.raises(ValueError, match="too small.*give at least"):
        layer_tiers(LayerBudget(10, 10, 5, 24))


SHAPE = ModelShape(num_layers=6, hidden_size=256, intermediate_size=768, num_heads=4, num_kv_heads=2,
                   head_dim=64, vocab_size=1000, dtype="float16")
GPU = DeviceProfile("gpu", "cuda", memory=2**30, flops={"float16": 2e12}, memory_bandwidth=2e11,
                    host_link=Link(bandwidth=1e10, latency=1e-5), step_overhead=1e-4)
CPU = DeviceProfile("cpu", "cpu", memory=2**30, flops={"float16": 1e11}, memory_bandwidth=2e10)
WORKLOAD = OffloadWorkload(prompt_len=64, output_len=32, max_batch_size=16)


def _target(device: DeviceProfile, layers_on_device: float, **kwargs) -> OffloadTarget:
    cost = CostModel(SHAPE)
    memory = 2 * SHAPE.embedding_bytes() + layers_on_device * SHAPE.layer_weight_bytes() + 2**20
    return OffloadTarget(device, memory, disk=Link(bandwidth=1e9, latency=1e-4), **{"host_memory": 0, **kwargs}), cost


def test_the_search_matches_brute_force_over_every_placement():
    target, cost = _target(GPU, 3.5, host_memory=2.5 * SHAPE.layer_weight_bytes() + 2**20, kv_in_host=True)
    best = search_offload_policy(cost, target, WORKLOAD)
    candidates = [
        evaluate_policy(cost, target, WORKLOAD, batch, kv, num_device, num_host)
        for batch, kv, num_device, num_host in itertools.product(
            (1, 2, 4, 8, 16), KV_DEVICE_FRACTIONS, range(7), range(7))]
    brute = max((c for c in candidates if c is not None), key=lambda c: c.tokens_per_s)
    assert best.tokens_per_s == pytest.approx(brute.tokens_per_s)
    assert "device" in best.tiers and set(best.tiers) != {"device"}


def test_offloaded_steps_are_bound_by_the_slower_of_compute_and_transfer():
    target, cost = _target(GPU, 2.5)
    policy = search_offload_policy(cost, target, WORKLOAD)
    assert policy.tiers.count("disk") == 6 - policy.tiers.count("device") > 0
    assert policy.transfer_time > policy.compute_time
    assert policy.step_time > policy.transfer_time
    roomy, _ = _target(GPU, 6)
    in_memory = search_offload_policy(cost, roomy, WORKLOAD)
    assert set(in_memory.tiers) == {"device"} and in_memory.transfer_time == 0
    assert in_memory.tokens_per_s > policy.tokens_per_s


def test_a_cpu_device_has_no_host_tier_and_keeps_kv_on_itself():
    target, cost = _target(CPU, 3, host_memory=2**30, kv_in_host=True)
    policy = search_offload_policy(cost, target, WORKLOAD)
    assert "host" not in policy.tiers and policy.kv_device_fraction == 1.0
    assert policy.step_time > policy.compute_time + policy.transfer_time  # copies share the CPU's memory bus
    assert "--disk-offload-dir" in policy.describe() and "--cpu-offload-gb" not in policy.describe()


def test_kv_in_host_is_only_a_prediction_and_says_so():
    target, cost = _target(GPU, 2.2, host_memory=2**30, kv_in_host=True)
    policy = search_offload_policy(cost, target, OffloadWorkload(64, 32, 1024))
    assert policy.kv_device_fraction < 1.0
    assert "not servable" in policy.describe()


def test_nothing_fits_is_a_clear_error():
    target, cost = _target(GPU, 0)
    with pytest.raises(ValueError, match="no offload policy fits"):
        search_offload_policy(cost, target, WORKLOAD)
