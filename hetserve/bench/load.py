"""Load generation: when each request is sent, and an async client that streams one request over
server-sent events and records when each piece of output arrived."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from hetserve.bench import option
from hetserve.bench.workloads import Request

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class LoadConfig:
    base_url: str = option("Address of the OpenAI-compatible server.", "http://127.0.0.1:8000")
    endpoint: str = option("API to benchmark: /v1/completions or /v1/chat/completions (the prompt is "
                           "one user message).", "/v1/completions")
    model: str | None = option("Model name sent with each request; default: the first of GET /v1/models.", None)
    request_rate: str = option(
        "Requests per second, or a comma-separated sweep (1,2,4,inf: one run per rate); inf sends all "
        "requests at once.", "inf")
    burstiness: float = option(
        "Shape of the gamma-distributed gaps between arrivals (vLLM's definition): 1 is a Poisson "
        "process, below 1 burstier, above 1 more even.", 1.0)
    max_concurrency: int | None = option("Most requests in flight at once; default: no limit.", None)
    ignore_eos: bool = option("Ask the server to ignore EOS (vLLM's extension), so output lengths are exact.",
                              False)
    api_key: str | None = option("Bearer token; default: $OPENAI_API_KEY when set.", None)
    request_timeout: float = option("Seconds after which one request is abandoned and counted as failed.",
                                    3600.0)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        parse_rates(self.request_rate)

    @property
    def rates(self) -> list[float]:
        return parse_rates(self.request_rate)

    @property
    def headers(self) -> dict[str, str]:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}


def parse_rates(text: str) -> list[float]:
    """Request rates from "4" or "1,2,4,inf"."""
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"request_rate must be numbers or inf separated by commas, got {text!r}") from None
    if any(not rate > 0 for rate in rates):
        raise ValueError(f"request rates must be positive, got {text!r}")
    return rates


@dataclass
class RequestResult:
    """One request as the client saw it. Times are in seconds; `start` counts from the run's start."""

    success: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    start: float = 0.0
    error: str = ""


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send time of each of `n` requests, from 0: gaps are gamma(burstiness, 1/(rate*burstiness)),
    so their mean is 1/rate whatever the burstiness."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


class StreamError(Exception):
    """The server reported an error inside the stream, or the stream ended early."""


@dataclass
class _Stream:
    """What one streamed response has delivered."""

    arrivals: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage_tokens: int | None = None
    done: bool = False

    def take(self, data: dict, now: float) -> None:
        if "error" in data:
            error = data["error"]
            raise StreamError(str(error.get("message", error) if isinstance(error, dict) else error))
        choices = data.get("choices")
        if choices and _carries_output(choices[0]):
            self.arrivals.append(now)
            self.text.append(_choice_text(choices[0]))
        if data.get("usage"):
            self.usage_tokens = data["usage"].get("completion_tokens")


def _choice_text(choice: dict) -> str:
    if "delta" in choice:  # chat completions
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


def _carries_output(choice: dict) -> bool:
    # A chat stream may open with an empty message naming the role, sent before any token exists;
    # a last token without text (EOS) still ends the choice.
    return bool(_choice_text(choice) or choice.get("finish_reason"))


class BenchClient:
    """Sends requests of a workload to one server and model, each streamed."""

    def __init__(self, config: LoadConfig, model: str, count_tokens: Callable[[str], int] | None = None):
        """`count_tokens` counts output tokens when the server sends no usage; without it, every
        piece of streamed output counts as one token."""
        self.config = config
        self.model = model
        self.count_tokens = count_tokens
        self.url = config.base_url.rstrip("/") + config.endpoint

    def payload(self, request: Request) -> dict:
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if self.config.endpoint == "/v1/chat/completions":
            body.update(messages=[{"role": "user", "content": request.prompt}],
                        max_completion_tokens=request.max_tokens)
        else:
            body.update(prompt=request.prompt, max_tokens=request.max_tokens)
        if self.config.ignore_eos:  # a vLLM extension: other servers may reject the field
            body["ignore_eos"] = True
        return body

    async def send(self, http: httpx.AsyncClient, request: Request, run_start: float) -> RequestResult:
        result = RequestResult(success=False, prompt_len=request.prompt_len)
        start = time.perf_counter()
        result.start = start - run_start
        try:
            stream = await self._receive(http, request)
        except (httpx.HTTPError, StreamError, ValueError) as error:
            result.error = f"{type(error).__name__}: {error}"
            return result
        result.e2e = time.perf_counter() - start
        result.ttft = stream.arrivals[0] - start
        result.itl = np.diff(stream.arrivals).tolist()
        result.output_tokens = self._output_tokens(stream)
        result.success = True
        return result

    async def _receive(self, http: httpx.AsyncClient, request: Request) -> _Stream:
        stream = _Stream()
        body, headers = self.payload(request), self.config.headers
        async with http.stream("POST", self.url, json=body, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {response.status_code}: {body[:300]}")
            async for line in response.aiter_lines():
                now = time.perf_counter()
                data = line[len("data:"):].strip() if line.startswith("data:") else ""
                if data == "[DONE]":
                    stream.done = True
                elif data:
                    stream.take(json.loads(data), now)
        if not stream.done:
            raise StreamError("the stream ended without [DONE]")
        if not stream.arrivals:
            raise StreamError("the stream held no output")
        return stream

    def _output_tokens(self, stream: _Stream) -> int:
        if stream.usage_tokens is not None:
            return stream.usage_tokens
        if self.count_tokens is not None:
            return self.count_tokens("".join(stream.text))
        return len(stream.arrivals)


async def first_model(config: LoadConfig) -> str:
    """The first model the server lists, for runs that name none."""
    try:
        async with _http(config, None) as http:
            response = await http.get(config.base_url.rstrip("/") + "/v1/models", headers=config.headers)
            response.raise_for_status()
            return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise ValueError(f"cannot list the models of {config.base_url} ({error}); pass --model") from None


def _http(config: LoadConfig, connections: int | None) -> httpx.AsyncClient:
    # No proxies from the environment: a proxy between client and server would be measured too. No
    # kept-alive connections: llama.cpp's server closes one after each stream despite its Keep-Alive
    # header, and a request sent on it before the close is noticed fails without reaching the server.
    # A new loopback connection costs far less than a millisecond.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(config.request_timeout), limits=limits, trust_env=False)


async def run_requests(client: BenchClient, requests: Sequence[Request], times: Sequence[float],
                       on_done: Callable[[], None] = lambda: None) -> tuple[list[RequestResult], float]:
    """Sends request i at times[i] seconds after the start (or later, under --max-concurrency) and
    returns every result with the run's duration: from the start to the last request's end."""
    limit = client.config.max_concurrency
    gate = asyncio.Semaphore(limit) if limit else contextlib.nullcontext()
    async with _http(client.config, limit) as http:
        run_start = time.perf_counter()

        async def one(request: Request, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - run_start)))
            async with gate:
                result = await client.send(http, request, run_start)
            on_done()
            return result

        results = await asyncio.gather(*(one(request, at) for request, at in zip(requests, times)))
        return list(results), time.perf_counter() - run_start
