"""The HTTP server: OpenAI routes under /v1 and /openai/v1, health, readiness, metrics, RunPod emulation.

The app is thin: every OpenAI route goes to OpenAIServing.dispatch (the code the RunPod worker
runs too); this module adds HTTP concerns only: JSON/SSE framing, error bodies, the API key,
cancelling work when the client goes away, and the warm-up that gates /ready.

Routes are explicit, so /openapi.json (and /docs) show each with its request and response models;
the app still parses and validates bodies itself (OpenAI error bodies, never FastAPI's 422), and a
request no route takes still goes to dispatch, whose 404 / 405 name what the server serves.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema
from starlette.background import BackgroundTask
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from minivllm.anthropic import error_body, is_anthropic_route
from minivllm.anthropic.protocol import CountTokensRequest, CountTokensResponse, MessagesRequest, MessagesResponse
from minivllm.engine.async_engine import AsyncEngine
from minivllm.input_checks import parse_json
from minivllm.model_manager import ModelManager
from minivllm.openai.base import random_id
from minivllm.openai.errors import ErrorResponse, OpenAIError
from minivllm.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from minivllm.openai.responses_protocol import ResponseObject, ResponsesRequest
from minivllm.openai.serving import OpenAIServing
from minivllm.sampling_params import SamplingParams
from minivllm.server.metrics import CONTENT_TYPE, ServerMetrics
from minivllm.server.runpod_api import RunPodJobs, build_runpod_router

logger = logging.getLogger(__name__)

BIG_BODY_BYTES = 1 << 20  # bodies from here on are parsed off the event loop
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})  # never behind the API key


class ServerState:
    """/ready is 200 only after a warm-up request ran, and 503 again once draining (SIGTERM).
    A server that starts idle (a models file with `preload: false`) is ready at once: its first
    request loads the model and waits for it, and a readiness gate on a loaded model would keep
    away the very request that loads one.

    Draining: new requests get 503, running ones have ``drain_s`` seconds to finish; then RunPod
    jobs still running fail with a message and engine requests still running are aborted, so
    their streams end with finish_reason "abort" instead of being cut.
    """

    def __init__(self, models: ModelManager, drain_s: float, jobs=None) -> None:
        self.models = models
        self.drain_s = drain_s
        self.jobs = jobs  # RunPodJobs, when the RunPod emulation is mounted
        self.warmed_up = False
        self.draining = False
        self.drain_deadline: float | None = None  # loop time
        self._drain_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it started

    def request_drain(self) -> None:
        """begin_drain from anywhere (a signal handler, another thread)."""
        self.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Start draining (idempotent); called on the event loop (a signal, or the app's shutdown)."""
        self.draining = True
        if self._drain_task is None:
            self.drain_deadline = asyncio.get_running_loop().time() + self.drain_s
            self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        if self.jobs is not None:
            await self.jobs.drain(self.drain_deadline)
        loop = asyncio.get_running_loop()
        while self.models.num_streams and loop.time() < self.drain_deadline:
            await asyncio.sleep(0.05)
        stopped = self.models.abort_all()
        if stopped:
            logger.warning("drain limit (%.0f s) reached: aborted %d running request(s)", self.drain_s, stopped)

    async def drained(self) -> None:
        self.begin_drain()
        await self._drain_task

    @property
    def ready(self) -> bool:
        return self.warmed_up and not self.draining and self.models.is_running

    async def warm_up(self) -> None:
        """One tiny request through the preloaded engine: the first step pays one-time costs, not a user."""
        loaded = self.models.default.loaded
        if loaded is None:  # started idle: nothing to warm up
            self.warmed_up = True
            return
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0)
            stream = loaded.engine.generate({"prompt_token_ids": [0, 1]}, params, random_id("warmup-"))
            async with aclosing(stream):
                async for _ in stream:
                    pass
        except Exception:
            logger.exception("warm-up request failed; /ready stays 503")
            return
        self.warmed_up = True
        logger.info("warm-up done: ready")


