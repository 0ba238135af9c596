"""The RunPod job handler: one async generator for both job kinds, shared by src/handler.py and
the HTTP server's /run emulation."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, TextIO

from minivllm.engine.async_engine import AsyncEngine
from minivllm.limits import LimitError
from minivllm.model_manager import ModelManager
from minivllm.worker.config import WorkerConfig
from minivllm.worker.errors import job_error
from minivllm.worker.job_input import JobInput, JobInputError
from minivllm.worker.native_engine import NativeEngine
from minivllm.worker.openai_engine import OpenAIEngine

logger = logging.getLogger(__name__)


def make_handler(engine: AsyncEngine | None, serving, config: WorkerConfig | None = None, batches=None, *,
                 models: ModelManager | None = None) -> Callable[[dict], AsyncIterator[Any]]:
    """``handler(job)``: an async generator of output batches for ``{"id", "input"}``, on one
    model (``engine`` and its ``serving``, which may be None: no OpenAI routes) or on the
    ModelManager ``models``; ``batches`` (a BatchService) answers /v1/files and /v1/batches jobs.

    Never raises for a bad job: it yields ``{"error": ...}`` (RunPod then fails the job). When its
    task is cancelled, the engine request is aborted before the CancelledError propagates.
    """
    config = config or WorkerConfig()
    # One model: its serving answers OpenAI jobs as it is (anything with dispatch()).
    openai = OpenAIEngine(serving if models is None else models, config, batches)
    native = NativeEngine(models or ModelManager.serving_one(engine, serving), config)

    async def handler(job: dict) -> AsyncIterator[Any]:
        raw = job.get("input") if isinstance(job, dict) else None
        try:
            job_input = JobInput.parse(raw)
            config.check_size(job_input.size_bytes, "the job input")
        except (JobInputError, LimitError) as e:
            yield job_error(str(e))
            return
        if job_input.openai_route is not None or job_input.route is not None:
            outputs = openai.generate(job_input)
        else:
            job_id = job.get("id") or "job"
            outputs = native.generate(job_input, f"{job_id}-{uuid.uuid4().hex[:8]}")
        deadline = asyncio.get_running_loop().time() + config.request_timeout
        try:
            async with aclosing(outputs):
                while True:
                    try:  # past REQUEST_TIMEOUT, the wait is cancelled: that aborts the engine request
                        output = await _next_before(outputs, deadline)
                    except StopAsyncIteration:
                        break
                    except _RequestTimeout:
                        yield job_error(f"the job ran longer than REQUEST_TIMEOUT ({config.request_timeout:g} s)")
                        return
                    yield output
        except (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # e.g. a Rust panic (not an Exception): the job fails, never hangs
            logger.exception("job %s failed", job.get("id"))
            yield job_error(f"internal error: {type(e).__name__}: {e}")

    return handler


class _RequestTimeout(Exception):
    pass


async def _next_before(outputs: AsyncIterator, deadline: float):
    """The next output, awaited in this task (so a cancel from RunPod is never lost, as it can be
    with wait_for on Python 3.11), or _RequestTimeout at ``deadline`` (loop time)."""
    if sys.version_info < (3, 11):  # no asyncio.timeout_at
        try:
            return await asyncio.wait_for(outputs.__anext__(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise _RequestTimeout from None
    timeout = asyncio.timeout_at(deadline)
    try:
        async with timeout:
            return await outputs.__anext__()
    except TimeoutError:
        if timeout.expired():  # ours, not a TimeoutError the job itself raised
            raise _RequestTimeout from None
        raise


def make_concurrency_modifier(config: WorkerConfig) -> Callable[[int], int]:
    """RunPod's concurrency_modifier: always MAX_CONCURRENCY jobs at once."""
    def concurrency_modifier(current: int) -> int:
        return config.max_concurrency

    return concurrency_modifier


async def run_test_job(handler, job: dict, out: TextIO = sys.stdout) -> bool:
    """Run one job to the end, printing every output as a JSON line (what runpod's own
    --test_input cannot do for generator handlers). Returns False if the job failed."""
    job = {"id": "local_test", **job}
    ok = True
    async for output in handler(job):
        print(json.dumps(output, ensure_ascii=False), file=out, flush=True)
        if isinstance(output, dict) and "error" in output:
            ok = False
    return ok
