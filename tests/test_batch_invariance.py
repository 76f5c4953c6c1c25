"""A request's greedy output must not depend on what else is in the batch."""

from __future__ import annotations

import random

import pytest

from hetserve import LLM, SamplingParams
from hetserve.engine.outputs import CompletionOutput

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
SHARED_PREFIX = ("You are a careful assistant. Answer briefly and truthfully, and never invent facts. "
                 "The user asks about geography, history and science. ")


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """Mixed lengths; half share a long prefix so the prefix cache hits."""
    rng = random.Random(0)
    words = "river mountain ocean city forest desert planet history king river bridge".split()
    prompts = []
    for i in range(count):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))
        text = (SHARED_PREFIX if i % 2 else "") + f"Question {i}: tell me about {body}."
        prompts.append(tokenizer.encode(text))
    return prompts


def run_staggered(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY
                  ) -> dict[str, CompletionOutput]:
    """Requests arrive at different steps: a new one every other step."""
    engine, pending, results = llm.engine, list(enumerate(prompts)), {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, ids = pending.pop(0)
            engine.add_request(f"r{i}", None, params, prompt_token_ids=ids)
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0]
        step += 1
    return results


@pytest.fixture(scope="module")
def prompts_and_reference(llm):
    prompts = make_prompts(llm.get_tokenizer(), 16)
    alone = [llm.generate([ids], GREEDY)[0].outputs[0].token_ids for ids in prompts]
    return prompts, alone


def test_same_output_in_a_staggered_batch_with_chunked_prefill(prompts_and_reference):
    prompts, alone = prompts_and_reference
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", max_num_batched_tokens=48, max_num_seqs=16)
    results = run_staggered(llm, prompts)
    assert [results[f"r{i}"].token_ids for i in range(len(prompts))] == alone
    assert llm.engine.scheduler.prefix_cache_hits > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_same_output_under_preemption(prompts_and_reference, mode):
    prompts, alone = prompts_and_reference
    block_bytes = 16 * 2 * 30 * 3 * 64 * 4  # block_size * K,V * layers * kv_heads * head_dim * fp32
    llm = LLM(dtype="float32", kv_cache_memory=40 * block_bytes, max_num_batched_tokens=64, preemption_mode=mode)
    assert llm.engine.block_manager.num_blocks == 40
    results = run_staggered(llm, prompts)
    assert [results[f"r{i}"].token_ids for i in range(len(prompts))] == alone
    scheduler = llm.engine.scheduler
    assert scheduler.num_preemptions > 0 and (scheduler.num_swapped_out > 0) == (mode == "swap")
    assert llm.engine.block_manager.num_used_blocks == 0
    assert scheduler.host_pool.num_free == scheduler.host_pool.num_blocks


def test_same_output_in_one_big_batch(llm, prompts_and_reference):
    prompts, alone = prompts_and_reference
    outputs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == alone


def test_same_output_when_mlfq_preempts_long_requests_for_new_ones(prompts_and_reference):
    prompts, alone = prompts_and_reference
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", max_num_seqs=4, scheduling_policy="mlfq",
              mlfq_quantum=4)
    results = run_staggered(llm, prompts)
    assert [results[f"r{i}"].token_ids for i in range(len(prompts))] == alone
    assert llm.engine.scheduler.num_ranked_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks == 0
