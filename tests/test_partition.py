"""The partition planner: hand-checked splits on datasheet devices, the DP against brute force on
small random clusters, and the message when nothing fits. No torch."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hetserve.planner.cost_model import CostModel, ModelShape, StepShape
from hetserve.planner.partition import (InfeasiblePlanError, Partition, PartitionRequest, exhaustive_partition,
                                        plan_partition)
from hetserve.planner.profile import ClusterProfile, DeviceProfile, Link

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# A small model: one layer is 1.97 MB of bf16 weights, a token of KV takes 512 bytes per layer.
SHAPE = ModelShape(num_layers=12, hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=4,
                   head_dim=32, vocab_size=1000)
LAYER = SHAPE.layer_weight_bytes()
EMBEDDING = SHAPE.embedding_bytes()
KV_PER_TOKEN = SHAPE.kv_bytes_per_token()
MAX_BATCHED_TOKENS = 64
ACTIVATIONS = SHAPE.activation_bytes(MAX_BATCHED_TOKENS)
DECODE = StepShape.decode(batch=8, context=512)
NVLINK = Link(bandwidth=300e9, latency=2e-6)

# Llama-2-7B's shapes, for memory messages in GiB.
LLAMA_7B = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                      head_dim=128, vocab_size=32000, tie_word_embeddings=False)
ACTIVATIONS_7B = LLAMA_7B.activation_bytes(MAX_BATCHED_TOKENS)


def make_device(name: str, speed: float = 1.0, memory: float = GIB, host: str = "localhost",
        kind: str = "cuda") -> DeviceProfile:
    """A datasheet device; `speed` scales its FLOP/s and memory bandwidth together. Slow enough that
    a layer (milliseconds) outweighs a transfer between stages (50 microseconds)."""
    return DeviceProfile(name, kind, int(memory), {"bfloat16": 1e12 * speed}, 1e9 * speed, host=host,
                         device="cpu" if kind == "cpu" else None)


def request(kv_tokens: int = 1000, **overrides) -> PartitionRequest:
    return PartitionRequest(DECODE, kv_tokens, max_batched_tokens=MAX_BATCHED_TOKENS, **overrides)


def planned(shape: ModelShape, devices: tuple[DeviceProfile, ...], kv_tokens: int = 1000,
            **cluster_fields) -> Partition:
    partition = plan_partition(CostModel(shape), ClusterProfile(devices, **cluster_fields), request(kv_tokens))
    partition.plan.validate(shape.num_layers, shape.num_kv_heads)
    return partition


def layers_by_device(partition: Partition) -> dict[str, int]:
    return {"+".join(stage.devices): stage.num_layers for stage in partition.plan.stages}


@pytest.mark.parametrize("fast_speed, expected", [
    (3.0, {"cuda:0": 9, "cuda:1": 3}),   # 9 layers at 3x = 3 layers at 1x
    (2.0, {"cuda:0": 8, "cuda:1": 4}),
    (1.0, {"cuda:0": 6, "cuda:1": 6}),
])
def test_faster_device_gets_layers_in_proportion_to_its_speed(fast_speed, expected):
    partition = planned(SHAPE, (make_device("cuda:0", fast_speed), make_device("cuda:1")))
    assert layers_by_device(partition) == expected
    assert all(stage.host is None for stage in partition.plan.stages)  # one host: any node
    assert partition.stages[0].transfer_in == 0 < partition.stages[1].transfer_in


# Room for exactly 4 layers with 20,000 tokens of KV each (and the embedding or LM head), not 5.
KV_TOKENS = 20_000
SMALL_MEMORY = ACTIVATIONS + EMBEDDING + 4 * (LAYER + KV_TOKENS * KV_PER_TOKEN) + LAYER


@pytest.mark.parametrize("kv_tokens, small_layers", [
    (1000, 6),          # fits either way: split by speed alone
    (KV_TOKENS, 4),     # memory bound: the small device holds what it can
])
def test_small_device_gets_fewer_layers_when_memory_binds(kv_tokens, small_layers):
    partition = planned(SHAPE, (make_device("cuda:0"), make_device("cuda:1", memory=SMALL_MEMORY)), kv_tokens)
    assert layers_by_device(partition)["cuda:1"] == small_layers
    assert partition.kv_tokens >= kv_tokens


def test_kv_cache_is_balanced_by_giving_the_small_device_fewer_layers():
    partition = planned(SHAPE, (make_device("cuda:0"), make_device("cuda:1", memory=SMALL_MEMORY)), KV_TOKENS)
    # The small device, with 4 layers, holds fewer tokens than the big one with 8.
    expected = int((SMALL_MEMORY - ACTIVATIONS - EMBEDDING - 4 * LAYER) // (4 * KV_PER_TOKEN))
    assert partition.kv_tokens == expected
    even_split = int((SMALL_MEMORY - ACTIVATIONS - EMBEDDING - 6 * LAYER) // (6 * KV_PER_TOKEN))
    assert even_split < KV_TOKENS < partition.kv_tokens
    for stage in partition.plan.stages:
        assert stage.kv_cache_memory == partition.kv_tokens * stage.num_layers * KV_PER_TOKEN
    for rank in partition.memory:
        assert rank.used <= rank.memory


@pytest.mark.parametrize("hosts, num_layers, tp_sizes", [
    (("h0", "h0", "h1", "h1"), 2, [2, 2]),    # one tensor-parallel pair per host
    (("h0", "h1", "h2", "h3"), 2, [1, 1]),    # identical GPUs, but never one stage across hosts
    (("h0", "h1"), 1, [1]),
])
def test_tensor_parallel_groups_stay_inside_a_host(hosts, num_layers, tp_sizes):
    devices = tuple(make_device(f"cuda:{i}", host=host) for i, host in enumerate(hosts))
    partition = planned(replace(SHAPE, num_layers=num_layers), devices, intra_host=NVLINK)
    assert [stage.tp_size for stage in partition.plan.stages] == tp_sizes
    host_of = {device.name: device.host for device in devices}
    for stage in partition.plan.stages:
        assert {host_of[device] for device in stage.devices} == {stage.host}


def random_case(seed: int) -> tuple[CostModel, ClusterProfile, PartitionRequest]:
    """2-4 devices of 1-3 kinds on 1-2 hosts, 4-8 layers, memory from roomy to too small."""
    rng = random.Random(seed)
    kinds = [dict(speed=rng.choice([0.5, 1.0, 2.0, 3.0]), memory=rng.choice([8, 16, 64, 1024]) * 2**20,
                  host=rng.choice(["h0", "h1"]), kind=rng.choice(["cuda", "cuda", "cpu"]))
             for _ in range(rng.randint(1, 3))]
    devices = tuple(make_device(f"cuda:{i}", **rng.choice(kinds)) for i in range(rng.randint(2, 4)))
    shape = replace(SHAPE, num_layers=rng.randint(4, 8), num_kv_heads=rng.choice([1, 2, 4]),
                    tie_word_embeddings=rng.random() < 0.5)
    step = StepShape.decode(rng.choice([1, 8, 32]), rng.choice([128, 1024]))
    partition_request = PartitionRequest(step, rng.choice([1, 1000, 20_000]), MAX_BATCHED_TOKENS, (1, 2, 4),
                                         use_all_devices=rng.random() < 0.25)
    intra_host = rng.choice([NVLINK, ClusterProfile.intra_host])
    return CostModel(shape), ClusterProfile(devices, intra_host=intra_host), partition_request


@pytest.mark.parametrize("seed", range(100))
def test_dp_finds_the_brute_force_optimum(seed):
    cost, cluster, partition_request = random_case(seed)
    try:
        expected = exhaustive_partition(cost, cluster, partition_request)
    except InfeasiblePlanError:
        with pytest.raises(InfeasiblePlanError):
            plan_partition(cost, cluster, partition_request)
        return
    partition = plan_partition(cost, cluster, partition_request)
    assert partition.bottleneck == pytest.approx(expected.bottleneck, rel=1e-12)
    # Ties on the bottleneck go to the lower latency, then to the larger KV cache.
    assert partition.latency == pytest.approx(expected.latency, rel=1e-9)
    assert partition.kv_tokens == expected.kv_tokens >= partition_request.kv_tokens
    partition.plan.validate(cost.shape.num_layers, cost.shape.num_kv_heads)
    if partition_request.use_all_devices:
        assert len(partition.memory) == len(cluster.devices)


def test_sixteen_devices_of_two_kinds_on_two_hosts():
    devices = tuple(DeviceProfile(f"a100-{i}", "cuda", 40 * GIB, {"bfloat16": 312e12}, 1.5e12, host="h0",
                                  device=f"cuda:{i}") for i in range(8)) + \
        tuple(DeviceProfile(f"t4-{i}", "cuda", 16 * GIB, {"bfloat16": 65e12}, 320e9, host="h1",
                            device=f"cuda:{i}") for i in range(8))
    partition = plan_partition(CostModel(LLAMA_7B), ClusterProfile(devices),
                               PartitionRequest(StepShape.decode(64, 2048), kv_tokens=64 * 2048))
    partition.plan.validate(LLAMA_7B.num_layers, LLAMA_7B.num_kv_heads)
    names = [rank.device for rank in partition.memory]
    assert len(names) == len(set(names))
    assert partition.kv_tokens >= 64 * 2048
    assert "bottleneck" in partition.describe()


@pytest.mark.parametrize("weight_dtype, hints, not_hinted", [
    (None, ["int8 (saves", "int4 (saves"], []),
    ("int8", ["int4 (saves"], ["int8 (saves"]),
    ("int4", [], ["quantize"]),
])
def test_infeasible_message_says_what_lacks_and_what_would_fit(weight_dtype, hints, not_hinted):
    shape = replace(LLAMA_7B, weight_dtype=weight_dtype)
    kv_tokens = 64_000  # 31.25 GiB of KV cache: too much for 16 GiB whatever the weights
    t4 = make_device("t4", memory=16 * GIB)
    with pytest.raises(InfeasiblePlanError) as error:
        plan_partition(CostModel(shape), ClusterProfile((t4,)), request(kv_tokens))
    message = str(error.value)
    # One device holds everything: embedding and LM head, every layer, all the KV cache.
    needed = shape.total_weight_bytes + ACTIVATIONS_7B + kv_tokens * shape.num_layers * shape.kv_bytes_per_token()
    assert f"t4 lacks {(needed - 16 * GIB) / GIB:.2f} GiB" in message
    for text in ["add devices", "offload", "--kv-tokens", *hints]:
        assert text in message
    for text in not_hinted:
        assert text not in message


def test_infeasible_shape_names_the_constraint():
    devices = tuple(make_device(f"cuda:{i}", host=f"h{i}") for i in range(3))
    with pytest.raises(InfeasiblePlanError, match="use_all_devices"):
        plan_partition(CostModel(replace(SHAPE, num_layers=2)), ClusterProfile(devices),
                       request(use_all_devices=True))


def test_request_is_checked_at_construction():
    with pytest.raises(ValueError, match="max_batched_tokens"):
        PartitionRequest(StepShape.prefill(4096), kv_tokens=4096, max_batched_tokens=2048)


def test_partition_imports_without_torch():
    check = "import sys, hetserve.planner.partition; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
