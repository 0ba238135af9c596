"""RunPod's endpoint API, served locally over the same job handler as the worker.

``POST /run`` queues a job -> ``{"id", "status": "IN_QUEUE"}``; ``POST /runsync`` runs it and
answers ``{"id", "status", "output"}`` (``?wait=ms``, default 90 s, else ``IN_PROGRESS``);
``GET|POST /stream/{id}`` returns the outputs produced since the last poll
``{"id", "status", "stream": [{"output": ...}, ...]}`` (long-polls up to ``?wait=ms`` when nothing
is new); ``GET|POST /status/{id}``; ``POST /cancel/{id}``. Statuses: IN_QUEUE, IN_PROGRESS,
COMPLETED, FAILED, CANCELLED. As on RunPod with ``return_aggregate_stream``, a finished job's
``output`` is the list of everything the handler yielded; an output with an ``error`` key fails
the job with ``"error": str(output["error"])``. ``webhook`` in a /run body gets the final status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from minivllm.input_checks import parse_json

logger = logging.getLogger(__name__)

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"
_DONE = (COMPLETED, FAILED, CANCELLED)


@dataclass
class _Job:
    id: str
    input: Any
    webhook: str | None = None
    status: str = IN_QUEUE
    outputs: list = field(default_factory=list)
    streamed: int = 0  # outputs already handed out by /stream
    error: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    task: asyncio.Task | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def status_body(self) -> dict:
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = round((self.started - self.submitted) * 1000)
            if self.ended is not None:
                body["executionTime"] = round((self.ended - self.started) * 1000)
        if self.status == COMPLETED:
            body["output"] = self.outputs
        if self.error is not None:
            body["error"] = self.error
        return body


# The bodies, for the OpenAPI schema (the routes build plain dicts).
class JobRequest(BaseModel):
    input: Any = Field(description="The job input the handler gets (any JSON).")
    webhook: str | None = Field(None, description="A URL that gets the final status as a POST.")


class JobState(BaseModel):
    id: str
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]


class JobStatus(JobState):
    delayTime: int | None = Field(None, description="ms in the queue, once started")
    executionTime: int | None = Field(None, description="ms running, once ended")
    output: list | None = Field(None, description="everything the handler yielded, once COMPLETED")
    error: str | None = None


class StreamOutput(BaseModel):
    output: Any


class JobStream(JobState):
    stream: list[StreamOutput]
    error: str | None = None


class RunPodError(BaseModel):
    error: str


_JOB_BODY = {"requestBody": {"required": True,
                             "content": {"application/json": {"schema": JobRequest.model_json_schema()}}}}
_SUBMIT_ERRORS = {400: {"model": RunPodError, "description": "Not a JSON object with an `input`, or a bad `wait`."},
                  503: {"model": RunPodError, "description": "The worker is shutting down."}}
_NOT_FOUND = {404: {"model": RunPodError, "description": "No such job (or its result expired)."}}
_BAD_WAIT = {400: {"model": RunPodError, "description": "`wait` is not an integer."}}


SHUTDOWN_MESSAGE = "the worker shut down before this job finished"


class RunPodJobs:
    """The emulated endpoint's jobs: at most ``max_concurrency`` run at once, the rest wait IN_QUEUE."""

    def __init__(self, handler, max_concurrency: int | None = None, result_ttl_s: float = 1800.0):
        self.handler = handler
        self.slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.result_ttl_s = result_ttl_s
        self.jobs: dict[str, _Job] = {}
        self.accepting = True
        self._webhooks: set[asyncio.Future] = set()

    async def drain(self, deadline: float) -> None:
        """Shutdown: let jobs run until ``deadline`` (loop time), fail the rest with a message,
        then wait (bounded) for every webhook to go out."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        pending = {j.task for j in self.jobs.values() if j.task is not None and not j.task.done()}
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        unfinished = [j for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for job in unfinished:
            job.error = SHUTDOWN_MESSAGE
            job.task.cancel()
        if unfinished:
            await asyncio.wait({j.task for j in unfinished})
        if self._webhooks:
            await asyncio.wait(self._webhooks, timeout=15)

    def submit(self, job_input: Any, webhook: str | None, sync: bool) -> _Job:
        self._evict()
        job = _Job(("sync-" if sync else "") + str(uuid.uuid4()), job_input, webhook)
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._execute(job))
        return job

    def _evict(self) -> None:
        now = time.monotonic()
        for job_id in [j.id for j in self.jobs.values() if j.ended and now - j.ended > self.result_ttl_s]:
            del self.jobs[job_id]

    async def _execute(self, job: _Job) -> None:
        try:
            if self.slots is not None:
                async with self.slots:
                    await self._run(job)
            else:
                await self._run(job)
        except asyncio.CancelledError:
            job.status = FAILED if job.error == SHUTDOWN_MESSAGE else CANCELLED
        finally:
            job.ended = time.monotonic()
            job.touch()
            if job.webhook:
                sent = asyncio.get_running_loop().run_in_executor(None, _post_webhook, job.webhook, job.status_body())
                self._webhooks.add(sent)
                sent.add_done_callback(self._webhooks.discard)

    async def _run(self, job: _Job) -> None:
        job.status, job.started = IN_PROGRESS, time.monotonic()
        job.touch()
        outputs = self.handler({"id": job.id, "input": job.input})
        try:
            async for output in outputs:
                if isinstance(output, dict) and output.get("error"):
                    job.status, job.error = FAILED, str(output["error"])
                    return
                job.outputs.append(output)
                job.touch()
            job.status = COMPLETED
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a handler bug (the worker's handler yields errors): FAILED, never stuck
            logger.exception("job %s: handler raised", job.id)
            job.status, job.error = FAILED, f"handler error: {type(e).__name__}: {e}"
        finally:
            await outputs.aclose()


def build_runpod_router(jobs: RunPodJobs) -> APIRouter:
    """Routes emulating a RunPod endpoint over ``jobs`` (whose handler is an async generator
    function taking ``{"id", "input"}``)."""
    router = APIRouter(tags=["RunPod"])

    async def read_request(request: Request) -> tuple[Any, str | None] | JSONResponse:
        if not jobs.accepting:
            return _error(503, "the worker is shutting down: submit the job again later")
        try:
            # Strings are the job's to check: as on RunPod, bad text fails the job, not the submit.
            body = parse_json(await request.body(), check_strings=False)
        except ValueError as e:
            return _error(400, f"{e} Send {{\"input\": {{...}}}}.")
        if not isinstance(body, dict) or "input" not in body:
            return _error(400, "the body must be a JSON object with an \"input\"")
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            return _error(400, "webhook must be a URL string")
        if webhook and not _is_http_url(webhook):
            return _error(400, f"webhook must be an http:// or https:// URL, got {webhook!r:.200}")
        return body["input"], webhook

    def find(job_id: str) -> _Job | JSONResponse:
        job = jobs.jobs.get(job_id)
        return job if job is not None else _error(404, f"job {job_id} not found")

    @router.post("/run", openapi_extra=_JOB_BODY, responses=_SUBMIT_ERRORS | {200: {"model": JobState}})
    async def run(request: Request):
        parsed = await read_request(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        job = jobs.submit(*parsed, sync=False)
        return {"id": job.id, "status": IN_QUEUE}

    @router.post("/runsync", openapi_extra=_JOB_BODY, responses=_SUBMIT_ERRORS | {200: {"model": JobStatus}})
    async def runsync(request: Request, wait: int = 90_000):
        parsed = await read_request(request)
        if isinstance(parsed, JSONResponse):
            return parsed
        job = jobs.submit(*parsed, sync=True)
        # asyncio.wait: a client that goes away does not cancel the job.
        await asyncio.wait({job.task}, timeout=_wait_s(wait))
        return job.status_body()

    async def stream(job_id: str, wait: int = 10_000):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        if job.streamed == len(job.outputs) and job.status not in _DONE:
            try:  # long-poll: until something new or the timeout
                await asyncio.wait_for(job.changed.wait(), _wait_s(wait))
            except asyncio.TimeoutError:
                pass
        new = job.outputs[job.streamed:]
        job.streamed += len(new)
        body = {"id": job.id, "status": job.status, "stream": [{"output": o} for o in new]}
        if job.error is not None:
            body["error"] = job.error
        return body

    async def status(job_id: str):
        job = find(job_id)
        return job if isinstance(job, JSONResponse) else job.status_body()

    @router.post("/cancel/{job_id}", responses=_NOT_FOUND | {200: {"model": JobState}})
    async def cancel(job_id: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        if job.status not in _DONE:
            job.task.cancel()
            await asyncio.wait({job.task})  # the handler has aborted its engine request
        return {"id": job.id, "status": job.status}

    for method in ("GET", "POST"):  # one route each: distinct OpenAPI operation ids
        router.add_api_route("/stream/{job_id}", stream, methods=[method],
                             responses=_NOT_FOUND | _BAD_WAIT | {200: {"model": JobStream}})
        router.add_api_route("/status/{job_id}", status, methods=[method],
                             responses=_NOT_FOUND | {200: {"model": JobStatus}})
    return router


def _wait_s(wait_ms: int) -> float:
    return min(max(wait_ms, 0), 300_000) / 1000


def _error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. "http://[::1"
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _post_webhook(url: str, body: dict) -> None:
    try:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
    except Exception as e:
        logger.warning("webhook %s failed: %s", url, e)
