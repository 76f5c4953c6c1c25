"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeded generators, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hetserve.core.outputs import TokenLogprobs
from hetserve.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """What the sampler keeps per request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], global_generator: torch.Generator):
        self.eos_token_ids = list(eos_token_ids)
        self.global_generator = global_generator

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]
                 ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [B, vocab] fp32, one row per request -> sampled ids and, where asked, logprobs."""
        # vLLM returns log-probabilities of the raw model output, before any processing.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(
            s.params.logprobs is not None for s in states) else None
        logits = self._apply_penalties(logits, states)
        tokens = self._sample(logits, states)
        if raw_logprobs is None:
            return tokens, [None] * len(states)
        counts = [s.params.logprobs for s in states]
        return tokens, token_logprobs(raw_logprobs, tokens, counts)

    def _apply_penalties(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        if not any(_needs_processing(s) for s in states):
            return logits
        logits = logits.clone()
        for row, state in enumerate(states):
            p = state.params
            if len(state.output_token_ids) < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                logits[row, banned] = -float("inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(state.prompt_token_ids + state.output_token_ids, device=logits.device)
                values = logits[row, seen]
                logits[row, seen] = torch.where(
                    values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and state.output_token_ids:
                out = torch.tensor(state.output_token_ids, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = _filtered_probs(logits[rows], [states[i].params for i in random_rows])
            uniform = self._uniforms(len(random_rows), [states[i].generator for i in random_rows], probs.device)
            tokens[rows] = inverse_cdf_sample(probs, uniform)
        return tokens.tolist()

    def _uniforms(self, count: int, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
        """One draw in [0, 1) per row: from the row's own generator when it has a seed, so a seeded
        request samples the same whatever else is in the batch."""
        uniform = torch.rand(count, generator=self.global_generator, device=device)
        for row, generator in enumerate(generators):
            if generator is not None:
                uniform[row] = torch.rand(1, generator=generator, device=device)[0]
        return uniform


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of [B, vocab] (unnormalized) probabilities: the first whose cumulative mass
    exceeds uniform * total. One random number per row and one cumulative sum, where an exponential
    race would draw (and take the logarithm of) a random number per vocabulary entry: that was a
    sixth of a served decode step."""
    cdf = probs.cumsum(dim=-1)
    targets = (uniform * cdf[:, -1]).unsqueeze(1)
    # Strictly greater: a token of zero mass shares its predecessor's cumulative value and is skipped.
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _needs_processing(state: SamplingState) -> bool:
    p = state.params
    return (len(state.output_token_ids) < p.min_tokens or p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_k < vocab).any() or (top_p < 1.0).any():
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if (min_p > 0).any():
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], -float("inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest head whose mass reaches top_p: drop a token when the mass before it does.
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.full_like(logits, -float("inf")).scatter(1, order, sorted_logits)


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], counts: list[int | None]
                   ) -> list[TokenLogprobs | None]:
    """Chosen token's logprob and rank plus the top `count` alternatives, per row of [B, vocab]."""
    chosen_ids = torch.tensor(token_ids, device=logprobs.device)
    chosen = logprobs.gather(1, chosen_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    k = max((c for c in counts if c is not None), default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    results: list[TokenLogprobs | None] = []
    for row, count in enumerate(counts):
        if count is None:
            results.append(None)
            continue
        top = list(zip(top_ids[row, :count].tolist(), top_values[row, :count].tolist())) if count else []
        results.append(TokenLogprobs(token_ids[row], chosen[row, 0].item(), int(ranks[row]), top))
    return results
