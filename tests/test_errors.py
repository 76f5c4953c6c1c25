"""Bad input is a ValueError naming the field, and leaves nothing allocated."""

from __future__ import annotations

import pytest

from hetserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -2}, "top_k"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def assert_clean(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.scheduler.requests


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([""])
    assert_clean(llm)


def test_prompt_plus_max_tokens_over_max_model_len(llm):
    long_prompt = "word " * 1500
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate(["fine prompt", long_prompt], SamplingParams(max_tokens=1000))
    assert_clean(llm)


def test_token_ids_out_of_vocabulary(llm):
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 10**9]])
    assert_clean(llm)


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="model"):
        LLM(str(tmp_path / "no-such-model"))


def test_bad_engine_arguments():
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float8")
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(max_num_seq=3)
    with pytest.raises(ValueError, match="size"):
        LLM(kv_cache_memory="lots")


def test_stop_token_ids_out_of_vocabulary(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["hi"], SamplingParams(min_tokens=2, stop_token_ids=[10**6]))
    assert_clean(llm)
