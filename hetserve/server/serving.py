"""OpenAI completions and chat completions on top of the AsyncEngine: requests in, response
bodies or server-sent-event chunks out."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hetserve.core.outputs import TokenLogprobs
from hetserve.engine.async_engine import AsyncEngine, RequestStream
from hetserve.engine.outputs import CompletionOutput, RequestOutput
from hetserve.model.tokenizer import Tokenizer
from hetserve.server.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedFieldError
from hetserve.sampling_params import SamplingParams


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class _Choice:
    """How much of one choice has been streamed so far."""

    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False


@dataclass
class _Job:
    """One prompt of a request: its engine stream and where its choices go in the response."""

    stream: RequestStream
    prompt_ids: list[int]
    prompt_text: str
    first_index: int
    choices: list[_Choice] = field(default_factory=list)
    last: RequestOutput | None = None


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, chat_template: str | None):
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.tokenizer: Tokenizer = engine.engine.tokenizer

    # -- entry points --------------------------------------------------------------------------

    def start_completion(self, request: CompletionRequest) -> _Response:
        if request.echo and request.logprobs is not None:
            raise UnsupportedFieldError("echo", "together with logprobs is not supported")
        params = request.sampling_params(request.max_tokens, request.logprobs)
        prompts = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError("prompt must not be empty")
                prompts.append((self.tokenizer.encode(prompt), prompt))
            else:
                prompts.append((list(prompt), self.tokenizer.decode(prompt, skip_special_tokens=False)))
        return self._start("cmpl", "text_completion", request, params, prompts, chat=False)

    def start_chat(self, request: ChatCompletionRequest) -> _Response:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(request.requested_max_tokens, logprobs)
        text = self.tokenizer.apply_chat_template(
            request.conversation(), request.add_generation_prompt, self.chat_template)
        prompt_ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._start("chatcmpl", "chat.completion", request, params, [(prompt_ids, text)], chat=True)

    def _start(self, prefix: str, kind: str, request, params: SamplingParams,
               prompts: list[tuple[list[int], str]], chat: bool) -> _Response:
        for prompt_ids, _ in prompts:
            self.engine.engine.validate_request(prompt_ids, params)
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        jobs: list[_Job] = []
        try:
            for i, (prompt_ids, text) in enumerate(prompts):
                stream = self.engine.add_request(f"{response_id}-{i}", prompt_ids, params, text,
                                                 request.priority)
                jobs.append(_Job(stream, prompt_ids, text, i * params.n,
                                 [_Choice() for _ in range(params.n)]))
        except BaseException:
            for job in jobs:
                job.stream.abort()
            raise
        return _Response(self, response_id, kind, request, jobs, chat)


class _Response:
    """A started request: either awaited whole (`body`) or streamed (`events`)."""

    def __init__(self, serving: OpenAIServing, response_id: str, kind: str, request, jobs: list[_Job],
                 chat: bool):
        self.serving = serving
        self.tokenizer = serving.tokenizer
        self.id = response_id
        self.kind = kind
        self.request = request
        self.jobs = jobs
        self.chat = chat
        self.created = int(time.time())

    def abort(self) -> None:
        for job in self.jobs:
            job.stream.abort()

    # -- whole response ------------------------------------------------------------------------

    async def body(self) -> dict:
        try:
            await asyncio.gather(*(self._drain(job) for job in self.jobs))
        finally:
            self.abort()
        choices = [self._final_choice(job, completion) for job in self.jobs for completion in job.last.outputs]
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.serving.model_name, "choices": choices, "usage": self._usage()}

    async def _drain(self, job: _Job) -> None:
        async for output in job.stream:
            job.last = output

    def _final_choice(self, job: _Job, completion: CompletionOutput) -> dict:
        index = job.first_index + completion.index
        finish_reason = _finish_reason(completion)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": completion.text,
                                                "refusal": None},
                    "logprobs": self._chat_logprobs(completion.logprobs), "finish_reason": finish_reason}
        text = (job.prompt_text if self.request.echo else "") + completion.text
        return {"index": index, "text": text, "logprobs": self._completion_logprobs(completion.logprobs, 0),
                "finish_reason": finish_reason}

    def _usage(self) -> dict:
        prompt = sum(len(job.prompt_ids) for job in self.jobs)
        generated = sum(len(c.token_ids) for job in self.jobs if job.last for c in job.last.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    # -- streaming -----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[str]:
        """SSE lines: chunks as tokens arrive, the usage chunk if asked, then [DONE]."""
        merged: asyncio.Queue[tuple[_Job, RequestOutput | BaseException | None]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._forward(job, merged)) for job in self.jobs]
        try:
            if self.chat:
                for job in self.jobs:
                    for i in range(len(job.choices)):
                        yield sse(self._chunk(job.first_index + i, {"role": "assistant", "content": ""}, None))
            remaining = len(self.jobs)
            while remaining:
                job, item = await merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    yield sse({"error": {"message": str(item), "type": "server_error", "param": None,
                                         "code": 500}})
                    remaining = 0
                else:
                    job.last = item
                    for chunk in self._delta_chunks(job, item):
                        yield sse(chunk)
            if self.request.include_usage:
                yield sse({"id": self.id, "object": self._chunk_kind, "created": self.created,
                           "model": self.serving.model_name, "choices": [], "usage": self._usage()})
            yield sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()
            self.abort()

    @staticmethod
    async def _forward(job: _Job, merged: asyncio.Queue) -> None:
        try:
            async for output in job.stream:
                merged.put_nowait((job, output))
            merged.put_nowait((job, None))
        except Exception as error:  # noqa: BLE001 - reported to the client in the stream
            merged.put_nowait((job, error))

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, delta_or_text, finish_reason: str | None, logprobs=None) -> dict:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = delta_or_text
        else:
            choice["text"] = delta_or_text
        return {"id": self.id, "object": self._chunk_kind, "created": self.created,
                "model": self.serving.model_name, "choices": [choice]}

    def _delta_chunks(self, job: _Job, output: RequestOutput) -> list[dict]:
        chunks = []
        for completion in output.outputs:
            state = job.choices[completion.index]
            if state.finished:
                continue
            text = completion.text[state.text_sent:]
            new_logprobs = (completion.logprobs or [])[state.tokens_sent:]
            finish_reason = _finish_reason(completion) if completion.finished else None
            if not text and not new_logprobs and finish_reason is None:
                continue
            if not self.chat and self.request.echo and state.text_sent == 0 and state.tokens_sent == 0:
                text = job.prompt_text + text
            logprobs = None
            if completion.logprobs is not None:
                logprobs = (self._chat_logprobs(new_logprobs) if self.chat
                            else self._completion_logprobs(new_logprobs, state.text_sent))
            delta = {"content": text} if self.chat else text
            chunks.append(self._chunk(job.first_index + completion.index, delta, finish_reason, logprobs))
            state.text_sent = len(completion.text)
            state.tokens_sent = len(completion.token_ids)
            state.finished = completion.finished
        return chunks

    # -- logprobs formats ----------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def _completion_logprobs(self, entries: list[TokenLogprobs] | None, offset: int) -> dict | None:
        if entries is None:
            return None
        tokens = [self._token_text(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, entries: list[TokenLogprobs] | None) -> dict | None:
        if entries is None:
            return None
        def item(token_id: int, logprob: float) -> dict:
            return {"token": self._token_text(token_id), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token_id))}
        content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                   for e in entries]
        return {"content": content, "refusal": None}


def _finish_reason(completion: CompletionOutput) -> str | None:
    # An aborted request never reaches a client; anything but "length" ended on a stop condition.
    if completion.finish_reason is None:
        return None
    return "length" if completion.finish_reason == "length" else "stop"
