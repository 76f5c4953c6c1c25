"""The step loop: schedule, execute on the workers, turn sampled tokens into text and stops."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from hetserve.config import CacheConfig, EngineConfig
from hetserve.core import BlockManager, Request, RequestStatus, Scheduler, SchedulerOutput
from hetserve.core.outputs import ModelRunnerOutput, TokenLogprobs
from hetserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from hetserve.model.loader import load_spec, load_tokenizer, resolve_model_path
from hetserve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from hetserve.sampling_params import SamplingParams
from hetserve.worker.executor import make_executor

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One of a request's n samples: a scheduler Request plus its text."""

    request: Request
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer
    max_tokens: int
    num_checked_chars: int = 0


@dataclass(eq=False)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_unfinished: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_path = resolve_model_path(config.model.model)
        self.spec = load_spec(model_path)
        self.tokenizer: Tokenizer = load_tokenizer(model_path)
        self.chat_template = _read_chat_template(config.model.chat_template)
        self.max_model_len = self._resolve_max_model_len()
        self.executor = make_executor(config, self.spec, model_path)
        block_size = config.cache.block_size
        num_blocks = config.cache.num_kv_blocks or self.executor.num_kv_blocks(config)
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for a single KV block")
        num_host_blocks = (self.executor.num_host_kv_blocks(config)
                           if config.scheduler.preemption_mode != "recompute" else 0)
        self.executor.init_kv_cache(num_blocks, block_size, num_host_blocks)
        self.block_manager = _block_manager(config.cache, num_blocks)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.executor.max_batches_in_flight,
                                   num_host_blocks)
        self._parents: dict[str, _Parent] = {}
        self._sequences: dict[str, tuple[_Parent, _Sequence]] = {}
        self._in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        capacity = num_blocks * block_size
        logger.info(
            "model %s (%s, %d layers) on %s in %s; KV cache: %d blocks x %d tokens = %d tokens, swap space "
            "%d blocks; max concurrency at max_model_len %d: %.1f requests (max_num_seqs %d)",
            model_path.name, self.spec.architecture, self.spec.num_layers, self.executor.device,
            self.executor.dtype, num_blocks, block_size, capacity, num_host_blocks, self.max_model_len,
            capacity / self.max_model_len, config.scheduler.max_num_seqs)

    def _resolve_max_model_len(self) -> int:
        requested = self.config.model.max_model_len
        if requested is None:
            return self.spec.max_position
        if requested > self.spec.max_position:
            raise ValueError(f"max_model_len {requested} exceeds the model's context length "
                             f"{self.spec.max_position}")
        return requested

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None = None,
                    params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Queue a request. Invalid input raises ValueError before anything is allocated.
        `priority` orders requests under the priority policy (smaller first)."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string or a list of token ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        max_tokens = self.validate_request(prompt_token_ids, params)
        metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        sequences = [
            self._new_sequence(request_id if params.n == 1 else f"{request_id}#{i}", i,
                               prompt_token_ids, params.for_child(i) if params.n > 1 else params,
                               max_tokens, metrics.arrival_time, priority)
            for i in range(params.n)
        ]
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params, sequences, metrics)
        self._parents[request_id] = parent
        for seq in sequences:
            self._sequences[seq.request.request_id] = (parent, seq)
            self.scheduler.add_request(seq.request)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks a prompt against the model and the cache; returns the effective max_tokens.

        Reads only state fixed at start-up, so any thread may call it."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("prompt must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of vocabulary range [0, {self.spec.vocab_size}): {bad[:5]}")
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids out of vocabulary range [0, {self.spec.vocab_size}): {bad_stops[:5]}")
        window = self.block_manager.sliding_window
        if window is None:
            max_tokens = self._check_context_length(num_prompt, params.max_tokens)
            blocks = self.block_manager.blocks_needed(num_prompt + max_tokens)
        else:
            # A stream may run past the context: its KV holds the sinks (and their rotated copies) and at
            # most a window plus a chunk of up to a window.
            max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
            blocks = min(self.block_manager.blocks_needed(num_prompt + max_tokens),
                         2 * self.block_manager.num_sink_blocks + self.block_manager.blocks_needed(2 * window) + 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"prompt + max_tokens ({num_prompt + max_tokens} tokens) needs {blocks} KV "
                             f"blocks but the cache holds {self.block_manager.num_blocks}; raise "
                             f"kv_cache_memory or lower max_tokens")
        return max_tokens

    def _check_context_length(self, num_prompt: int, max_tokens: int | None) -> int:
        if num_prompt >= self.max_model_len:
            raise ValueError(f"prompt has {num_prompt} tokens, but the model's maximum context length "
                             f"is {self.max_model_len} tokens")
        max_tokens = max_tokens if max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                             f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                             f"{max_tokens} for max_tokens). Please reduce the prompt or max_tokens.")
        return max_tokens

    def _new_sequence(self, seq_id: str, index: int, prompt_token_ids: list[int],
                      params: SamplingParams, max_tokens: int, arrival_time: float, priority: int) -> _Sequence:
        request = Request(seq_id, list(prompt_token_ids), params, arrival_time=arrival_time, priority=priority)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_token_ids)
        logprobs = [] if params.logprobs is not None else None
        output = CompletionOutput(index, "", request.output_token_ids, logprobs)
        return _Sequence(request, output, detokenizer, max_tokens)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        ids = [seq.request.request_id for seq in parent.sequences]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for seq_id in ids:
            self._sequences.pop(seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or bool(self._in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Submit steps until the executor has as many in flight as it can overlap (one per
        pipeline stage), then take the results of the oldest."""
        while len(self._in_flight) < self.executor.max_batches_in_flight:
            scheduler_output = self.scheduler.schedule()
            if not scheduler_output.scheduled:
                break
            self.executor.submit(scheduler_output)
            self._in_flight.append((scheduler_output, time.monotonic()))
        if not self._in_flight:
            return []
        scheduler_output, submitted = self._in_flight.popleft()
        runner_output = self.executor.collect()
        self._observe_costs(scheduler_output, runner_output, time.monotonic() - submitted)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output.sampled_token_ids)
        self._record_scheduled(scheduler_output, runner_output, submitted)
        touched: dict[str, _Parent] = {}
        for request in updated:
            parent, seq = self._sequences[request.request_id]
            self._on_token(parent, seq, runner_output.logprobs.get(request.request_id))
            touched[parent.request_id] = parent
        return [self._output(parent) for parent in touched.values()]

    def _observe_costs(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                       seconds: float) -> None:
        costs = self.scheduler.preemption_costs
        costs.observe_step(seconds - runner_output.swap_seconds, scheduler_output.num_tokens)
        costs.observe_swap(runner_output.swap_seconds, len(scheduler_output.blocks_to_swap_out)
                           + len(scheduler_output.blocks_to_swap_in))

    def shutdown(self) -> None:
        """Stop the workers (and their processes)."""
        self.executor.shutdown()

    def _record_scheduled(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                          now: float) -> None:
        for scheduled in scheduler_output.scheduled:
            if scheduled.request_id not in self._sequences:
                continue  # aborted while its step was in flight
            parent, _ = self._sequences[scheduled.request_id]
            if parent.metrics.first_scheduled_time is None:
                parent.metrics.first_scheduled_time = now
            entries = runner_output.prompt_logprobs.get(scheduled.request_id)
            if entries is None or parent.sequences[0].request.request_id != scheduled.request_id:
                continue
            if parent.prompt_logprobs is None:
                parent.prompt_logprobs = [None]
            # A preempted request recomputes its prompt: keep only what is still missing.
            missing = len(parent.prompt_token_ids) - len(parent.prompt_logprobs)
            parent.prompt_logprobs.extend(entries[:missing])

    def _on_token(self, parent: _Parent, seq: _Sequence, logprobs: TokenLogprobs | None) -> None:
        now = time.monotonic()
        if parent.metrics.first_token_time is None:
            parent.metrics.first_token_time = now
        parent.metrics.last_token_time = now
        if seq.output.logprobs is not None and logprobs is not None:
            seq.output.logprobs.append(logprobs)
        token = seq.request.output_token_ids[-1]
        finish, reason = self._check_stop_token(seq, token)
        if finish is None:
            seq.detokenizer.add(token)
            finish, reason = self._check_stop_string(seq)
        past_context = self.block_manager.sliding_window is None and seq.request.num_tokens >= self.max_model_len
        if finish is None and (len(seq.request.output_token_ids) >= seq.max_tokens or past_context):
            finish = RequestStatus.FINISHED_LENGTH
        if finish is not None:
            self._finish(parent, seq, finish, reason)

    def _check_stop_token(self, seq: _Sequence, token: int):
        params = seq.request.sampling_params
        if token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
        if not params.ignore_eos and token in self.spec.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        return None, None

    def _check_stop_string(self, seq: _Sequence):
        params = seq.request.sampling_params
        text = seq.detokenizer.text
        if not params.stop:
            seq.output.text = text
            return None, None
        longest = max(len(s) for s in params.stop)
        start = max(0, seq.num_checked_chars - longest + 1)
        found = [(text.find(s, start), s) for s in params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, stop = min(found)
            seq.output.text = text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
            return RequestStatus.FINISHED_STOPPED, stop
        seq.num_checked_chars = len(text)
        # Hold back a tail that could still be the start of a stop string.
        seq.output.text = text[: max(len(seq.output.text), len(text) - longest + 1)]
        return None, None

    def _finish(self, parent: _Parent, seq: _Sequence, status: RequestStatus, reason) -> None:
        if status != RequestStatus.FINISHED_STOPPED or not isinstance(reason, str):
            seq.detokenizer.flush()
            seq.output.text = seq.detokenizer.text
        seq.output.finish_reason = status.value
        seq.output.stop_reason = reason
        self.scheduler.finish_requests([seq.request.request_id], status)
        parent.num_unfinished -= 1
        if parent.num_unfinished == 0:
            parent.metrics.finished_time = time.monotonic()
            del self._parents[parent.request_id]
            for s in parent.sequences:
                self._sequences.pop(s.request.request_id, None)

    def _output(self, parent: _Parent) -> RequestOutput:
        outputs = [
            CompletionOutput(s.output.index, s.output.text, list(s.request.output_token_ids),
                             None if s.output.logprobs is None else list(s.output.logprobs),
                             s.output.finish_reason, s.output.stop_reason)
            for s in parent.sequences
        ]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.sequences[0].request.num_cached_tokens,
            metrics=parent.metrics,
            finished=parent.num_unfinished == 0,
        )


def _block_manager(cache: CacheConfig, num_blocks: int) -> BlockManager:
    if cache.sliding_window is None:
        return BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
    if cache.enable_prefix_caching:
        logger.info("sliding window of %d tokens: prefix caching is off", cache.sliding_window)
    return BlockManager(num_blocks, cache.block_size, False, cache.sliding_window,
                        -(-cache.attention_sinks // cache.block_size))


def _read_chat_template(template: str | None) -> str | None:
    """A chat template given as a file path or as the template text itself."""
    if template is None:
        return None
    path = Path(template)
    if len(template) < 4096 and "{" not in template and path.is_file():
        return path.read_text()
    return template
