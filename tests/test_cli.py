"""The command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def hetserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prints_the_greedy_completion(llm):
    from hetserve import SamplingParams

    result = hetserve("generate", "--prompt", "The capital of France is", "--max-tokens", "8",
                      "--dtype", "float32", "--kv-cache-memory", "64MiB")
    assert result.returncode == 0, result.stderr
    expected = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    assert result.stdout.strip() == expected[0].outputs[0].text.strip()


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    result = hetserve("generate", "--prompt", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr
    result = hetserve("generate", "--prompt", "hi", "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr


def test_serve_help_documents_the_vllm_flags():
    result = hetserve("serve", "--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--dtype", "--kv-cache-memory", "--enable-prefix-caching",
                 "--no-enable-prefix-caching", "--chat-template", "--max-queue-len", "--disable-log-requests",
                 "--memory-budget", "--cpu-offload-gb", "--disk-offload-dir", "--offload-prefetch-window"):
        assert flag in result.stdout
