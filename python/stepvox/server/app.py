"""The app factory: `create_app(model, config)` -> a FastAPI app serving one loaded TTS, or one
loaded VoiceChat (its TTS answers the speech routes; its chat model and ASR the chat completions
and transcriptions).

The models are loaded before the app exists (a bad folder is a start-up error, not a broken
server), and every request shares them: one LM engine per model batching all requests, one
decoder thread, one audio-tokenizer thread. The middlewares are plain ASGI (a BaseHTTPMiddleware
would buffer and detach streamed responses), outermost first: request id + HTTP metrics, API key,
body size limit. When the app stops (after uvicorn has let in-flight responses finish, or
cancelled them at the deadline) it takes no more requests and shuts the model down, unless
`shutdown_model=False` (runner.serve shuts it down itself, started or not).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepvox.engine.pipelines.tts import TTS
from stepvox.engine.pipelines.voice_chat import VoiceChat

from .admission import Admission
from .chat_routes import router as chat_router
from .realtime import router as realtime_router
from .config import ServerConfig
from .errors import ApiError, install as install_errors
from .metrics import ServerMetrics
from .routes import router

log = logging.getLogger("stepvox.server")
API_PREFIX = "/v1/"
WS_KEY_PROTOCOL = b"openai-insecure-api-key."


class ServerState:
    """What the routes share: the models, the config, metrics, admission, and whether the server is
    taking requests (False once it shuts down)."""

    def __init__(self, model: TTS | VoiceChat, config: ServerConfig):
        if not isinstance(model, (TTS, VoiceChat)):
            raise TypeError(f"serve a loaded TTS or VoiceChat, not {type(model).__name__}")
        self.chat = model if isinstance(model, VoiceChat) else None
        self.tts = model.tts if self.chat is not None else model
        self.config = config
        self.metrics = ServerMetrics(self.tts, self.chat)
        self.admission = Admission(config.max_concurrent, config.max_queue, self.metrics, config.retry_after_s,
                                   max_streams=config.max_streams, min_slack_s=config.min_slack_s)
        self.started = int(time.time())
        self.accepting = True
        self.voice_uploads = 0          # POST /v1/audio/voices being processed (routes: at most a few)
        builtin = self.tts.voice_registry.names(builtin=True)
        self.default_voice = config.default_voice or ("Tingting" if "Tingting" in builtin
                                                      else builtin[0] if builtin else None)

    def problem(self) -> str | None:
        """Why the server cannot take a request now (None: it can)."""
        if not self.accepting:
            return "the server is shutting down"
        if self.tts.engine.is_dead:
            return "the engine has stopped; the server must be restarted"
        if self.chat is not None and self.chat.chat_engine.is_dead:
            return "the chat engine has stopped; the server must be restarted"
        return None


def create_app(model: TTS | VoiceChat, config: ServerConfig | None = None, shutdown_model: bool = True) -> FastAPI:
    """`model`: a loaded stepvox TTS or VoiceChat; `shutdown_model`: shut it down when the app stops."""
    config = config or ServerConfig()
    state = ServerState(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.accepting = False
        if shutdown_model:
            log.info("shutting the models down")
            await asyncio.to_thread(model.shutdown)

    # /openapi.json describes the API; no /docs page: it loads its scripts from a CDN
    app = FastAPI(title="stepvox", description="OpenAI-compatible speech and voice-chat server for Step-Audio",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.stepvox = state
    install_errors(app, state.metrics)
    app.include_router(router)
    app.include_router(chat_router)
    app.include_router(realtime_router)
    # added last = outermost
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, metrics=state.metrics)
    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware, metrics=state.metrics)
    return app


async def _send_error(send, error: ApiError, metrics) -> None:
    metrics.errors.labels(error.type, error.code or "-").inc()
    await error.response()({"type": "http"}, None, send)


class RequestIdMiddleware:
    """Gives each request an id (`X-Request-Id` on the response; error messages name it) and counts
    it by route template and status."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        # 499 (nginx's "client closed request"): no status line went out and nothing failed, so the
        # client left first; 500: the app raised before its status line
        status = ["499"]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", request_id.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if status[0] == "499":
                status[0] = "500"
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], path, status[0]).inc()


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every /v1/ route (health and metrics stay open, as vLLM's do),
    checked before the body is read."""

    def __init__(self, app, api_key: str, metrics):
        self.app, self.metrics = app, metrics
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and scope["path"].startswith(API_PREFIX):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # browsers cannot set headers on a WebSocket: they offer the key as a subprotocol, as
            # OpenAI's Realtime API takes it
            offered = [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",")]
            keys = [p[len(WS_KEY_PROTOCOL):] for p in offered if p.startswith(WS_KEY_PROTOCOL)]
            if scheme.lower() == b"bearer":
                keys.append(token.strip())
            if not any(hmac.compare_digest(k, self._key) for k in keys):
                # refused before the handshake: the client sees HTTP 403
                return await send({"type": "websocket.close", "code": 1008, "reason": "missing or incorrect API key"})
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not given:
                return await _send_error(send, ApiError(
                    401, "missing API key: send Authorization: Bearer KEY", type="authentication_error",
                    code="missing_api_key", headers={"WWW-Authenticate": "Bearer"}), self.metrics)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return await _send_error(send, ApiError(
                    401, "incorrect API key", type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}), self.metrics)
        await self.app(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while a handler reads the body: an HTTPException, so that FastAPI's body
    parsing passes it on (it turns other errors into a 400) and the error handlers answer 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body larger than {max_bytes} bytes (--max-body-mib)")


class BodyLimitMiddleware:
    """Refuses a body over `max_bytes` (413): at once from its Content-Length, or as soon as a chunked
    body passes the limit, before it is parsed."""

    def __init__(self, app, max_bytes: int, metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    def _error(self) -> ApiError:
        return ApiError(413, _BodyTooLarge(self.max_bytes).detail, code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, self._error(), self.metrics)
        seen = [0]
        started = [False]

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if started[0]:
                raise
            await _send_error(send, self._error(), self.metrics)
