"""AsyncEngine: the LLMEngine stepping in its own thread while asyncio code adds requests and
streams their outputs.

The model forward runs in the engine thread, so the event loop is never blocked by it. Requests
and aborts reach the thread through a queue; outputs come back through one asyncio.Queue per
request. Validation happens in the caller's thread (it only reads immutable engine state), so bad
input raises at once and nothing is queued.

Give AsyncEngine a function that builds the LLMEngine, not a built one, wherever speed counts: it
then builds it on the engine thread, so that every parallel tensor op of the process starts there.
OpenMP (libgomp) keeps a pool of worker threads per thread that starts parallel work, and once its
threads outnumber the cores it all but stops spin-waiting between parallel regions: a model loaded
on one thread and run on another pays a sleep and wake-up in every op (a batch-1 decode step of
SmolLM2 on 2 cores: 25 ms on the loading thread, 35 ms on another)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from hetserve.engine.llm_engine import LLMEngine
from hetserve.engine.outputs import RequestOutput
from hetserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Told about every step's outputs (in the engine thread) and every abort, e.g. for metrics."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_abort(self, request_id: str) -> None: ...


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """Outputs of one request, handed from the engine thread to the event loop.

    Iterate it for cumulative RequestOutputs; call abort() when done with it: a request that has
    not finished is then aborted and its KV blocks freed (e.g. the client went away)."""

    def __init__(self, owner: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.owner = owner
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_queue_len: int | None = None,
                 observer: EngineObserver | None = None):
        """`engine`, or a function that builds it on the engine thread (see the module's note).
        Returns once the engine is built; raises what building it raised."""
        self.max_queue_len = max_queue_len
        self.observer = observer
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="hetserve-engine",
                                        daemon=True)
        self._thread.start()
        built.wait()
        if self.error is not None:
            raise self.error

    # -- state ---------------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    def _check_alive(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, priority: int = 0) -> RequestStream:
        """Queue a request and return the stream of its outputs. Raises at once, queuing nothing,
        on invalid input (ValueError), a full queue (QueueFullError) or a dead engine."""
        self._check_alive()
        self.engine.validate_request(prompt_token_ids, params)
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if self.max_queue_len is not None and self._num_waiting() >= self.max_queue_len:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue_len} requests)")
            self._streams[request_id] = stream
        self._send(_Add(request_id, prompt, prompt_token_ids, params, time.monotonic(), priority))
        return stream

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes; leaving early aborts it."""
        stream = self.add_request(request_id, prompt_token_ids, params, prompt, priority)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        with self._streams_lock:
            known = self._streams.pop(request_id, None) is not None
        if known:
            self._send(_Abort(request_id))
            if self.observer is not None:
                self.observer.on_abort(request_id)

    def _num_waiting(self) -> int:
        """Requests not yet running: on their way to the engine thread or in its waiting queue."""
        return self._commands.qsize() + len(self.engine.scheduler.waiting)

    def _send(self, command: _Add | _Abort | None) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else engine()
        except BaseException as error:  # noqa: BLE001 - re-raised by __init__
            self.error = error
            return
        finally:
            built.set()
        try:
            while not self._stopping:
                self._apply_commands()
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                else:
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
        except BaseException as error:  # noqa: BLE001 - any failure kills the engine for good
            logger.exception("engine loop died")
            self.error = error
            self._fail_all(EngineDeadError(f"engine loop died: {error!r}"))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)

    def _add(self, command: _Add) -> None:
        with self._streams_lock:
            stream = self._streams.get(command.request_id)
        if stream is None:  # aborted before it reached the engine
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    prompt_token_ids=command.prompt_token_ids,
                                    arrival_time=command.arrival_time, priority=command.priority)
        except ValueError as error:
            with self._streams_lock:
                self._streams.pop(command.request_id, None)
            stream.put(error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if self.observer is not None and outputs:
            self.observer.on_outputs(outputs)
        with self._streams_lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                stream.put(output)

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(error)

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still in flight end with EngineDeadError."""
        self._stopping = True
        self._send(None)
        self._thread.join(timeout)
        self._fail_all(EngineDeadError("server is shutting down"))
