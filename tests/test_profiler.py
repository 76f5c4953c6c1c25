"""The profiler on a tiny model: what it measures is complete and usable by the cost model, its
cache is keyed and refreshed as documented, and its link measurements run. No timing assertions:
the figures depend on the machine and its load."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hetserve.model.spec import ModelSpec
from hetserve.planner import profiler
from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape
from hetserve.planner.fit import fit_nonnegative_line
from hetserve.planner.profile import ClusterProfile, Link

TINY = ModelSpec("llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=1024,
                 tie_word_embeddings=True)


@pytest.fixture(scope="module")
def cpu_profile():
    return profiler.profile_device(TINY, "cpu", quick=True)


def test_linear_timings_cover_every_shape_dtype_and_token_count(cpu_profile):
    assert set(cpu_profile.linear) == set(profiler.default_dtypes(torch.device("cpu")))
    qkv, o, gate_up, down, lm_head = (128, 64), (64, 64), (256, 64), (64, 128), (320, 64)
    expected = {(tokens, out, inp) for out, inp in (qkv, o, gate_up, down, lm_head)
                for tokens in profiler.QUICK.token_counts}
    for timings in cpu_profile.linear.values():
        assert {(t.tokens, t.out_features, t.in_features) for t in timings} == expected
        assert all(t.seconds > 0 for t in timings)


def test_measures_every_figure_the_cost_model_reads(cpu_profile):
    assert cpu_profile.kind == "cpu" and cpu_profile.memory > 0 and cpu_profile.memory_bandwidth > 0
    assert cpu_profile.attention_bandwidth > 0
    assert set(cpu_profile.attention_flops) == set(cpu_profile.flops) == set(cpu_profile.linear)
    assert all(value > 0 for value in (*cpu_profile.flops.values(), *cpu_profile.attention_flops.values()))
    assert cpu_profile.layer_overhead >= 0 and cpu_profile.token_overhead >= 0
    smaller = [threads for threads in (1, 2, 4, 8, 16, 32, 64) if threads < cpu_profile.cores]
    assert sorted(cpu_profile.thread_scaling) == smaller
    assert all(ratio > 0 for ratio in cpu_profile.thread_scaling.values())


def test_profile_roundtrips_json_and_gives_the_cost_model_finite_times(cpu_profile):
    cluster = ClusterProfile((cpu_profile,), fingerprint="abc")
    assert ClusterProfile.from_json(cluster.to_json()) == cluster
    cost_model = CostModel(ModelShape.from_spec(TINY))
    for step in (StepShape.decode(32, 300), StepShape.prefill(100)):
        seconds = cost_model.layer_time(Rank(cpu_profile, TINY.num_kv_heads, threads=1), step)
        assert 0 < seconds < math.inf


def test_fit_nonnegative_line_recovers_a_line_and_clamps_at_zero():
    a, b = fit_nonnegative_line([1, 2, 4], [3.0, 5.0, 9.0], scales=[1, 1, 1])
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)
    a, b = fit_nonnegative_line([1, 2, 4], [5.0, 4.0, 2.0], scales=[1, 1, 1])
    assert b == 0 and a == pytest.approx(11 / 3)
    a, b = fit_nonnegative_line([1, 2, 4], [-1.0, 2.0, 8.0], scales=[1, 1, 1])
    assert a == 0 and b == pytest.approx(5 / 3)


def test_cluster_profile_holds_the_devices_the_link_and_the_cache_key(monkeypatch, cpu_profile):
    link = Link(bandwidth=1e9, latency=1e-5)
    monkeypatch.setattr(profiler, "available_devices", lambda: ["cpu"])
    monkeypatch.setattr(profiler, "profile_device", lambda spec, name, dtypes, quick: cpu_profile)
    monkeypatch.setattr(profiler, "measure_intra_host_link", lambda iterations: link)
    cluster = profiler.profile_cluster(TINY, quick=True)
    assert cluster.devices == (cpu_profile,) and cluster.intra_host == link
    assert cluster.fingerprint == profiler.profile_fingerprint(TINY, None, True, ["cpu"])


@pytest.fixture
def counted_measurements(monkeypatch, tmp_path, cpu_profile):
    """profile_cluster replaced by a counter that returns the tiny CPU profile; the cache in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def measure(spec, dtypes=None, quick=False, devices=None, model=None):
        calls.append(spec)
        return ClusterProfile((cpu_profile,),
                              fingerprint=profiler.profile_fingerprint(spec, dtypes, quick, devices, model))

    monkeypatch.setattr(profiler, "profile_cluster", measure)
    return calls


def test_cache_loads_the_saved_profile_instead_of_measuring(counted_measurements, monkeypatch, tmp_path):
    first = profiler.cached_profile(TINY, quick=True)
    path = profiler.profile_cache_path(first.fingerprint)
    assert path.is_relative_to(tmp_path / "hetserve" / "profiles") and path.exists()

    def fail(*args, **kwargs):
        raise AssertionError("measured although a cached profile exists")

    monkeypatch.setattr(profiler, "profile_cluster", fail)
    assert profiler.cached_profile(TINY, quick=True) == first


def test_cache_refresh_measures_again(counted_measurements):
    profiler.cached_profile(TINY, quick=True)
    profiler.cached_profile(TINY, quick=True, refresh=True)
    assert len(counted_measurements) == 2


def test_unreadable_cache_is_measured_again(counted_measurements):
    first = profiler.cached_profile(TINY, quick=True)
    profiler.profile_cache_path(first.fingerprint).write_text("{")
    assert profiler.cached_profile(TINY, quick=True) == first
    assert len(counted_measurements) == 2


def test_fingerprint_is_stable_and_changes_with_the_model_shape_options_and_kernels(monkeypatch):
    def fingerprint(spec=TINY, dtypes=None, quick=True):
        return profiler.profile_fingerprint(spec, dtypes, quick, ["cpu"])

    assert fingerprint() == fingerprint()
    assert fingerprint(replace(TINY, intermediate_size=256)) != fingerprint()
    assert fingerprint(replace(TINY, vocab_size=640)) != fingerprint()
    assert fingerprint(dtypes=["float32"]) != fingerprint()
    assert fingerprint(quick=False) != fingerprint()
    before = fingerprint()
    monkeypatch.setattr(profiler, "kernels_version", lambda: "edited")  # a kernel's speed may have changed
    assert fingerprint() != before


def test_intra_host_link_has_positive_bandwidth_and_latency():
    link = profiler.measure_intra_host_link(iterations=5)
    assert link.bandwidth > 0 and link.latency > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profile_has_a_host_link_and_no_thread_scaling():
    device = profiler.profile_device(TINY, "cuda:0", quick=True)
    assert device.kind == "cuda" and device.cores == 1 and not device.thread_scaling
    assert device.host_link is not None and device.host_link.bandwidth > 0
    assert set(device.linear) == set(profiler.default_dtypes(torch.device("cuda:0")))
