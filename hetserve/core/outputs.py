"""Hand-offs between scheduler and workers: small dataclasses of ids and lists, no tensors,
so the same message goes to a local worker, another process or a Ray actor."""

from __future__ import annotations

from dataclasses import dataclass, field

from hetserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent the first time a request is scheduled; workers keep it until it finishes."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]
    """Tokens whose KV is computed this step (a prompt chunk, or one decode token)."""
    start_pos: int
    """Position of token_ids[0]; the cache already holds KV for positions [0, start_pos)."""
    block_ids: list[int]
    """The request's block table, covering start_pos + len(token_ids) tokens."""
    sample: bool
    """True when this chunk reaches the last known token, so a next token is sampled."""
    cache_offset: int = 0
    """Sliding window: tokens dropped before the window, so position p sits at p - cache_offset in the
    block table. Positions (RoPE) stay p."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    num_preempted: int = 0
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    """(device block, host block) pairs to copy before this step runs, before the swap-ins."""
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    """(host block, device block) pairs to copy before this step runs."""
    sink_rewrites: list[tuple[int, int, int]] = field(default_factory=list)
    """Sliding window: (original, copy, offset): rewrite the copy of an attention-sink block from the
    original with its keys rotated forward by offset positions, first of all."""

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.scheduled)


@dataclass
class TokenLogprobs:
    """Log-probability of one chosen token and the top alternatives at its position."""

    token_id: int
    logprob: float
    rank: int
    """1 + the number of tokens more likely than the chosen one."""
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    swap_seconds: float = 0.0
    """Time this worker spent copying swapped blocks for the step."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request, for the prompt tokens after the first that this step's chunk predicts."""
