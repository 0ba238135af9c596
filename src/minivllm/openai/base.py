"""What every OpenAI route shares: model check, length check, sampling params, the engine stream."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from minivllm.engine.async_engine import AsyncEngine, EngineDeadError
from minivllm.engine.llm_engine import check_token_ids
from minivllm.limits import LimitError, RequestLimits
from minivllm.openai.errors import OpenAIError, bad_request, not_found
from minivllm.openai.protocol import SamplingRequest
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams


# The scheduler priority of requests made in this context (lower runs first): the batch runner
# sets it in each line's task, so batch lines yield to real-time requests.
request_priority: contextvars.ContextVar[int] = contextvars.ContextVar("minivllm_request_priority", default=0)


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class ServingBase:
    def __init__(self, engine: AsyncEngine, model_name: str, max_model_len: int, *,
                 force_include_usage: bool = False, limits: RequestLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or RequestLimits()
        self.force_include_usage = force_include_usage  # ENABLE_FORCE_INCLUDE_USAGE: every stream
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = engine.tokenizer
        self.harmony = engine.tokenizer.harmony
        self.vocab_size = engine.engine.model_config.vocab_size
        # Set by the HTTP server to count requests in /metrics: called with the prompt length,
        # returns an object with on_output(RequestOutput) and on_end().
        self.request_observer: Callable[[int], Any] | None = None

    def include_usage(self, req: SamplingRequest) -> bool:
        """Whether a stream ends with a usage chunk (and its other chunks carry "usage": null)."""
        return self.force_include_usage or bool(req.stream_options and req.stream_options.include_usage)

    def check_tools(self, tools: list | None) -> None:
        try:
            self.limits.check_tools(tools)
        except LimitError as e:
            raise bad_request(str(e), "tools") from None

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:  # absent or "": the served model
            raise not_found(f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                            code="model_not_found")

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        if not token_ids:
            raise bad_request("The prompt is empty.", param)
        self._check_vocab(token_ids, param)

    def _check_vocab(self, token_ids, param: str) -> None:
        try:
            check_token_ids(token_ids, self.vocab_size, param)
        except ValueError as e:
            raise bad_request(str(e), param) from None

    def logit_bias(self, req: SamplingRequest) -> dict[int, float] | None:
        """OpenAI's {"token id": bias} -> {id: bias clamped to [-100, 100]}, as vLLM does."""
        if not req.logit_bias:
            return None
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias: key {key!r} is not a token id (an integer string).",
                                  "logit_bias") from None
            bias[token] = min(100.0, max(-100.0, value))
        self._check_vocab(bias, "logit_bias")
        return bias

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, what: str,
                           param: str = "max_tokens") -> int:
        """The output budget; a request that cannot fit fails naming the numbers (vLLM's wording)."""
        limit = self.max_model_len
        if max_tokens is None:
            if prompt_len >= limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{prompt_len} input tokens (in the {what}), which leaves no room for output. Please reduce "
                    f"the length of the {what}.", what)
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
                f"Please reduce the length of the {what} or completion.", param)
        return max_tokens

    def sampling_params(self, req: SamplingRequest, max_tokens: int, logprobs_name: str = "logprobs",
                        **extra) -> SamplingParams:
        if req.prompt_logprobs is not None and req.stream:
            raise bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        try:
            self.limits.check_sampling(n=req.n, logprobs=extra.get("logprobs"), logprobs_name=logprobs_name,
                                       prompt_logprobs=extra.get("prompt_logprobs", req.prompt_logprobs), stop=req.stop)
        except LimitError as e:
            raise bad_request(str(e), e.param) from None
        # Checked here, not only by the engine: a stream has already sent its first chunk by then.
        self._check_vocab(req.stop_token_ids or [], "stop_token_ids")
        values = {"n": req.n, "max_tokens": max_tokens, "min_tokens": min(req.min_tokens, max_tokens),
                  "seed": req.seed, "stop": req.stop, "stop_token_ids": req.stop_token_ids,
                  "ignore_eos": req.ignore_eos, "include_stop_str_in_output": req.include_stop_str_in_output,
                  "logit_bias": self.logit_bias(req),
                  "output_kind": RequestOutputKind.DELTA}
        optional = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
                    "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                    "repetition_penalty": req.repetition_penalty}
        values.update({k: v for k, v in optional.items() if v is not None})
        values.update(extra)
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise bad_request(str(e)) from None

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """The engine's DELTA stream; closing this iterator aborts the request (frees its KV)."""
        tracker = self.request_observer(len(prompt_ids)) if self.request_observer else None
        try:
            stream = self.engine.generate({"prompt_token_ids": prompt_ids, "prompt": prompt_text}, params,
                                          request_id, priority=request_priority.get())
            async with aclosing(stream):
                async for out in stream:
                    if tracker is not None:
                        tracker.on_output(out)
                    yield out
        except EngineDeadError as e:
            raise OpenAIError(f"The engine is not running: {e}", 503) from None
        except ValueError as e:  # the engine's own validation of the request
            raise bad_request(str(e)) from None
        except RuntimeError as e:  # a failed engine step fails its requests
            raise OpenAIError(str(e), 500) from None
        finally:
            if tracker is not None:
                tracker.on_end()


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several streams as (stream index, item); closing the merge closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait((i, item, None))
        except Exception as e:  # noqa: BLE001 -- re-raised in the consumer
            queue.put_nowait((i, None, e))
        else:
            queue.put_nowait((i, done, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
