"""Sampling parameters through the whole engine on the real model."""

from __future__ import annotations

import math

import pytest
import torch

from hetserve import SamplingParams
from hetserve.model.sampler import Sampler, SamplingState, inverse_cdf_sample, make_generator

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a robot who"


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_same_seed_same_output_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    alone = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24)
    batch = llm.generate(["Hello there", PROMPT, "The weather is"], [others, seeded, others])
    assert batch[1].outputs[0].token_ids == alone
    different = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=24))
    assert different[0].outputs[0].token_ids != alone


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16))
    top1 = llm.generate([PROMPT], SamplingParams(temperature=0.8, top_k=1, max_tokens=16))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_n_samples_differ_and_are_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16)
    first = llm.generate([PROMPT], params)[0]
    again = llm.generate([PROMPT], params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert texts([first]) == texts([again])
    assert len(set(texts([first]))) > 1


def test_stop_string_across_token_boundaries(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate([PROMPT], greedy)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    pieces = [tokenizer.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    # A stop string that starts inside one token and ends inside a later one.
    start = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    boundary = len(pieces[start - 1])
    stop = full.text[boundary - 1: boundary + 2]
    assert stop and stop not in full.text[: boundary - 1]
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert stopped.text == full.text[: boundary - 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    kept = SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True,
                          include_stop_str_in_output=True)
    assert llm.generate([PROMPT], kept)[0].outputs[0].text == full.text[: boundary + 2]


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    tokens = greedy.outputs[0].token_ids
    at = tokens[5]
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[at],
                                                      ignore_eos=True))[0]
    assert stopped.outputs[0].token_ids == tokens[: tokens.index(at) + 1]
    assert stopped.outputs[0].stop_reason == at
    length = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=7))[0].outputs[0]
    assert len(length.token_ids) == 7 and length.finish_reason == "length"
    eos = llm.engine.spec.eos_token_ids[0]
    forced = SamplingParams(temperature=0, max_tokens=12, min_tokens=10, stop_token_ids=[at])
    assert at not in llm.generate([PROMPT], forced)[0].outputs[0].token_ids[:10]
    short = llm.generate(["<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"],
                         SamplingParams(temperature=0, max_tokens=64, min_tokens=40))[0].outputs[0]
    assert eos not in short.token_ids[:40] and len(short.token_ids) >= 40


def test_logprobs_are_normalised_and_match_the_logits(llm, hf_smollm):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5)
    output = llm.generate([PROMPT], params)[0]
    completion = output.outputs[0]
    ids = output.prompt_token_ids + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm(torch.tensor([ids])).logits[0].float(), dim=-1)
    for step, entry in enumerate(completion.logprobs):
        position = len(output.prompt_token_ids) - 1 + step
        assert entry.token_id == completion.token_ids[step]
        assert entry.rank == 1  # greedy picks the most likely token
        assert len(entry.top) == 5
        assert sum(math.exp(lp) for _, lp in entry.top) <= 1.0 + 1e-6
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert abs(entry.logprob - ref[position, entry.token_id].item()) < 1e-3


def test_penalties_change_repetition(llm):
    prompt = "List the numbers: one one one one one one one one"
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    penalised = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      repetition_penalty=1.5, frequency_penalty=1.0))[0]
    def repeats(token_ids):
        return len(token_ids) - len(set(token_ids))
    assert repeats(penalised.outputs[0].token_ids) < repeats(plain.outputs[0].token_ids)


def test_top_p_and_min_p_restrict_choices(llm):
    narrow = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    assert llm.generate([PROMPT], narrow)[0].outputs[0].token_ids == \
        llm.generate([PROMPT], greedy)[0].outputs[0].token_ids
    strict_min_p = SamplingParams(temperature=1.0, min_p=1.0, max_tokens=12, seed=3)
    assert llm.generate([PROMPT], strict_min_p)[0].outputs[0].token_ids == \
        llm.generate([PROMPT], greedy)[0].outputs[0].token_ids


def test_inverse_cdf_sampling_draws_from_the_distribution():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1) * 7.0  # unnormalized is fine
    tokens = inverse_cdf_sample(probs, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert counts[[0, 2, 5]].sum() == 0  # zero mass is never drawn, not even at the ends
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
    edges = inverse_cdf_sample(probs[:3], torch.tensor([0.0, 0.4999, 0.999999]))
    assert edges.tolist() == [1, 1, 4]


def test_seeded_rows_sample_the_same_alone_and_in_a_batch():
    sampler = Sampler((0,), torch.Generator().manual_seed(1))
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)

    def state(seed: int | None) -> SamplingState:
        return SamplingState(SamplingParams(temperature=1.0, seed=seed), [1], make_generator(seed, torch.device("cpu")))

    alone, _ = sampler(logits[1:2], [state(params.seed)])
    batched, _ = sampler(logits, [state(None), state(params.seed), state(None)])
    assert batched[1] == alone[0]
