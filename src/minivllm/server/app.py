"""The HTTP server: OpenAI routes under /v1 and /openai/v1, health, readiness, metrics, RunPod emulation.

The app is thin: every OpenAI route goes to OpenAIServing.dispatch (the code the RunPod worker
runs too); this module adds HTTP concerns only: JSON/SSE framing, error bodies, the API key,
cancelling work when the client goes away, and the warm-up that gates /ready.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from minivllm.engine.async_engine import AsyncEngine
from minivllm.input_checks import parse_json
from minivllm.openai.base import random_id
from minivllm.openai.errors import OpenAIError
from minivllm.openai.serving import OpenAIServing
from minivllm.sampling_params import SamplingParams
from minivllm.server.metrics import CONTENT_TYPE, ServerMetrics
from minivllm.server.runpod_api import RunPodJobs, build_runpod_router

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})  # never behind the API key


class ServerState:
    """/ready is 200 only after a warm-up request ran, and 503 again once draining (SIGTERM).

    Draining: new requests get 503, running ones have ``drain_s`` seconds to finish; then RunPod
    jobs still running fail with a message and engine requests still running are aborted, so
    their streams end with finish_reason "abort" instead of being cut.
    """

    def __init__(self, engine: AsyncEngine, drain_s: float, jobs=None) -> None:
        self.engine = engine
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
        while self.engine.num_streams and loop.time() < self.drain_deadline:
            await asyncio.sleep(0.05)
        stopped = self.engine.abort_all()
        if stopped:
            logger.warning("drain limit (%.0f s) reached: aborted %d running request(s)", self.drain_s, stopped)

    async def drained(self) -> None:
        self.begin_drain()
        await self._drain_task

    @property
    def ready(self) -> bool:
        return self.warmed_up and not self.draining and self.engine.is_running

    async def warm_up(self) -> None:
        """One tiny request through the engine: the first step pays one-time costs, not a user."""
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0)
            stream = self.engine.generate({"prompt_token_ids": [0, 1]}, params, random_id("warmup-"))
            async with aclosing(stream):
                async for _ in stream:
                    pass
        except Exception:
            logger.exception("warm-up request failed; /ready stays 503")
            return
        self.warmed_up = True
        logger.info("warm-up done: ready")


def create_app(engine: AsyncEngine, serving: OpenAIServing, *, api_key: str | None = None,
               runpod_handler=None, runpod_max_concurrency: int | None = None,
               shutdown_drain_s: float = 30.0, max_waiting_requests: int | None = None) -> FastAPI:
    """max_waiting_requests: past this many queued requests (submitted, no output yet), new OpenAI
    requests get 503 + Retry-After so a load balancer or autoscaler can react; RunPod jobs are never
    refused (the platform queues them). None: no limit, as in vLLM."""
    jobs = RunPodJobs(runpod_handler, runpod_max_concurrency) if runpod_handler is not None else None
    state = ServerState(engine, shutdown_drain_s, jobs)
    metrics = ServerMetrics(engine, serving.served_model_name)
    serving.request_observer = metrics.track_request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        warm_up = asyncio.create_task(state.warm_up())
        yield
        warm_up.cancel()
        await state.drained()  # RunPod jobs are background tasks: uvicorn itself never waits for them

    app = FastAPI(title="mini-vLLM", lifespan=lifespan)
    app.state.server, app.state.metrics, app.state.serving = state, metrics, serving

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return JSONResponse({"status": "engine is not running"}, status_code=503)

    @app.get("/ready")
    async def ready() -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        reason = "draining" if state.draining else "warming up" if engine.is_running else "engine is not running"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def openai_route(request: Request, route: str) -> Response:
        if state.draining:
            raise OpenAIError("The server is shutting down: send the request again later.", 503)
        admission = None
        if request.method == "POST" and max_waiting_requests is not None:
            admission = engine.admit(max_waiting_requests)
            if admission is None:
                error = OpenAIError(f"The server is at capacity ({engine.num_queued} requests waiting, the limit "
                                    f"is {max_waiting_requests}): retry shortly.", 503)
                return JSONResponse(error.to_dict(), status_code=503, headers={"Retry-After": "1"})
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
            raw = await request.body()
            if raw:
                try:
                    body = parse_json(raw)
                except ValueError as e:
                    raise OpenAIError(str(e), 400) from None
        result = await _unless_disconnected(request, serving.dispatch(route, body, request.method))
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(_sse(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    for prefix in ("/v1", "/openai/v1"):
        app.add_api_route(prefix + "/{path:path}", _bind(openai_route, prefix), methods=["GET", "POST", "DELETE"],
                          include_in_schema=False)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(OpenAIError(message, exc.status_code).to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own checks (query parameters): a 400 in the shape of the route's other errors."""
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith(("/v1/", "/openai/")):
            return JSONResponse(OpenAIError(message, 400).to_dict(), status_code=400)
        return JSONResponse({"error": message}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(OpenAIError(f"Internal server error: {type(exc).__name__}", 500).to_dict(),
                            status_code=500)

    if jobs is not None:
        app.include_router(build_runpod_router(jobs))
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app


def _bind(handler, prefix: str):
    async def route(request: Request, path: str) -> Response:
        return await handler(request, f"{prefix}/{path}")
    return route


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


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """SSE framing; an error mid-stream becomes an error event. Cancellation closes `chunks`."""
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
    yield "data: [DONE]\n\n"


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on everything but health, readiness and metrics (pure ASGI,
    so streaming and disconnect detection pass through untouched)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = OpenAIError("Invalid or missing API key: send 'Authorization: Bearer <key>'.", 401,
                                    code="invalid_api_key")
                response = JSONResponse(error.to_dict(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