def create_app(engine: AsyncEngine | None = None, serving: OpenAIServing | None = None, *,
               models: ModelManager | None = None, api_key: str | None = None,
               runpod_handler=None, runpod_max_concurrency: int | None = None,
               shutdown_drain_s: float = 30.0, max_waiting_requests: int | None = None,
               batches=None) -> FastAPI:
    """One model (`engine` and its `serving`) or several (`models`, a ModelManager).
    max_waiting_requests: past this many queued requests (submitted, no output yet), new OpenAI
    requests get 503 + Retry-After so a load balancer or autoscaler can react; RunPod jobs are never
    refused (the platform queues them). None: no limit, as in vLLM.
    batches: a BatchService (the Files and Batches API and its runner), or None."""
    jobs = RunPodJobs(runpod_handler, runpod_max_concurrency) if runpod_handler is not None else None
    models = models or ModelManager.serving_one(engine, serving)
    state = ServerState(models, shutdown_drain_s, jobs)
    metrics = ServerMetrics(models)
    models.request_observer = metrics.track_request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        warm_up = asyncio.create_task(state.warm_up())
        await models.start()
        if batches is not None:
            await batches.start()
        yield
        warm_up.cancel()
        if batches is not None:  # first: its running lines are handed back (to a replica, or the next start)
            await batches.stop()
        await state.drained()  # RunPod jobs are background tasks: uvicorn itself never waits for them

    app = FastAPI(title="mini-vLLM", lifespan=lifespan)
    app.state.server, app.state.metrics, app.state.models, app.state.batches = state, metrics, models, batches

    @app.get("/health", tags=["Server"], response_class=Response,
             responses={200: {"description": "No loaded engine has stopped (empty body)."},
                        503: {"model": ServerStatus, "description": "The engine is not running."}})
    async def health() -> Response:
        if models.is_running:
            return Response(status_code=200)
        return JSONResponse({"status": "engine is not running"}, status_code=503)

    @app.get("/ready", tags=["Server"],
             responses={200: {"model": ServerStatus, "description": "Warmed up and serving."},
                        503: {"model": ServerStatus, "description": "Warming up, draining or stopped."}})
    async def ready() -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        reason = "draining" if state.draining else "warming up" if models.is_running else "engine is not running"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics", tags=["Server"], response_class=Response,
             responses={200: {"description": "Prometheus text format.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def openai_route(request: Request, route: str) -> Response:
        if state.draining:
            raise OpenAIError("The server is shutting down: send the request again later.", 503)
        admission = None
        if request.method == "POST" and max_waiting_requests is not None:
            admission = models.admit(max_waiting_requests)
            if admission is None:
                error = OpenAIError(f"The server is at capacity ({models.num_queued} requests waiting, the limit "
                                    f"is {max_waiting_requests}): retry shortly.", 503)
                return _error_response(request, error, headers={"Retry-After": "1"})
        try:
            response = await _openai_response(request, route)
        except BaseException:
            if admission is not None:
                admission.close()
            raise
        if admission is not None:
            if isinstance(response, StreamingResponse):
                response.background = BackgroundTask(admission.close)
            else:
                admission.close()
        return response

    async def _openai_response(request: Request, route: str) -> Response:
        body = None
        if request.method == "POST":
            limit = models.limits.max_prompt_bytes
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:  # refused before reading it
                raise _too_large(int(declared), limit)
            raw = await request.body()
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
            if raw:
                try:  # a big body parses in a thread: the event loop keeps serving meanwhile
                    body = parse_json(raw) if len(raw) < BIG_BODY_BYTES else await asyncio.to_thread(parse_json, raw)
                except ValueError as e:
                    raise OpenAIError(str(e), 400) from None
        result = await _unless_disconnected(request, models.dispatch(route, body, request.method))
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, dict):
            return JSONResponse(result)
        done = not is_anthropic_route(request.url.path)  # Anthropic streams end with message_stop
        return StreamingResponse(_sse(result, done), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # Explicit routes, so the OpenAPI schema shows them; the app parses and validates bodies itself
    # (OpenAI error bodies, never FastAPI's 422), so bodies are documented with openapi_extra.
    api = APIRouter(tags=["OpenAI"])

    def errors(*codes: int, anthropic: bool = False) -> dict:
        """A route's error responses: `codes`, 503 (draining, at capacity), 401 with an API key."""
        return _errors(*codes, 503, *([401] if api_key else []), anthropic=anthropic)

    @api.post("/chat/completions", openapi_extra=_json_body(ChatCompletionRequest), responses=errors(400, 404) | {
        200: _created(ChatCompletionResponse, ChatCompletionChunk, "a ChatCompletionChunk")})
    async def create_chat_completion(request: Request) -> Response:
        return await openai_route(request, "/chat/completions")

    @api.post("/completions", openapi_extra=_json_body(CompletionRequest), responses=errors(400, 404) | {
        200: _created(CompletionResponse, CompletionResponse, "a CompletionResponse with the new text")})
    async def create_completion(request: Request) -> Response:
        return await openai_route(request, "/completions")

    @api.post("/responses", openapi_extra=_json_body(ResponsesRequest), responses=errors(400, 404) | {
        200: _created(ResponseObject, StreamEvent, "an event (`event:` names its type)")})
    async def create_response(request: Request) -> Response:
        return await openai_route(request, "/responses")

    @api.post("/messages", openapi_extra=_json_body(MessagesRequest), responses=errors(400, 404, anthropic=True) | {
        200: _created(MessagesResponse, StreamEvent, "an Anthropic stream event (`event:` names its type)", end="")})
    async def create_message(request: Request) -> Response:
        """Anthropic's Messages API; its errors have Anthropic's shape."""
        return await openai_route(request, "/messages")

    @api.post("/messages/count_tokens", openapi_extra=_json_body(CountTokensRequest),
              responses=errors(400, 404, anthropic=True) | {200: {"model": CountTokensResponse}})
    async def count_message_tokens(request: Request) -> Response:
        return await openai_route(request, "/messages/count_tokens")

    @api.get("/models", responses=errors() | {200: {"model": ModelList}})
    async def list_models(request: Request) -> Response:
        return await openai_route(request, "/models")

    @api.get("/models/{model:whole_path}", responses=errors(404) | {200: {"model": ModelCard}})
    async def retrieve_model(request: Request, model: str) -> Response:
        return await openai_route(request, f"/models/{_param(model)}")

    @api.get("/responses/{response_id}", responses=errors(404) | {200: {"model": ResponseObject}})
    async def retrieve_response(request: Request, response_id: str) -> Response:
        return await openai_route(request, f"/responses/{_param(response_id)}")

    @api.delete("/responses/{response_id}", responses=errors(404) | {200: {"model": DeletedResponse}})
    async def delete_response(request: Request, response_id: str) -> Response:
        return await openai_route(request, f"/responses/{_param(response_id)}")

    @api.post("/responses/{response_id}/cancel", responses=errors(400, 404) | {200: {"model": ResponseObject}})
    async def cancel_response(request: Request, response_id: str) -> Response:
        return await openai_route(request, f"/responses/{_param(response_id)}/cancel")

    for prefix in ("/v1", "/openai/v1"):
        app.include_router(api, prefix=prefix)
        if batches is not None:
            from minivllm.batches.routes import build_batch_router

            app.include_router(build_batch_router(batches), prefix=prefix)
    for prefix in ("/v1", "/openai/v1"):  # after the routes above: what none of them takes
        app.add_api_route(prefix + "/{path:whole_path}", _bind(openai_route, prefix), methods=["GET", "POST", "DELETE"],
                          include_in_schema=False)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return _error_response(request, OpenAIError(message, exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own checks (query parameters): a 400 in the shape of the route's other errors."""
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith(("/v1/", "/openai/")):
            return _error_response(request, OpenAIError(message, 400))
        return JSONResponse({"error": message}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return _error_response(request, OpenAIError(f"Internal server error: {type(exc).__name__}", 500))

    if jobs is not None:
        app.include_router(build_runpod_router(jobs))
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.openapi = lambda: _openapi(app)
    return app


class WholePathConvertor(PathConvertor):
    """The rest of a path, slashes included ("openai/gpt-oss-20b"). Never empty (/v1/models/ is no
    model called ""), never ending in a newline: Starlette's route regex ends in `$`, which matches
    before one, so /v1/models/%0A would be /v1/models/ and dispatch() would list the models."""

    regex = r".+(?!\n)"


register_url_convertor("whole_path", WholePathConvertor())


def _bind(handler, prefix: str):
    """Requests no documented route takes go to dispatch() as before: it answers an unknown path
    (404, naming the routes it serves) and a wrong method (405, naming the right ones)."""
    async def route(request: Request, path: str) -> Response:
        return await handler(request, f"{prefix}/{path}")
    return route


class ServerStatus(BaseModel):
    status: str


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool


class StreamEvent(BaseModel):
    """One event of a /responses or /messages stream (response.created, message_start, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorInfo


_REF = "#/components/schemas/"
# Models the routes name by $ref that FastAPI does not see: bodies parsed by the app, stream events.
_EXTRA_MODELS = ((ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
                 (ResponsesRequest, "validation"), (MessagesRequest, "validation"),
                 (CountTokensRequest, "validation"), (ChatCompletionChunk, "serialization"),
                 (StreamEvent, "serialization"))
_ERROR_TEXT = {400: "Invalid request: a bad field, or a body that is not JSON.",
               401: "Missing or wrong API key.",
               404: "No such model or stored response.",
               503: "Shutting down, or at capacity (with Retry-After): retry later."}
_ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in _ERROR_TEXT.items()}


def _errors(*codes: int, anthropic: bool) -> dict:
    model = AnthropicErrorResponse if anthropic else ErrorResponse
    return {code: _ERRORS[code] | {"model": model} for code in codes}


def _json_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF + model.__name__}}}}}


def _created(model: type[BaseModel], chunk: type[BaseModel], each: str, end: str = ", then `data: [DONE]`") -> dict:
    """A JSON object, or with `stream: true` server-sent events (FastAPI's schema of one event)."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": _REF + chunk.__name__}}
    event = {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"},
             "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}
    return {"model": model, "content": {"text/event-stream": {"itemSchema": event}},
            "description": f"{model.__name__}; with `stream: true`, events whose `data:` is {each}{end}."}


def _shape(schema: dict) -> tuple:
    # FastAPI's own schema of a model differs from pydantic's in details (defaults), not in fields.
    return sorted(schema.get("properties", {})), sorted(schema.get("required", []))


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus _EXTRA_MODELS, without the 422 it documents for path parameters (the
    app answers 400 with an error body instead)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            operation["responses"].pop("422", None)
        _, extra = models_json_schema(_EXTRA_MODELS, ref_template=_REF + "{model}")
        for name, model_schema in extra["$defs"].items():
            if _shape(components.setdefault(name, model_schema)) != _shape(model_schema):
                raise RuntimeError(f"two OpenAPI schemas named {name}: rename one of the models")
        app.openapi_schema = schema
    return app.openapi_schema


def _param(value: str) -> str:
    """A path parameter that dispatch() reads back whole: it cuts a route at '?' and strips
    whitespace and '/' off its ends, so those are percent-encoded (no model or id has them)."""
    return _UNSAFE_IN_ROUTE.sub(lambda m: urllib.parse.quote(m.group(), safe=""), value)


_UNSAFE_IN_ROUTE = re.compile(r"^[\s/]+|[\s/]+$|\?")


def _error_response(request: Request, err: OpenAIError, headers: dict | None = None) -> JSONResponse:
    """Anthropic's error body on the Messages routes, OpenAI's everywhere else."""
    body = error_body(err) if is_anthropic_route(request.url.path) else err.to_dict()
    return JSONResponse(body, status_code=err.status_code, headers=headers)


async def _unless_disconnected(request: Request, work):
    """Run `work`, but cancel it (aborting its engine request) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op when it finished
    if not task.done():  # the client left: wait for the cancellation to abort the engine request
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


async def _sse(chunks: AsyncIterator[dict], done: bool = True) -> AsyncIterator[str]:
    """SSE framing; an error mid-stream becomes an error event; `done`: end with `data: [DONE]`.
    Cancellation closes `chunks`."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                event = f"event: {chunk['type']}\n" if isinstance(chunk.get("type"), str) else ""
                yield f"{event}data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except OpenAIError as e:
            yield f"data: {json.dumps(e.to_dict())}\n\n"
        except Exception as e:
            logger.exception("stream failed")
            yield f"data: {json.dumps(OpenAIError(f'Internal server error: {type(e).__name__}', 500).to_dict())}\n\n"
    if done:
        yield "data: [DONE]\n\n"


def _too_large(size: int, limit: int) -> OpenAIError:
    return OpenAIError(f"The request body is {size} bytes, more than this server's limit of {limit} "
                       "(set by MAX_PROMPT_BYTES).", 413, code="request_too_large")


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` (or Anthropic clients' `x-api-key: <key>`) on everything but
    health, readiness and metrics (pure ASGI, so streaming and disconnect detection pass through)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in PUBLIC_PATHS:
            headers = dict(scope["headers"])
            bearer = headers.get(b"authorization", b"")
            given = bearer[7:] if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.api_key):
                error = OpenAIError("Invalid or missing API key: send 'Authorization: Bearer <key>'.", 401,
                                    code="invalid_api_key")
                body = error_body(error) if is_anthropic_route(scope["path"]) else error.to_dict()
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
