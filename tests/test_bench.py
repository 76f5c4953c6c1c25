"""`hetserve bench`: metrics on hand-built results (exact numbers), workloads and arrivals per seed,
and the streaming client against a fake OpenAI server on a loopback port that streams scripted
chunks after scripted delays. Timing checks are lower bounds the script guarantees, with upper
bounds far too loose to flake; no wall-clock speed is asserted."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from hetserve.bench.load import BenchClient, LoadConfig, RequestResult, arrival_times, run_requests
from hetserve.bench.metrics import SLO, parse_slo, summarize, tpot
from hetserve.bench.workloads import (Request, WorkloadConfig, build_requests, load_vocabulary,
                                      tokenizer_vocabulary, word_vocabulary)
from hetserve.cli import main
from hetserve.worker.distributed import free_port

FIRST = 0.25  # seconds before the first chunk
GAP = 0.05  # seconds between later chunks
CHUNKS = 4
USAGE_TOKENS = 8  # more than chunks, as when a chunk carries several tokens: usage must win
SLACK = 3.0  # an upper bound no loaded machine reaches


# -- a fake OpenAI server ------------------------------------------------------------------------


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _chunk(chat: bool, text: str, finish_reason: str | None = None) -> str:
    choice = {"index": 0, "finish_reason": finish_reason}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    return _sse({"choices": [choice]})


async def _script(flags: set[str], chat: bool, usage: bool):
    """The scripted stream; words of the prompt pick the behaviour."""
    if chat:  # like hetserve: an empty message naming the role, at once, before any token
        yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    await asyncio.sleep(0.0 if "fast" in flags else FIRST)
    if "eos" in flags:  # one token, EOS, that has no text
        yield _chunk(chat, "", "stop")
    else:
        yield _chunk(chat, "a")
        if "break" in flags:
            raise RuntimeError("connection dropped mid-stream")
        if "error" in flags:
            yield _sse({"error": {"message": "engine died", "code": 500}})
        for i in range(1, CHUNKS):
            await asyncio.sleep(0.0 if "fast" in flags else GAP)
            yield _chunk(chat, " b", "length" if i == CHUNKS - 1 else None)
    if usage and "nousage" not in flags:
        yield _sse({"choices": [], "usage": {"completion_tokens": 1 if "eos" in flags else USAGE_TOKENS}})
    yield _sse("[DONE]")


def fake_app(bodies: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def complete(raw: HTTPRequest, chat: bool):
        body = await raw.json()
        bodies.append(body)
        flags = set((body["messages"][-1]["content"] if chat else body["prompt"]).split())
        if "fail" in flags:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_script(flags, chat, usage), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(raw: HTTPRequest):
        return await complete(raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: HTTPRequest):
        return await complete(raw, chat=True)

    return app


@pytest.fixture(scope="module")
def fake():
    """(base url, the request bodies received) of a fake server on a free loopback port."""
    bodies: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_app(bodies), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", bodies
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def run(url: str, prompts: list[str], **load) -> tuple[list[RequestResult], float]:
    """All prompts at once (queued under max_concurrency), 16 tokens each, prompt i of 10+i tokens."""
    requests = [Request(prompt, prompt_len=10 + i, max_tokens=16) for i, prompt in enumerate(prompts)]
    client = BenchClient(LoadConfig(base_url=url, **load), "fake-model")
    return asyncio.run(run_requests(client, requests, [0.0] * len(requests)))


# -- metrics, by hand ----------------------------------------------------------------------------


def results_by_hand() -> list[RequestResult]:
    return [
        RequestResult(True, prompt_len=10, output_tokens=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4),  # TPOT 100 ms
        RequestResult(True, prompt_len=20, output_tokens=1, ttft=0.3, e2e=0.3),  # no TPOT
        RequestResult(True, prompt_len=30, output_tokens=3, ttft=0.2, e2e=0.6, itl=[0.2, 0.2]),  # TPOT 200 ms
        RequestResult(False, prompt_len=1000, output_tokens=0, ttft=9.0, e2e=9.0, itl=[9.0], error="HTTP 500"),
    ]


def test_summary_by_hand_excludes_failed_requests():
    summary = summarize(results_by_hand(), duration=2.0)
    assert (summary.completed, summary.failed) == (3, 1)
    assert (summary.total_input_tokens, summary.total_output_tokens) == (60, 9)
    assert summary.request_throughput == 1.5
    assert summary.output_throughput == 4.5
    assert summary.total_token_throughput == 34.5
    assert summary.goodput is None
    ttft = summary.ttft
    assert ttft.count == 3
    assert (ttft.mean, ttft.median, ttft.p90, ttft.p99) == pytest.approx((200, 200, 280, 298))
    assert ttft.std == pytest.approx(math.sqrt(20000 / 3))
    assert summary.tpot.count == 2 and summary.tpot.mean == pytest.approx(150)
    assert summary.itl.count == 6 and summary.itl.mean == pytest.approx(800 / 6)
    assert summary.e2el.count == 3
    assert (summary.e2el.mean, summary.e2el.median) == pytest.approx((1400 / 3, 500))


def test_tpot_and_goodput_by_hand():
    results = results_by_hand()
    assert tpot(results[0]) == pytest.approx(0.1) and tpot(results[1]) is None
    assert tpot(results[2]) == pytest.approx(0.2)
    # ttft: requests 1 and 3; tpot: 1 and 2 (one token meets any TPOT); both: 1; e2el: 1 and 2; the failed never
    expected = {("ttft:250",): 1.0, ("tpot:150",): 1.0, ("ttft:250", "tpot:150"): 0.5, ("e2el:550",): 1.0,
                ("ttft:50",): 0.0}
    assert {slo: summarize(results, 2.0, parse_slo(slo)).goodput for slo in expected} == expected
    assert parse_slo(["ttft:200", "e2el:1000"]) == SLO(ttft=200.0, e2el=1000.0)
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_summary_of_nothing_completed():
    summary = summarize([RequestResult(False, prompt_len=5, error="x")], duration=1.0)
    assert (summary.completed, summary.failed, summary.ttft.count, summary.ttft.mean) == (0, 1, 0, 0.0)
    with pytest.raises(ValueError):
        summarize([], duration=0.0)


# -- arrivals ------------------------------------------------------------------------------------


def test_arrival_times_have_the_requested_rate_and_burstiness():
    for burstiness in (1.0, 0.5, 4.0):  # gamma gaps: mean 1/rate, squared coefficient of variation 1/shape
        times = arrival_times(20000, 4.0, burstiness, np.random.default_rng(0))
        gaps = np.diff(times)
        assert times[0] == 0.0 and (gaps >= 0).all()
        assert gaps.mean() == pytest.approx(0.25, rel=0.03)
        assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)
    assert arrival_times(5, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 5
    same_seed = [arrival_times(50, 2.0, 1.0, np.random.default_rng(7)) for _ in range(2)]
    assert same_seed[0] == same_seed[1]
    assert LoadConfig(request_rate="1,2.5,inf").rates == [1.0, 2.5, math.inf]
    for bad in ("0", "1,x", "-1"):
        with pytest.raises(ValueError):
            LoadConfig(request_rate=bad)


# -- workloads -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from hetserve.model.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(None))  # the packaged SmolLM2's


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return tokenizer_vocabulary(tokenizer)


def test_prompts_have_exact_token_lengths_with_a_tokenizer(tokenizer, vocab):
    cases = {
        "random": dict(random_input_len=40, random_range_ratio=0.5),
        "long-context": dict(long_context_len=1500),
        "chat": dict(chat_input_len=30, chat_output_len=20),
        "shared-prefix": dict(prefix_len=200, suffix_len=7),
        "mixed": dict(random_input_len=20, long_context_len=300),
    }
    for workload, lengths in cases.items():
        requests = build_requests(WorkloadConfig(workload=workload, num_prompts=12, seed=3, **lengths), vocab)
        assert [r.prompt_len for r in requests] == \
            [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in requests], workload
        assert all(r.max_tokens >= 1 for r in requests)
    ranged = build_requests(WorkloadConfig(random_input_len=40, random_range_ratio=0.5, num_prompts=50), vocab)
    assert min(r.prompt_len for r in ranged) >= 20 and max(r.prompt_len for r in ranged) <= 60
    assert len({r.prompt_len for r in ranged}) > 5
    exact = build_requests(WorkloadConfig(random_input_len=40, random_output_len=9, num_prompts=5), vocab)
    assert {(r.prompt_len, r.max_tokens) for r in exact} == {(40, 9)}
    long = build_requests(WorkloadConfig(workload="long-context", long_context_len=1500, num_prompts=2), vocab)
    assert {r.prompt_len for r in long} == {1500}


def test_shared_prefix_prompts_share_exactly_the_prefix(tokenizer, vocab):
    config = WorkloadConfig(workload="shared-prefix", prefix_len=100, suffix_len=5, num_prompts=6)
    tokens = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in build_requests(config, vocab)]
    assert {len(t) for t in tokens} == {105}
    assert len({tuple(t[:100]) for t in tokens}) == 1 and len({tuple(t[100:]) for t in tokens}) == 6


def test_mixed_workload_has_the_requested_share_of_long_requests(vocab):
    config = WorkloadConfig(workload="mixed", num_prompts=400, random_input_len=20, random_output_len=8,
                            long_context_len=200, mixed_long_fraction=0.25, mixed_long_output_len=64)
    requests = build_requests(config, vocab)
    lengths = {(r.prompt_len, r.max_tokens) for r in requests}
    assert lengths == {(20, 8), (200, 64)}
    assert 70 < sum(r.max_tokens == 64 for r in requests) < 130


def test_workloads_are_deterministic_per_seed(vocab):
    for workload in ("random", "chat", "shared-prefix", "long-context", "mixed"):
        def build(seed: int, vocabulary=vocab) -> list[Request]:
            config = WorkloadConfig(workload=workload, num_prompts=4, seed=seed, long_context_len=300, prefix_len=50)
            return build_requests(config, vocabulary)
        assert build(1) == build(1) and build(1) != build(2)
        assert build(1, word_vocabulary()) == build(1, word_vocabulary())
    words = build_requests(WorkloadConfig(random_input_len=33, num_prompts=3), word_vocabulary())
    assert [r.prompt_len for r in words] == [33] * 3 == [len(r.prompt.split()) for r in words]
    assert vocab.exact and not word_vocabulary().exact and not load_vocabulary(None).exact


def test_jsonl_workload_reuses_lines_in_order(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one two three", "max_tokens": 5}\n\n{"prompt": "four"}\n')
    requests = build_requests(WorkloadConfig(workload="jsonl", dataset_path=str(path), num_prompts=3,
                                             random_output_len=7), word_vocabulary())
    assert requests == [Request("one two three", 3, 5), Request("four", 1, 7), Request("one two three", 3, 5)]
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 1"):
        build_requests(WorkloadConfig(workload="jsonl", dataset_path=str(path)), word_vocabulary())
    for bad in (dict(workload="sharegpt"), dict(workload="jsonl"), dict(random_range_ratio=1.0),
                dict(num_prompts=0)):
        with pytest.raises(ValueError):
            WorkloadConfig(**bad)


# -- the streaming client against the fake server ------------------------------------------------


def test_streamed_timings_usage_and_failures(fake):
    url, bodies = fake
    bodies.clear()
    results, duration = run(url, ["ok", "ok", "ok", "fail", "break", "error"], ignore_eos=True)
    ok, failed = results[:3], results[3:]
    for result in ok:
        assert result.success, result.error
        assert FIRST <= result.ttft < FIRST + SLACK
        assert len(result.itl) == CHUNKS - 1
        assert result.output_tokens == USAGE_TOKENS
        assert FIRST + (CHUNKS - 1) * GAP <= result.e2e <= duration
        assert tpot(result) == pytest.approx((result.e2e - result.ttft) / (USAGE_TOKENS - 1))
    assert [r.success for r in failed] == [False] * 3
    assert "HTTP 500" in failed[0].error and "RemoteProtocolError" in failed[1].error
    assert "engine died" in failed[2].error
    summary = summarize(results, duration)
    assert (summary.completed, summary.failed) == (3, 3)
    assert summary.itl.count == 3 * (CHUNKS - 1)
    assert summary.total_input_tokens == 10 + 11 + 12 and summary.total_output_tokens == 3 * USAGE_TOKENS
    assert summary.ttft.mean == pytest.approx(np.mean([r.ttft for r in ok]) * 1000)
    body = bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["ignore_eos"]) == ("fake-model", 16, True)


def test_chat_stream_skips_the_role_chunk_and_counts_chunks_without_usage(fake):
    url, bodies = fake
    bodies.clear()
    results, _ = run(url, ["nousage", "eos nousage"], endpoint="/v1/chat/completions", max_concurrency=1)
    for result in results:
        assert result.success, result.error
        assert result.ttft >= FIRST  # the role message came at once, but it is not the first token
    assert (results[0].output_tokens, len(results[0].itl)) == (CHUNKS, CHUNKS - 1)
    assert (results[1].output_tokens, results[1].itl, tpot(results[1])) == (1, [], None)
    assert results[1].start >= results[0].start + results[0].e2e - 1e-6  # one at a time
    assert bodies[0]["messages"] == [{"role": "user", "content": "nousage"}]
    assert bodies[0]["max_completion_tokens"] == 16 and "ignore_eos" not in bodies[0]


def test_unreachable_server_counts_every_request_failed():
    port = free_port()  # closed again before use: nothing listens there
    results, duration = run(f"http://127.0.0.1:{port}", ["a", "b"])
    assert [r.success for r in results] == [False, False] and all("ConnectError" in r.error for r in results)
    assert summarize(results, duration).failed == 2
    assert main(["bench", "--base-url", f"http://127.0.0.1:{port}", "--disable-tqdm"]) == 2  # no model list


# -- the command line ----------------------------------------------------------------------------


def test_bench_sweep_writes_summary_json_and_plots(fake, tmp_path, capsys):
    url, _ = fake
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p, "max_tokens": 8}) + "\n"
                               for p in ("ok", "fast", "ok", "fail")))
    out, plots = tmp_path / "results" / "bench.json", tmp_path / "plots"
    code = main(["bench", "--base-url", url, "--workload", "jsonl", "--dataset-path", str(dataset),
                 "--num-prompts", "4", "--request-rate", "20,inf", "--goodput", "ttft:200", "--out", str(out),
                 "--plot-dir", str(plots), "--disable-tqdm"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert stdout.count("Serving Benchmark Result") == 2 and "Request rate sweep" in stdout
    assert "Request goodput (req/s)" in stdout and "approximate" in stdout
    report = json.loads(out.read_text())
    config = report["config"]
    assert (config["model"], config["workload"]["workload"]) == ("fake-model", "jsonl")
    assert config["goodput"]["ttft"] == 200 and config["exact_input_lengths"] is False
    assert [run["request_rate"] for run in report["runs"]] == [20.0, "inf"]
    for run in report["runs"]:
        summary, records = run["summary"], run["requests"]
        assert (summary["completed"], summary["failed"], len(records)) == (3, 1, 4)
        meeting = [r for r in records if r["success"] and r["ttft"] * 1000 <= 200]
        assert summary["goodput"] * summary["duration_s"] == pytest.approx(len(meeting))
        assert len(meeting) <= 1  # the "ok" prompts wait FIRST > 200 ms for their first token
        assert summary["total_output_tokens"] == 3 * USAGE_TOKENS
    for name in ("latency_cdf.png", "sweep.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--workload", "--random-input-len", "--random-output-len", "--random-range-ratio", "--tokenizer",
                 "--request-rate", "--burstiness", "--max-concurrency", "--endpoint", "--base-url", "--model",
                 "--num-prompts", "--ignore-eos", "--goodput", "--out", "--plot-dir", "--disable-tqdm", "--seed"):
        assert flag in help_text
    assert main(["bench", "--request-rate", "0"]) == 2
    assert "request rates must be positive" in capsys.readouterr().err
