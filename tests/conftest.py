"""Shared fixtures. Models load once per session: the suite runs on 2 cores."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import default_gguf_path

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm_path():
    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' own loading of the packaged GGUF: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llm():
    """SmolLM2 in fp32 with a modest KV pool; every test leaves it with no requests."""
    from hetserve import LLM

    return LLM(dtype="float32", kv_cache_memory="256MiB", max_model_len=2048, max_num_seqs=32)
