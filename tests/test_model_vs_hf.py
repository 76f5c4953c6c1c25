"""Our logits and greedy outputs against transformers loading the same weights."""

from __future__ import annotations

import pytest
import torch

from hetserve import LLM, SamplingParams
from tests.tiny_models import make_hf_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4, 5,",
]


def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def engine_prompt_logprobs(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of each prompt token after the first, through the engine's own path
    (chunked prefill included), as [len - 1] tensor."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    output = llm.generate([token_ids], params)[0]
    return torch.tensor([entry.logprob for entry in output.prompt_logprobs[1:]])


def test_smollm_logits_match_transformers(llm, hf_smollm):
    tokenizer = llm.get_tokenizer()
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ref = hf_logprobs(hf_smollm, ids)
        ours = engine_prompt_logprobs(llm, ids)
        expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(ours, expected, atol=1e-3), (prompt, (ours - expected).abs().max())


def test_smollm_full_logits_match_transformers(llm, hf_smollm):
    """Every vocabulary entry, not only the chosen tokens: compare the top-20 logprobs."""
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    ref = hf_logprobs(hf_smollm, ids)
    params = SamplingParams(max_tokens=1, prompt_logprobs=20, logprobs=20, temperature=0)
    output = llm.generate([ids], params)[0]
    for position, entry in enumerate(output.prompt_logprobs[1:]):
        for token_id, logprob in entry.top:
            assert abs(logprob - ref[position, token_id].item()) < 1e-3
    last = output.outputs[0].logprobs[0]
    for token_id, logprob in last.top:
        assert abs(logprob - ref[-1, token_id].item()) < 1e-3


def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(token_ids):].tolist()


def test_smollm_greedy_matches_transformers_generate(llm, hf_smollm):
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    prompts.append(llm.render_chat([{"role": "user", "content": "What is the tallest mountain?"}]))
    params = SamplingParams(max_tokens=32, temperature=0)
    outputs = llm.generate(prompts, params)
    for ids, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_smollm, ids, 32)


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"tie_word_embeddings": True}),
    ("mistral", {}),
    ("qwen2", {}),
])
def test_tiny_random_models_match_transformers(tmp_path, arch, kwargs):
    from transformers import AutoModelForCausalLM

    model_dir = make_hf_model(tmp_path / arch, arch, **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=16)
    ids = list(range(100, 140))
    ref = hf_logprobs(hf, ids)
    ours = engine_prompt_logprobs(llm, ids)
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(ours, expected, atol=1e-3), (ours - expected).abs().max()
    params = SamplingParams(max_tokens=24, temperature=0)
    assert llm.generate([ids], params)[0].outputs[0].token_ids == hf_greedy(hf, ids, 24)
