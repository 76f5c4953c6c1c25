"""Offline API: `LLM(model=...).generate(prompts, params)`, as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hetserve.config import EngineConfig
from hetserve.engine.llm_engine import LLMEngine
from hetserve.engine.outputs import RequestOutput
from hetserve.model.tokenizer import Tokenizer
from hetserve.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict]


class LLM:
    """Generate text for a batch of prompts with continuous batching.

    Keyword arguments are engine settings (see hetserve.config), e.g. `dtype="float32"`,
    `max_num_seqs=16`, `kv_cache_memory="1GiB"`."""

    def __init__(self, model: str | None = None, **engine_kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A prompt is text or a list of token ids. `priority`
        (one per prompt) orders them under the priority scheduling policy."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts))
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} values for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, p, rank in zip(prompts, params, priorities):
                request_id = str(next(self._ids))
                if isinstance(prompt, str):
                    self.engine.add_request(request_id, prompt, p, priority=rank)
                else:
                    self.engine.add_request(request_id, None, p, prompt_token_ids=list(prompt), priority=rank)
                request_ids.append(request_id)
        except Exception:
            # All or nothing: a bad prompt leaves none of the batch queued.
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None
             ) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params)

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[int]:
        """Token ids of a conversation; the template already holds any special tokens."""
        if not messages:
            raise ValueError("messages must not be empty")
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt, chat_template or self.engine.chat_template)
        return tokenizer.encode(text, add_special_tokens=False)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        while pending:
            if not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine stopped with requests pending: {sorted(pending)}")
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    finished[output.request_id] = output
                    pending.discard(output.request_id)
        return [finished[request_id] for request_id in request_ids]


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int
                ) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return list(params)
