"""--kv-cache-dtype int8 / fp8: capacity, accuracy against the model-dtype cache, batch invariance,
swapping and the sliding window over a quantized cache."""

from __future__ import annotations

import pytest
import torch

from hetserve import LLM, SamplingParams
from hetserve.config import CacheConfig
from hetserve.worker.device import resolve_kv_cache_dtype
from tests.test_batch_invariance import make_prompts, run_staggered
from tests.tiny_models import make_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """head_dim 64, as in SmolLM2, so the int8 scales weigh what they weigh there."""
    return str(make_hf_model(tmp_path_factory.mktemp("hf") / "llama", num_layers=2, hidden_size=128,
                             num_heads=2, num_kv_heads=1, intermediate_size=256))


def test_the_flag_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, int8 or fp8"):
        CacheConfig(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(kv_cache_dtype="float16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability 8.9"):
        resolve_kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda"))
    assert resolve_kv_cache_dtype("int8", torch.bfloat16, torch.device("cuda")) == torch.int8
    assert resolve_kv_cache_dtype("fp8", torch.float32, torch.device("cpu")) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("auto", torch.float32, torch.device("cpu")) == torch.float32


def test_int8_holds_about_twice_the_blocks_of_bfloat16_in_the_same_memory(tiny_model):
    def blocks(kv_cache_dtype: str) -> int:
        llm = LLM(model=tiny_model, dtype="bfloat16", kv_cache_memory="4MiB", kv_cache_dtype=kv_cache_dtype)
        return llm.engine.block_manager.num_blocks

    auto = blocks("auto")
    assert blocks("int8") / auto == pytest.approx(128 / (64 + 4), rel=0.01)  # 1.88x: a bf16 row vs int8 + scale
    assert blocks("fp8") / auto == pytest.approx(2.0, rel=0.01)


@pytest.mark.parametrize("kv_cache_dtype,atol", [("int8", 0.05), ("fp8", 0.2)])
def test_quantized_kv_logprobs_are_close_to_the_float_cache_ones(tiny_model, kv_cache_dtype, atol):
    """Chunked prefill reads the quantized cache; decode too (the C kernel for int8, tensor ops for fp8).
    Logprobs are compared while the greedy tokens agree (fp8, with 3 mantissa bits, parts sooner)."""
    prompts = [list(range(5, 45)), [7, 8, 9] * 9]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    exact = LLM(model=tiny_model, dtype="float32", max_num_batched_tokens=16).generate(prompts, params)
    quantized = LLM(model=tiny_model, dtype="float32", max_num_batched_tokens=16,
                    kv_cache_dtype=kv_cache_dtype).generate(prompts, params)
    for a, b in zip(exact, quantized):
        agree = next((i for i, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)) if x != y), 16)
        assert agree >= (16 if kv_cache_dtype == "int8" else 4)
        expected = torch.tensor([lp.logprob for lp in a.outputs[0].logprobs[:agree]])
        got = torch.tensor([lp.logprob for lp in b.outputs[0].logprobs[:agree]])
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_int8_greedy_output_does_not_depend_on_the_batch_or_preemption(tiny_model, mode):
    """Staggered arrivals, chunked prefill, prefix-cache hits and preemption (int8 blocks and their
    scales swapped out to host RAM and back) leave every request's greedy tokens as they are alone."""
    llm = LLM(model=tiny_model, dtype="float32", kv_cache_dtype="int8", num_kv_blocks=16,
              max_num_batched_tokens=48, preemption_mode=mode)
    prompts = make_prompts(llm.get_tokenizer(), 10)
    alone = [llm.generate([ids], GREEDY)[0].outputs[0].token_ids for ids in prompts]
    results = run_staggered(llm, prompts, GREEDY)
    assert [results[f"r{i}"].token_ids for i in range(len(prompts))] == alone
    scheduler = llm.engine.scheduler
    assert scheduler.num_preemptions > 0 and (scheduler.num_swapped_out > 0) == (mode == "swap")
    assert scheduler.prefix_cache_hits > 0 and llm.engine.block_manager.num_used_blocks == 0


def test_a_stream_slides_its_window_over_an_int8_cache(tiny_model):
    """Sink blocks are dequantized, rotated and requantized; the stream keeps flat memory and a short
    request beside it is unaffected."""
    llm = LLM(model=tiny_model, dtype="float32", max_model_len=64, block_size=4, sliding_window=16,
              kv_cache_dtype="int8")
    long_params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    short_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([list(range(10, 30)), [3, 4, 5]], [long_params, short_params])
    assert [len(o.outputs[0].token_ids) for o in outputs] == [160, 8]
    assert llm.engine.block_manager.num_used_blocks == 0
    assert llm.generate([[3, 4, 5]], short_params)[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


@pytest.mark.slow
def test_int8_kv_in_worker_processes_matches_one_worker(tiny_model):
    """Each pipeline stage's worker process sizes and quantizes its own layers' int8 cache alike."""
    prompts = [list(range(5, 30)), [7, 8, 9] * 5]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    engine = dict(model=tiny_model, dtype="float32", kv_cache_dtype="int8", kv_cache_memory="1MiB")
    one = LLM(**engine)
    split = LLM(**engine, pipeline_parallel_size=2, distributed_executor_backend="mp")
    try:
        per_layer_block = 16 * 2 * (64 + 4)  # 16 tokens of K and V for 1 KV head: 64 int8 + a float32 scale
        assert one.engine.block_manager.num_blocks == 2**20 // (2 * per_layer_block)
        assert split.engine.block_manager.num_blocks == 2**20 // per_layer_block  # a layer per worker
        expected = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
                    for o in one.generate(prompts, params)]
        for (tokens, logprobs), o in zip(expected, split.generate(prompts, params)):
            assert o.outputs[0].token_ids == tokens
            torch.testing.assert_close([lp.logprob for lp in o.outputs[0].logprobs], logprobs, atol=1e-4, rtol=0)
    finally:
        split.engine.shutdown()


@pytest.mark.slow
def test_int8_kv_greedy_tokens_mostly_agree_on_the_packaged_model(llm):
    """SmolLM2: greedy tokens of the int8 cache against the model-dtype cache (fp32 here)."""
    prompts = make_prompts(llm.get_tokenizer(), 8)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    int8 = LLM(dtype="float32", kv_cache_memory="256MiB", max_model_len=2048, kv_cache_dtype="int8")
    quantized = [o.outputs[0].token_ids for o in int8.generate(prompts, params)]
    agreeing = sum(a == b for ref, out in zip(reference, quantized) for a, b in zip(ref, out))
    assert agreeing >= 0.5 * 32 * len(prompts)
    # Before the first difference the two runs see the same context: the first token always agrees.
    assert all(ref[0] == out[0] for ref, out in zip(reference, quantized))
