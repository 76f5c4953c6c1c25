"""The HTTP server: FastAPI routes of the OpenAI API, health, metrics, tokenizer endpoints."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

import hetserve
from hetserve.config import ServerConfig
from hetserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from hetserve.server.metrics import ServerMetrics
from hetserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    UnsupportedFieldError,
)
from hetserve.server.serving import OpenAIServing

logger = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/metrics", "/version")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 for request bodies over the limit, counted as they arrive (a missing or false
    Content-Length does not get around it)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except APIError as error:
            await error_response(error.status, error.message)(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body exceeds {self.max_bytes} bytes")(scope, receive, send)


def build_app(engine: AsyncEngine, config: ServerConfig, model_name: str, chat_template: str | None,
              metrics: ServerMetrics) -> FastAPI:
    app = FastAPI(title="hetserve", version=hetserve.__version__)
    serving = OpenAIServing(engine, model_name, chat_template)
    app.state.engine = engine
    _install_error_handlers(app)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    created = int(time.time())

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "hetserve",
                "max_model_len": engine.engine.max_model_len}

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_healthy else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": hetserve.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        request = await _parse(raw, CompletionRequest)
        check_model(request.model)
        return await _respond(raw, request, lambda: serving.start_completion(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        request = await _parse(raw, ChatCompletionRequest)
        check_model(request.model)
        return await _respond(raw, request, lambda: serving.start_chat(request))

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> dict:
        request = await _parse(raw, TokenizeRequest)
        check_model(request.model)
        tokenizer = engine.engine.tokenizer
        if request.messages is not None:
            conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
            text = tokenizer.apply_chat_template(conversation, request.add_generation_prompt, chat_template)
            tokens = tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> dict:
        request = await _parse(raw, DetokenizeRequest)
        check_model(request.model)
        vocab = engine.engine.spec.vocab_size
        if any(t >= vocab for t in request.tokens):
            raise APIError(400, f"token ids must be below the vocabulary size {vocab}", "tokens")
        return {"prompt": engine.engine.tokenizer.decode(request.tokens, skip_special_tokens=False)}

    return app


async def _parse(raw: Request, model):
    """The JSON body as `model`; any malformed input is a 400 naming the problem."""
    body = await raw.body()
    try:
        data = json.loads(body)
        # JSON may spell lone UTF-16 surrogates ("\ud800"), which no tokenizer can take.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"request body is not valid JSON text: {error}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid request")
    context = first.get("ctx", {}).get("error")
    if isinstance(context, UnsupportedFieldError):
        return APIError(400, str(context), context.field)
    return APIError(400, f"{param}: {message}" if param else message, param or None)


async def _respond(raw: Request, request, start) -> Response:
    try:
        response = start()
    except QueueFullError as error:
        raise APIError(503, str(error), headers={"Retry-After": "1"}) from None
    except EngineDeadError as error:
        raise APIError(503, str(error)) from None
    except UnsupportedFieldError as error:
        raise APIError(400, str(error), error.field) from None
    except ValueError as error:
        raise APIError(400, str(error)) from None
    if request.stream:
        return StreamingResponse(response.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return JSONResponse(await _unless_disconnected(raw, response))


async def _unless_disconnected(raw: Request, response) -> dict:
    """The whole response body, or an abort (freeing its KV) if the client leaves first."""
    body_task = asyncio.create_task(response.body())
    gone_task = asyncio.create_task(_wait_for_disconnect(raw))
    done, _ = await asyncio.wait({body_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    gone_task.cancel()
    if body_task not in done:
        body_task.cancel()
        response.abort()
        raise APIError(499, "client disconnected")
    try:
        return body_task.result()
    except EngineDeadError as error:
        raise APIError(503, str(error)) from None
    except ValueError as error:
        raise APIError(400, str(error)) from None


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, str(error))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request")
        return error_response(500, f"internal error: {type(error).__name__}")

    @app.exception_handler(404)
    async def not_found(request: Request, _) -> JSONResponse:
        return error_response(404, f"{request.url.path} not found")

    @app.exception_handler(405)
    async def wrong_method(request: Request, _) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer KEY` matches (constant-time); health, metrics and
    version stay open. Plain ASGI, so streaming responses and disconnects pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "Invalid or missing API key (Authorization: Bearer ...)")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
