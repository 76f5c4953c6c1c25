"""`hetserve plan` and `hetserve profile` from the command line, on the datasheet clusters in docs/
and on this machine with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetserve.cache import cache_dir
from hetserve.config import EngineConfig, ParallelConfig
from hetserve.planner.auto import auto_plan, wants_auto_plan
from hetserve.planner.calibrate import StepTiming, fit_overheads, fit_serving_overheads
from hetserve.planner.cost_model import CostModel, ModelShape, Rank, StepShape
from hetserve.planner.models import KNOWN_MODELS
from hetserve.planner.plan import Plan
from hetserve.planner.profile import ClusterProfile, DeviceProfile
from tests.tiny_models import make_hf_model

DOCS = Path(__file__).resolve().parent.parent / "docs" / "devices"


def hetserve(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_plan_splits_llama_8b_between_a_small_gpu_and_the_cpu(tmp_path):
    out = tmp_path / "plan.json"
    done = hetserve("plan", "--model", "llama-3-8b", "--devices", str(DOCS / "gpu8gb-cpu.json"),
                    "--batch-size", "8", "--context-len", "1024", "--out", str(out))
    assert done.returncode == 0, done.stderr
    plan = Plan.load(out)
    spec = KNOWN_MODELS["llama-3-8b"]
    plan.validate(spec.num_layers, spec.num_kv_heads)
    assert [stage.devices for stage in plan.stages] == [("cuda:0",), ("cpu",)] or \
        [stage.devices for stage in plan.stages] == [("cpu",), ("cuda:0",)]
    gpu_layers = sum(s.num_layers for s in plan.stages if s.devices == ("cuda:0",))
    assert 0 < gpu_layers < spec.num_layers  # 16 GB of bf16 weights: not all of them fit in 8 GB
    assert "bottleneck" in done.stdout and "uniform split" in done.stdout


def test_plan_says_what_is_missing_when_the_model_does_not_fit():
    done = hetserve("plan", "--model", "llama-3-70b", "--devices", str(DOCS / "gpu8gb-cpu.json"))
    assert done.returncode == 2
    assert "lacks" in done.stderr and "GiB" in done.stderr and "int4" in done.stderr


def test_plan_reads_a_config_json_and_plans_disaggregation(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 1024, "hidden_size": 512,
                                  "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8,
                                  "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}))
    devices = tmp_path / "gpus.json"
    gpus = tuple(DeviceProfile(f"gpu{i}", "cuda", 2**32, {"bfloat16": 2e12}, 2e11, device=f"cuda:{i}")
                 for i in range(4))
    devices.write_text(ClusterProfile(gpus).to_json())
    done = hetserve("plan", "--model", str(config), "--devices", str(devices), "--slo-ttft", "200",
                    "--slo-tpot", "20", "--num-prompts", "20", "--random-input-len", "256", "--random-output-len", "16")
    assert done.returncode == 0, done.stderr
    assert "disaggregated:" in done.stdout and "colocated:" in done.stdout


def test_calibration_fits_what_the_engine_adds_to_the_forward_pass():
    shape = ModelShape(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                       head_dim=16, vocab_size=256)
    cost = CostModel(shape)
    device = DeviceProfile("cpu", "cpu", 2**30, {"bfloat16": 1e10}, 1e9)
    cluster = ClusterProfile((device,))
    forward = {n: cost.stage_time((Rank(device, 2),), 2, StepShape.decode(n, 80), True) for n in (1, 4, 16)}
    # The executor takes 2 ms + 0.1 ms per request beyond the forward pass, the engine 0.3 + 0.05 n.
    timings = [StepTiming(n, StepShape.decode(n, 80), forward[n] + 2e-3 + 1e-4 * n, 3e-4 + 5e-5 * n)
               for n in (1, 4, 16)]
    fitted = fit_overheads(cost, cluster, "cpu", timings)
    assert fitted.devices[0].step_overhead == pytest.approx(2e-3)
    assert fitted.engine_step_overhead == pytest.approx(3e-4)
    assert fitted.engine_request_overhead == pytest.approx(1.5e-4)
    # Served over HTTP, a step takes 1 ms + 0.2 ms per request more than the engine alone.
    engine = {n: forward[n] + 2e-3 + 3e-4 + 1.5e-4 * n for n in (1, 4, 16)}
    served = fit_serving_overheads(cost, fitted, "cpu", {n: engine[n] + 1e-3 + 2e-4 * n for n in (1, 4, 16)})
    assert served.engine_step_overhead == pytest.approx(3e-4 + 1e-3)
    assert served.engine_request_overhead == pytest.approx(1.5e-4 + 2e-4)


@pytest.mark.slow
def test_profile_command_measures_and_caches_this_machine(tmp_path):
    model = make_hf_model(tmp_path / "tiny", num_layers=2)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # The profile cache is what this test isolates; the compiled CPU kernel (about 20 s to build) is shared.
    kernels = cache_dir("kernels")
    kernels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "hetserve").mkdir(parents=True)
    (tmp_path / "cache" / "hetserve" / "kernels").symlink_to(kernels)
    out = tmp_path / "profile.json"
    done = hetserve("profile", "--model", str(model), "--quick", "--out", str(out), env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    cluster = ClusterProfile.load(out)
    assert cluster.devices[0].name == "cpu" and cluster.devices[0].linear
    assert cluster.engine_step_overhead > 0 or cluster.engine_request_overhead > 0
    cached = list((tmp_path / "cache" / "hetserve" / "profiles").glob("*.json"))
    assert len(cached) == 1 and ClusterProfile.load(cached[0]) == cluster


@pytest.mark.parametrize("parallel, device, gpus, expected", [
    (ParallelConfig(), "auto", 2, True),
    (ParallelConfig(), "auto", 1, False),
    (ParallelConfig(), "cpu", 4, False),
    (ParallelConfig(pipeline_parallel_size=2), "auto", 2, False),
    (ParallelConfig(devices="cuda:0,cuda:1"), "auto", 2, False),
    (ParallelConfig(plan="auto"), "cpu", 0, True),
])
def test_serve_plans_by_itself_only_when_the_user_said_nothing_and_has_gpus(parallel, device, gpus, expected):
    assert wants_auto_plan(parallel, device, gpus) is expected


def test_auto_plan_places_every_layer_on_the_gpus_that_hold_it():
    spec = KNOWN_MODELS["llama-3-8b"]
    gpus = tuple(DeviceProfile(f"gpu{i}", "cuda", int(12e9), {"bfloat16": 100e12}, 900e9, device=f"cuda:{i}")
                 for i in range(2))
    cluster = ClusterProfile(gpus + (DeviceProfile("cpu", "cpu", int(64e9), {"float32": 1e12}, 50e9, cores=16),))
    plan = auto_plan(EngineConfig(), spec, cluster, "bfloat16", max_model_len=8192)
    assert sorted(d for s in plan.stages for d in s.devices) == ["cuda:0", "cuda:1"]  # 16 GB: one GPU is too small
    assert plan.stages[0].start == 0 and plan.stages[-1].end == spec.num_layers
