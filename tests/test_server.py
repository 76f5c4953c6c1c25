"""A live `hetserve serve` process on a free loopback port, driven by real clients: the official
openai client, raw httpx for schema validation, and abusive ones. Every loop is bounded."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from hetserve import SamplingParams
from tests.live_server import Server

pytestmark = pytest.mark.slow

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openai-llm-subset.json"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server():
    server = Server("--max-queue-len", "256")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


# -- OpenAI schema ------------------------------------------------------------------------------


def _nullable_to_type_lists(node):
    """The spec still marks some nodes OpenAPI-3.0 style (`nullable: true`, which also admits null
    past an enum); JSON Schema says that with a type list."""
    if isinstance(node, dict):
        node = {k: _nullable_to_type_lists(v) for k, v in node.items()}
        if node.pop("nullable", False) and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_nullable_to_type_lists(v) for v in node]
    return node


def _completion_chunk_schema(spec: dict) -> dict:
    """The spec gives streamed completions the response's shape, finish_reason required and never
    null; OpenAI's own API (and vLLM, and we) send null until the last chunk of a choice. This is
    the one relaxation: null finish_reason in a completion stream chunk."""
    chunk = copy.deepcopy(spec["components"]["schemas"]["CreateCompletionResponse"])
    finish_reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish_reason["type"] = ["string", "null"]
    finish_reason["enum"] = [*finish_reason["enum"], None]
    return chunk


@pytest.fixture(scope="module")
def schema():
    if not SPEC.is_file():
        pytest.skip(f"OpenAI schema not found at {SPEC} (shared/ is expected beside the repository)")
    spec = _nullable_to_type_lists(json.loads(SPEC.read_text()))
    spec["components"]["schemas"]["CompletionStreamChunk"] = _completion_chunk_schema(spec)
    registry = Registry().with_resource("urn:openai", Resource(spec, DRAFT202012))

    def validate(instance: dict, name: str) -> None:
        validator = Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry)
        errors = sorted(validator.iter_errors(instance), key=str)
        assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"

    return validate


def sse_chunks(response: httpx.Response) -> list[dict]:
    chunks, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(payload))
    assert done, "stream did not end with [DONE]"
    return chunks


# -- API through the openai client --------------------------------------------------------------


def test_models(client, server, schema):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    schema(httpx.get(f"{server.url}/v1/models").json(), "ListModelsResponse")
    schema(httpx.get(f"{server.url}/v1/models/{MODEL}").json(), "Model")


def test_greedy_completion_and_chat_equal_the_offline_engine(client, llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    prompt = "The three primary colors are"
    expected = llm.generate([prompt], params)[0].outputs[0].text
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text == expected
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    expected = llm.chat(messages, params)[0].outputs[0].text
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]}]
    assert client.chat.completions.create(model=MODEL, messages=parts, max_tokens=24, temperature=0
                                          ).choices[0].message.content == expected


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello"}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_n_stop_seed_echo_and_extra_fields(client):
    two = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, seed=5)
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, seed=5)
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    full = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0).choices[0].text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[" 6"])
    assert stopped.choices[0].text == full[: full.index(" 6")] and stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("1, 2, 3,")
    batch = client.completions.create(model=MODEL, prompt=["Hi", "Bye"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    by_ids = client.completions.create(model=MODEL, prompt=[504, 3575, 282], max_tokens=3, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    extra = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, extra_body={
        "top_k": 1, "min_tokens": 6, "ignore_eos": True, "repetition_penalty": 1.1, "priority": -3})
    assert extra.usage.completion_tokens == 6


def test_logprobs(client):
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, logprobs=3, temperature=0)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=3, temperature=0)
    for entry in chat.choices[0].logprobs.content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(2.718281828 ** t for t in tops) <= 1 + 1e-6
        assert entry.logprob == tops[0]


def test_tokenize_detokenize_version_health(server):
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"] == "Hello world"
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_errors_are_the_right_openai_exceptions(client):
    chat = [{"role": "user", "content": "hi"}]
    bad = [
        lambda: client.completions.create(model=MODEL, prompt="hi", temperature=-1),
        lambda: client.completions.create(model=MODEL, prompt="hi", n=0),
        lambda: client.chat.completions.create(model=MODEL, messages=[]),
        lambda: client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=10),
        lambda: client.chat.completions.create(model=MODEL, messages=chat, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        lambda: client.chat.completions.create(model=MODEL, messages=chat, response_format={"type": "json_object"}),
    ]
    for call in bad:
        with pytest.raises(openai.BadRequestError):
            call()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        bad[3]()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")


# -- every body and chunk against the official schema --------------------------------------------


def test_responses_and_chunks_validate_against_the_openai_schema(server, schema):
    url = server.url
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 6}
    schema(httpx.post(f"{url}/v1/completions", json=completion, timeout=60).json(), "CreateCompletionResponse")
    schema(httpx.post(f"{url}/v1/completions", json={**completion, "logprobs": 2, "n": 2}, timeout=60).json(),
           "CreateCompletionResponse")
    schema(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json(), "CreateChatCompletionResponse")
    schema(httpx.post(f"{url}/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2},
                      timeout=60).json(), "CreateChatCompletionResponse")
    streams = [("/v1/completions", {**completion, "logprobs": 1}, "CompletionStreamChunk"),
               ("/v1/chat/completions", {**chat, "n": 2, "logprobs": True, "top_logprobs": 1},
                "CreateChatCompletionStreamResponse")]
    for path, body, name in streams:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as response:
            chunks = sse_chunks(response)
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        for chunk in chunks:
            schema(chunk, name)


# -- concurrency, disconnects, abuse ------------------------------------------------------------


def test_fifty_concurrent_streams_equal_the_offline_outputs(server, llm):
    rng = random.Random(0)
    topics = "rivers mountains bread music stars trains books winter the sea gardens".split()
    jobs = [(f"Tell me about {rng.choice(topics)} and {rng.choice(topics)} #{i}.", rng.randint(8, 40))
            for i in range(50)]
    expected = [o.outputs[0].text for o in llm.generate(
        [p for p, _ in jobs], [SamplingParams(temperature=0, max_tokens=n) for _, n in jobs])]

    async def one(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> str:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        text = []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(one(http, p, n) for p, n in jobs))

    assert asyncio.run(run()) == expected


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_idle(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(server, "hetserve:kv_cache_used_blocks") == 0
                and metric(server, "hetserve:num_requests_running") == 0
                and metric(server, "hetserve:num_requests_waiting") == 0):
            return
        time.sleep(0.2)
    raise AssertionError("KV blocks still in use after all clients left")


def test_clients_that_disconnect_mid_stream_leave_nothing_behind(server, client):
    async def leave_early(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    break  # first line read, then the connection closes

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(leave_early(i) for i in range(100))), timeout=120)

    asyncio.run(run())
    wait_for_idle(server)
    assert client.completions.create(model=MODEL, prompt="Still there?", max_tokens=3).choices[0].text is not None


def malformed_requests(count: int) -> list[tuple[str, bytes, dict]]:
    """Seeded garbage, each body invalid for the endpoint it is sent to."""
    rng = random.Random(1234)
    any_path = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]

    def completion(**fields) -> bytes:
        return json.dumps({"model": MODEL, "prompt": "x", **fields}).encode()

    cases = [
        lambda: (rng.choice(any_path), bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))),
        lambda: (rng.choice(any_path), b"\xff\xfe\xfd" + json.dumps({"prompt": "x"}).encode()),
        lambda: (rng.choice(any_path), json.dumps(rng.choice([[], 1, "s", None, True])).encode()),
        lambda: ("/v1/completions", json.dumps({"model": MODEL, "prompt": rng.choice(
            [5, None, {}, [[]], [-1], [10**12], {"a": {"b": [1, {}]}}])}).encode()),
        lambda: ("/v1/completions", completion(max_tokens=rng.choice([1e30, 10**40, -5, 0, "many"]))),
        lambda: ("/v1/completions", completion(n=rng.choice([-1, 0, 10**6, 1.5]))),
        lambda: ("/v1/completions", completion(temperature=rng.choice([-1, "hot", 1e9]))),
        lambda: ("/v1/completions", completion(stop=rng.choice([5, [""], [1, 2]]))),
        lambda: ("/v1/completions", completion(seed=rng.choice([10**30, "x"]), logprobs=rng.choice([-1, 100]))),
        lambda: ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": rng.choice(
            [[], [{}], [{"role": "x"}], "hi", [{"role": "user", "content": 5}],
             [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]])}).encode()),
        lambda: ("/detokenize", json.dumps({"tokens": rng.choice([[-1], ["a"], [10**9], "abc"])}).encode()),
        lambda: ("/tokenize", json.dumps(rng.choice([{}, {"prompt": "a", "messages": []}])).encode()),
    ]
    headers = [{"content-type": "application/json"}, {"content-type": "text/plain"}, {}]
    return [(*rng.choice(cases)(), rng.choice(headers)) for _ in range(count)]


def test_inputs_that_once_broke_the_server_are_400s(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        nested = http.post("/v1/completions", content=b"[" * 100_000)
        surrogate = http.post("/v1/completions", content=b'{"prompt": "\\ud800 hi"}')
        stop_id = http.post("/v1/completions", json={"prompt": "hi", "min_tokens": 2, "stop_token_ids": [10**6]})
    assert [r.status_code for r in (nested, surrogate, stop_id)] == [400, 400, 400]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).choices[0].text is not None


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, headers in malformed_requests(500):
            response = http.post(path, content=body, headers=headers)
            assert 400 <= response.status_code < 500, (path, body[:80], response.status_code)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).choices[0].text is not None


# -- limits, auth and shutdown on a second, small server -----------------------------------------


@pytest.fixture(scope="module")
def small_server():
    server = Server("--max-num-seqs", "1", "--max-queue-len", "1", "--api-key", "secret-key",
                    "--max-request-body-bytes", "4096")
    yield server
    server.stop()


def test_api_key_is_required_but_health_stays_open(small_server):
    wrong = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == 401
    assert httpx.get(f"{small_server.url}/health").status_code == 200
    good = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="secret-key", max_retries=0)
    assert good.models.list().data[0].id == MODEL


def test_full_queue_is_503_with_retry_after_and_big_bodies_413(small_server):
    headers = {"Authorization": "Bearer secret-key"}
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 150, "ignore_eos": True}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.url, headers=headers, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(run())
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and all(r.headers.get("retry-after") for r in rejected)
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in rejected)
    assert any(r.status_code == 200 for r in responses)
    huge = httpx.post(f"{small_server.url}/v1/completions", headers=headers, timeout=30,
                      json={"model": MODEL, "prompt": "x" * 10_000})
    assert huge.status_code == 413 and "error" in huge.json()


def test_sigterm_during_a_stream_exits_cleanly(small_server):
    headers = {"Authorization": "Bearer secret-key"}
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, headers=headers,
                      timeout=30) as response:
        next(response.iter_lines())
        small_server.process.send_signal(signal.SIGTERM)
        # Bounded so that a shutdown that hangs fails the test instead of hanging it.
        small_server.process.wait(timeout=10)
    assert small_server.process.returncode == 0
