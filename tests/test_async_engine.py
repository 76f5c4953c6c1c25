"""AsyncEngine without HTTP: streaming, aborts that free KV at once, and a dying engine loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hetserve import SamplingParams
from hetserve.engine.async_engine import AsyncEngine, EngineDeadError

pytestmark = pytest.mark.slow


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def async_engine(llm):
    """Steps llm.engine in its own thread: while it lives, the test must not use llm directly."""
    engine = AsyncEngine(llm.engine)
    yield engine
    engine.shutdown()
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture
def greedy_reference(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return params, llm.generate(["The sea is"], params)[0].outputs[0].token_ids


def ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer().encode(text)


def test_streams_the_same_tokens_as_the_offline_engine(llm, greedy_reference, async_engine):
    params, expected = greedy_reference

    async def run() -> list[list[int]]:
        seen = []
        async for output in async_engine.generate("a", ids(llm, "The sea is"), params):
            seen.append(list(output.outputs[0].token_ids))
        return seen

    seen = asyncio.run(run())
    assert seen[-1] == expected
    assert [len(s) for s in seen] == sorted(len(s) for s in seen)  # cumulative, growing


def test_leaving_a_stream_early_aborts_and_frees_its_blocks(llm, async_engine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def read_two() -> None:
        stream = async_engine.generate("long", ids(llm, "Count to a thousand:"), params)
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(read_two())
    assert wait_until(lambda: llm.engine.block_manager.num_used_blocks == 0)
    assert wait_until(lambda: not llm.engine.has_unfinished_requests())
    assert async_engine.num_requests == 0


def test_invalid_request_raises_before_anything_is_queued(llm, async_engine):
    async def add() -> None:
        async_engine.add_request("bad", [], SamplingParams())

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(add())
    assert async_engine.num_requests == 0


def test_a_dead_engine_fails_its_requests_and_reports_unhealthy(llm, monkeypatch):
    engine = AsyncEngine(llm.engine)

    def broken_step():
        raise RuntimeError("worker lost")

    monkeypatch.setattr(llm.engine, "step", broken_step)

    async def run() -> None:
        async for _ in engine.generate("doomed", ids(llm, "Hello"), SamplingParams(max_tokens=4)):
            pass

    try:
        with pytest.raises(EngineDeadError, match="worker lost"):
            asyncio.run(run())
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            asyncio.run(run())
    finally:
        engine.shutdown()
        monkeypatch.undo()
        llm.engine.abort_request("doomed")
    assert not llm.engine.has_unfinished_requests()


def test_builds_the_engine_on_its_own_thread_and_reraises_a_failed_build(llm):
    threads = []

    def build():
        threads.append(threading.current_thread())
        return llm.engine

    engine = AsyncEngine(build)
    try:
        assert engine.engine is llm.engine and engine.is_healthy
        assert threads == [engine._thread] and threads[0] is not threading.main_thread()
    finally:
        engine.shutdown()

    def broken_build():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(broken_build)
