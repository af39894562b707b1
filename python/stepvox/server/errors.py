"""Error responses in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the one
mapping from stepvox's typed errors to HTTP statuses: the caller's mistakes are 4xx naming the
field, the server's failures 500 naming the request id (the log has the traceback under that id)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepvox.engine.errors import (AudioInputError, EngineDeadError, InvalidRequestError, KVCacheExhaustedError,
                                   PromptTooLongError, StepvoxError)
from stepvox.engine.pipelines.voices import UnknownVoiceError, VoiceExistsError

log = logging.getLogger("stepvox.server")


class ApiError(Exception):
    """An error response: status, OpenAI error fields, extra headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def request_id_of(request_or_scope) -> str:
    scope = request_or_scope if isinstance(request_or_scope, dict) else request_or_scope.scope
    return scope.get("state", {}).get("request_id", "-")


def from_exception(exc: BaseException, request_id: str, audio_param: str | None = None) -> ApiError:
    """The response for an error raised while serving a request. `audio_param`: the field that carried
    the request's audio (ref_audio, audio), named by audio errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownVoiceError):
        return ApiError(404, str(exc), param="voice", code="voice_not_found")
    if isinstance(exc, VoiceExistsError):
        return ApiError(409, str(exc), param="name", code="voice_exists")
    if isinstance(exc, AudioInputError):
        return ApiError(400, str(exc), param=audio_param, code="invalid_audio")
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), param="input", code="prompt_too_long")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), code="invalid_value")
    if isinstance(exc, KVCacheExhaustedError):
        # the engine raises it only for a request that needs more pages than the whole cache has
        # (prompt + max_tokens), with nothing else running: the request is too big, not the server busy
        return ApiError(400, f"{exc}: the request is too large for this server's KV cache; ask for fewer "
                        "max_tokens or send shorter input", param="max_tokens", code="request_too_large")
    if isinstance(exc, EngineDeadError):
        log.error("request %s: %s", request_id, exc)
        return ApiError(500, f"request {request_id} failed: the engine has stopped ({exc})", type="server_error",
                        code="engine_dead")
    log.error("request %s failed", request_id, exc_info=exc)
    kind = "" if isinstance(exc, StepvoxError) else " (a bug: please report it with the server log)"
    return ApiError(500, f"request {request_id} failed: {type(exc).__name__}: {exc}{kind}", type="server_error",
                    code="internal_error")


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's body/field validation -> 422 naming the first bad field (400 for a body that is not JSON)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    # a union's branch name ("str", "VoiceId") is pydantic's, not a field
    loc = [p for p in loc if not (p[:1].isupper() or p in ("str", "int", "float", "function-after"))]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None   # messages[0].role
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return ApiError(422, message, param=param, code="invalid_value")


def install(app: FastAPI, metrics) -> None:
    """Every error the app answers takes the OpenAI shape and is counted."""

    def respond(error: ApiError) -> JSONResponse:
        metrics.errors.labels(error.type, error.code or "-").inc()
        return error.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
        return respond(ApiError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(StepvoxError)
    async def _stepvox(request: Request, exc: StepvoxError):
        return respond(from_exception(exc, request_id_of(request)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette answers these outside every middleware (RequestIdMiddleware included): the id goes
        # on here
        request_id = request_id_of(request)
        if getattr(exc, "already_reported", False):     # a stream that failed after its status line
            error = ApiError(500, str(exc), type="server_error")
            error.headers["X-Request-Id"] = request_id
            return error.response()
        error = from_exception(exc, request_id)
        error.headers = {**error.headers, "X-Request-Id": request_id}
        return respond(error)
