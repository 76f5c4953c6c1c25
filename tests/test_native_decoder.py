"""The native decoder (all of a small step's layers in one C call) gives the bits of the layer-by-layer
path, and steps or models its kernels do not cover keep that path."""

from __future__ import annotations

import pytest

from hetserve import LLM, SamplingParams
from hetserve.model.native_decoder import NativeDecoder
from tests.tiny_models import make_hf_model

PROMPTS = ["The capital of France is", "Write a poem about the sea, the wind and the sky, in five lines",
           "1, 2, 3, 4,", "Hello", "A long time ago, in a village by the river, there lived an old baker who"]
# Input widths the byte kernels take (multiples of 64), and a head size with the kernels' vector paths.
SHAPE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)


def tiny_llm(path, **kwargs) -> LLM:
    # 16 tokens a step: prompts are chunked, and chunks share steps with decodes. No prefix cache: a
    # second run of the prompts makes the same steps as the first (a linear's rounding depends on how
    # many rows its step has: the kernels change paths at 3 and 7).
    return LLM(model=str(path), dtype="bfloat16", kv_cache_memory="16MiB", max_num_batched_tokens=16,
               enable_prefix_caching=False, **kwargs)


def native_decoder(llm: LLM) -> NativeDecoder | None:
    return llm.engine.executor.workers[0].model.native


def count_native_steps(decoder: NativeDecoder) -> list[int]:
    """A list that grows by one for each step the native decoder runs."""
    steps = []
    forward = decoder.forward

    def counted(*args):
        hidden = forward(*args)
        if hidden is not None:
            steps.append(1)
        return hidden

    decoder.forward = counted
    return steps


@pytest.mark.parametrize("arch, quantization", [("llama", None), ("qwen2", None), ("llama", "int4"),
                                                ("llama", "int8")])
def test_native_steps_give_the_bits_of_the_layer_by_layer_path(tmp_path, arch, quantization):
    llm = tiny_llm(make_hf_model(tmp_path, arch, **SHAPE), quantization=quantization)
    decoder = native_decoder(llm)
    if decoder is None:
        pytest.skip("this CPU lacks the AVX-512 bf16 / VNNI kernels (or HETSERVE_CPU_KERNELS=0)")
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=3, ignore_eos=True)
    steps = count_native_steps(decoder)
    native = llm.generate(PROMPTS, params)
    assert len(steps) >= 24
    llm.engine.executor.workers[0].model.native = None
    reference = llm.generate(PROMPTS, params)
    for a, b in zip(native, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [t.logprob for t in a.outputs[0].logprobs] == [t.logprob for t in b.outputs[0].logprobs]
        assert [t.top for t in a.outputs[0].logprobs] == [t.top for t in b.outputs[0].logprobs]


def test_steps_past_the_native_size_and_other_models_keep_the_layer_by_layer_path(tmp_path):
    path = make_hf_model(tmp_path, **SHAPE)
    llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory="16MiB",
              max_num_batched_tokens=2 * NativeDecoder.MAX_TOKENS)
    decoder = native_decoder(llm)
    if decoder is None:
        pytest.skip("this CPU lacks the AVX-512 bf16 kernels (or HETSERVE_CPU_KERNELS=0)")
    steps = count_native_steps(decoder)
    prompt = " ".join(["word"] * (NativeDecoder.MAX_TOKENS + 8))
    llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0))
    assert len(steps) == 2  # the prompt's step is too large; the two decode steps after it run natively
    for other in (dict(dtype="float32"), dict(dtype="bfloat16", kv_cache_dtype="fp8")):
        assert native_decoder(LLM(model=str(path), kv_cache_memory="16MiB", **other)) is None


def test_a_pipeline_stage_runs_its_own_layers_natively(tmp_path):
    path = make_hf_model(tmp_path, num_layers=4, **SHAPE)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    whole = tiny_llm(path)
    if native_decoder(whole) is None:
        pytest.skip("this CPU lacks the AVX-512 bf16 kernels (or HETSERVE_CPU_KERNELS=0)")
    staged = tiny_llm(path, pipeline_parallel_size=2, distributed_executor_backend="local")
    workers = staged.engine.executor.workers
    assert [w.model.native is not None for w in workers] == [True, True]
    assert [len(w.model.native.layers) for w in workers] == [2, 2]
    expected = [o.outputs[0].token_ids for o in whole.generate(PROMPTS, params)]
    assert [o.outputs[0].token_ids for o in staged.generate(PROMPTS, params)] == expected
