"""What the engine hands back per request, as vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass

from hetserve.core.outputs import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    """Text so far. While a stop string might still complete, its possible start is held back."""
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    """"stop" (EOS, stop token or stop string), "length", "abort", or None while running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the output, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """One entry per prompt token; the first is None (nothing predicts it)."""
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    finished: bool = False
