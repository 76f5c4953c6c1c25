"""The Ray executor on a local two-node Ray cluster that the test starts (loopback only), serving
through `hetserve serve` with one pipeline stage placed on each node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hetserve import LLM, SamplingParams
from hetserve.worker.distributed import free_port
from tests.live_server import Server
from tests.tiny_models import make_hf_model

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and a second node, each with one CPU and a resource naming it."""
    address = f"127.0.0.1:{free_port()}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", address.split(":")[1], "--include-dashboard", "false",
                        "--resources", '{"node-a": 1}', *common], check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", address, "--resources", '{"node-b": 1}', *common],
                       check=True, capture_output=True, timeout=120)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_ray_stages_on_two_nodes_serve_the_single_worker_tokens(ray_cluster, tmp_path, monkeypatch):
    model = make_hf_model(tmp_path / "llama", num_layers=4, num_heads=4, num_kv_heads=2)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"stages": [
        {"start": 0, "end": 3, "devices": ["cpu"], "host": "node-a"},
        {"start": 3, "end": 4, "devices": ["cpu"], "host": "node-b"},
    ]}))
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].text for o in LLM(model=str(model), dtype="float32").generate(prompts, params)]

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    server = Server("--model", str(model), "--plan", str(plan), "--distributed-executor-backend", "ray")
    try:
        name = httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"][0]["id"]
        for prompt, text in zip(prompts, expected):
            response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
            assert response.json()["choices"][0]["text"] == text
        nodes = re.findall(r"rank (\d) on ([0-9a-f]+)", server.log_text())
        assert len(nodes) == 2 and nodes[0][1] != nodes[1][1], nodes
    finally:
        assert server.stop() == 0
