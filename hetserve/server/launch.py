"""`hetserve serve`: load the model, start the engine loop and serve HTTP until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal

import uvicorn

from hetserve.config import EngineConfig, ServerConfig
from hetserve.engine.async_engine import AsyncEngine
from hetserve.engine.llm_engine import LLMEngine
from hetserve.model.loader import DEFAULT_MODEL
from hetserve.server.app import build_app
from hetserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# uvicorn waits this long for open requests after SIGTERM, then cancels them (aborting their
# engine requests), so shutdown ends well within 10 s.
GRACEFUL_SHUTDOWN_S = 3


def served_name(engine_config: EngineConfig, server_config: ServerConfig) -> str:
    return server_config.served_model_name or engine_config.model.model or DEFAULT_MODEL


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    async_engine = AsyncEngine(lambda: LLMEngine(engine_config), server_config.max_queue_len)
    engine = async_engine.engine
    metrics = async_engine.observer = ServerMetrics(engine)
    name = served_name(engine_config, server_config)
    app = build_app(async_engine, server_config, name, engine.chat_template, metrics)
    logger.info("serving %r on http://%s:%d (API key %s)", name, server_config.host, server_config.port,
                "required" if server_config.api_key else "not required")
    uvicorn_config = uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level="info",
        access_log=not server_config.disable_log_requests, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # uvicorn handles SIGINT/SIGTERM while serving, then re-raises the signal to the handlers it
    # found. Finding these no-ops, the process goes on to stop the engine and exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.Server(uvicorn_config).run()
    finally:
        async_engine.shutdown()
        engine.shutdown()
        logger.info("engine stopped")
