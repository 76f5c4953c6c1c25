"""The cost model against figures computed by hand (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape, interpolate, pick_dtype
from hetserve.planner.profile import DeviceProfile, LinearTiming, Link

# hidden 64, 4 query heads and 2 KV heads of 16: q 64, kv 32; intermediate 128.
SHAPE = ModelShape(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                   vocab_size=100)
# 1 GFLOP/s and 1 GB/s: easy arithmetic.
DEVICE = DeviceProfile("d", "cuda", memory=2**30, flops={"bfloat16": 1e9}, memory_bandwidth=1e9)
COST = CostModel(SHAPE)


def test_shapes_and_memory():
    assert SHAPE.linears() == ((128, 64), (64, 64), (256, 64), (64, 128))
    assert SHAPE.layer_params == 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128 + 2 * 64 == 36992
    assert SHAPE.layer_weight_bytes() == 2 * 36992
    assert SHAPE.kv_bytes_per_token() == 2 * 2 * 16 * 2 == 128
    assert SHAPE.kv_bytes_per_token(kv_heads=1) == 64
    assert replace(SHAPE, kv_cache_dtype="int8").kv_bytes_per_token() == 2 * 2 * (16 + 4)  # values + fp32 scale
    assert replace(SHAPE, kv_cache_dtype="fp8").kv_bytes_per_token() == 2 * 2 * 16
    assert replace(SHAPE, weight_dtype="int4").layer_weight_bytes() == 36992 / 2
    assert SHAPE.total_weight_bytes == 2 * 2 * 36992 + 100 * 64 * 2  # tied: one vocabulary matrix
    # Quantized: the tied LM head becomes its own int8 matrix beside the bf16 embedding.
    assert replace(SHAPE, weight_dtype="int4").total_weight_bytes == 2 * 36992 / 2 + 100 * 64 * (2 + 1)


def test_a_quantized_lm_head_is_read_and_stored_in_int8():
    int4 = CostModel(replace(SHAPE, weight_dtype="int4"))
    fast = replace(DEVICE, flops={"bfloat16": 1e12})  # memory-bound at one token
    rank, step = Rank(fast, 2), StepShape.decode(batch=1, context=10)
    assert int4.lm_head_time(rank, step) == pytest.approx((100 * 64 * 1 + (100 + 64) * 2) / 1e9)
    assert COST.lm_head_time(rank, step) == pytest.approx((100 * 64 * 2 + (100 + 64) * 2) / 1e9)
    last_only = int4.stage_weight_bytes(2, 2, is_first=False, is_last=True)
    assert last_only == 2 * int4.shape.layer_weight_bytes() + 100 * 64


@pytest.mark.parametrize("tokens, expected", [
    (1, (64 * 64 * 2 + 1 * 128 * 2) / 1e9),          # memory bound: weights + activations at 1 GB/s
    (1000, 2 * 1000 * 64 * 64 / 1e9),                 # compute bound: 2mnk at 1 GFLOP/s
])
def test_linear_roofline(tokens, expected):
    assert COST.linear_time(DEVICE, tokens, 64, 64) == pytest.approx(expected)


def test_measured_linear_timings_are_interpolated_and_scaled_for_a_slice():
    timings = (LinearTiming(1, 64, 64, 1e-5), LinearTiming(8, 64, 64, 2e-5), LinearTiming(64, 64, 64, 1e-4))
    measured = DeviceProfile("m", "cpu", 2**30, {"bfloat16": 1e9}, 1e9, linear={"bfloat16": timings})
    assert COST.linear_time(measured, 1, 64, 64) == pytest.approx(1e-5)
    assert COST.linear_time(measured, 36, 64, 64) == pytest.approx(6e-5)      # halfway from 8 to 64
    assert COST.linear_time(measured, 128, 64, 64) == pytest.approx(2e-4)     # proportional past 64
    assert COST.linear_time(measured, 8, 64, 64, fraction=0.5) == pytest.approx(1e-5)
    assert interpolate(list(timings), 4) == pytest.approx(1e-5 + 1e-5 * 3 / 7)


def test_attention_reads_kv_for_decodes_and_counts_pairs_for_prefill():
    step = StepShape.from_chunks([(99, 1, True), (49, 1, True), (0, 10, True)])
    assert (step.tokens, step.sampled, step.decode_kv_tokens, step.prefill_pairs) == (12, 3, 150, 55)
    decode_bytes = 150 * 128
    prefill_flops = 4 * 55 * 4 * 16
    assert COST.attention_time(DEVICE, step, kv_heads=2) == pytest.approx(decode_bytes / 1e9 + prefill_flops / 1e9)
    assert COST.attention_time(DEVICE, step, kv_heads=1) == pytest.approx((decode_bytes + prefill_flops) / 2 / 1e9)


def test_stage_time_adds_overheads_lm_head_and_tensor_parallel_all_reduces():
    device = DeviceProfile("o", "cuda", 2**30, {"bfloat16": 1e9}, 1e9, layer_overhead=1e-3, step_overhead=2e-3)
    step = StepShape.decode(1, 10)
    layer = COST.layer_time(Rank(device, 2), step)
    assert layer == pytest.approx(sum(COST.linear_time(device, 1, o, i) for o, i in SHAPE.linears())
                                  + 10 * 128 / 1e9 + 1e-3)
    whole = COST.stage_time((Rank(device, 2),), 2, step, is_last=True)
    assert whole == pytest.approx(2 * layer + 2e-3 + COST.linear_time(device, 1, 100, 64))
    link = Link(bandwidth=1e9, latency=1e-5)
    tp = COST.stage_time((Rank(device, 1), Rank(device, 1)), 2, step, is_last=False, tp_link=link)
    # Ring all-reduce of 64 bf16 values over 2 ranks: 2 * (2 - 1) * (latency + 128 / 2 / bandwidth), twice a layer.
    all_reduce = 2 * (1e-5 + 64 / 1e9)
    assert tp == pytest.approx(2 * COST.layer_time(Rank(device, 1), step) + 2e-3 + 2 * 2 * all_reduce)


def test_fewer_cpu_threads_slow_compute_by_the_measured_scaling():
    cpu = DeviceProfile("c", "cpu", 2**30, {"bfloat16": 1e9}, 1e9, cores=4, thread_scaling={2: 1.8})
    step = StepShape.decode(4, 32)
    full = COST.layer_time(Rank(cpu, 2), step)
    assert COST.layer_time(Rank(cpu, 2, threads=2), step) == pytest.approx(1.8 * full)
    assert COST.layer_time(Rank(cpu, 2, threads=1), step) == pytest.approx(4 * full)  # unmeasured: cores / threads


def test_stage_weights_and_kv_capacity():
    first_and_last = COST.stage_weight_bytes(2, 2, is_first=True, is_last=True)
    assert first_and_last == 2 * SHAPE.layer_weight_bytes() + SHAPE.embedding_bytes()  # tied: stored once
    assert COST.stage_weight_bytes(2, 1, is_first=False, is_last=True, tp_rank=1) == SHAPE.layer_weight_bytes()
    assert COST.kv_tokens_capacity(free_bytes=128 * 2 * 1000, num_layers=2, kv_heads=2) == 1000


def test_a_device_without_the_dtype_computes_the_nearest_one():
    t4 = DeviceProfile("t4", "cuda", 2**30, {"float16": 65e12}, 3e11)
    assert pick_dtype(t4, "bfloat16") == "float16"
    assert pick_dtype(DEVICE, "bfloat16") == "bfloat16"
