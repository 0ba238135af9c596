"""OpenAI jobs (openai_route + openai_input) and route jobs (route + body + method) through the
same serving layer as the HTTP server.

Non-stream: the response object, once. Stream: batches of SSE events (growing sizes, as native
jobs): each batch is raw SSE text (``data: {json}\\n\\n`` ...), the last ending in
``data: [DONE]\\n\\n``, which the RunPod gateway relays as the SSE body; an OpenAI job with
RAW_OPENAI_OUTPUT=0 gets lists of chunk objects instead. Errors: the OpenAI error body, which
fails the job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, nullcontext
from typing import Any

from minivllm.openai.errors import OpenAIError
from minivllm.worker.batching import timed_batches
from minivllm.worker.config import WorkerConfig
from minivllm.worker.errors import openai_error
from minivllm.worker.job_input import JobInput

logger = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker: becomes "data: [DONE]"


class OpenAIEngine:
    def __init__(self, serving, config: WorkerConfig, batches=None):
        """``serving``: an OpenAIServing (``async dispatch(route, body) -> dict | AsyncIterator``);
        ``batches``: a BatchService for /v1/files and /v1/batches jobs, or None."""
        self.serving = serving
        self.config = config
        self.batches = batches

    async def generate(self, job: JobInput) -> AsyncIterator[Any]:
        if self.serving is None:
            yield openai_error(OpenAIError("the OpenAI routes are not available in this worker", 503).to_dict())
            return
        if job.route is not None:
            route, body, method, raw_sse = job.route, job.body, job.route_method, True
        else:
            route, body, method, raw_sse = job.openai_route, job.openai_input, None, self.config.raw_openai_output
        if self.batches is not None and self.batches.handles(route):
            try:
                await self.batches.ensure_started()  # the runner lives on the worker's event loop
                yield await self.batches.dispatch(route, body, method)
            except OpenAIError as e:
                yield openai_error(e.to_dict())
            return
        try:
            result = await self.serving.dispatch(route, body, method)
            if isinstance(result, dict):
                yield openai_error(result) if "error" in result else result
                return
            max_wait = self.config.stream_flush_ms / 1000
            # Closing the serving layer's stream aborts its engine request.
            async with aclosing(result) if hasattr(result, "aclose") else nullcontext():
                groups = timed_batches(_with_done(result), job.batch_size(self.config), _weight, max_wait)
                async with aclosing(groups):
                    async for events in groups:
                        if raw_sse:
                            yield "".join(_sse(e) for e in events)
                        else:
                            chunks = [e for e in events if e is not _DONE]
                            if chunks:
                                yield chunks
        except OpenAIError as e:
            yield openai_error(e.to_dict())
        except Exception as e:
            logger.exception("OpenAI job on %s failed", route)
            yield openai_error(OpenAIError(f"internal error: {type(e).__name__}: {e}", 500).to_dict())


async def _with_done(stream: AsyncIterator[dict]) -> AsyncIterator[Any]:
    async for chunk in stream:
        yield chunk
    yield _DONE


def _weight(event) -> int:
    return 0 if event is _DONE else 1  # [DONE] rides along with the last batch


def _sse(event) -> str:
    if event is _DONE:
        return "data: [DONE]\n\n"
    # Typed events (Responses, Anthropic) name themselves on an `event:` line, as over HTTP.
    name = f"event: {event['type']}\n" if isinstance(event.get("type"), str) else ""
    return f"{name}data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
