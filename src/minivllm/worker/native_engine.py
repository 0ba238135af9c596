"""Native jobs (prompt | messages + sampling_params [+ model]) on the ModelManager's engines.

Stream output, one dict per batch (worker-vllm's keys, plus finish_reason and OpenAI usage names):
``{"choices": [{"index": 0, "tokens": ["Hel", "lo"], "finish_reason": None}],
"usage": {"input": N, "output": M, "prompt_tokens": N, "completion_tokens": M, "total_tokens": N+M}}``.
``tokens`` holds the text pieces new in this batch; ``usage`` counts real tokens so far (all
choices); ``finish_reason`` is set once that choice has finished. Non-stream: one such dict whose
``tokens`` is ``[whole text]``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from minivllm.engine.async_engine import AsyncEngine, EngineDeadError
from minivllm.model_manager import ModelManager
from minivllm.openai.errors import OpenAIError
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import RequestOutputKind
from minivllm.worker.batching import timed_batches
from minivllm.worker.config import WorkerConfig
from minivllm.worker.errors import job_error
from minivllm.worker.job_input import JobInput, JobInputError

logger = logging.getLogger(__name__)


class NativeEngine:
    def __init__(self, models: ModelManager, config: WorkerConfig):
        self.models = models
        self.config = config

    async def generate(self, job: JobInput, request_id: str) -> AsyncIterator[dict]:
        """Yield output batches, or one ``{"error": ...}``. If the job stops early (cancelled,
        closed), its engine stream's close aborts the request and awaits the free of its KV blocks.
        The job holds its model (loading it first if need be) until it ends."""
        try:
            params = job.make_sampling_params()
            async with self.models.lease(job.model) as loaded:
                engine = loaded.engine
                self._check_limits(engine, params)
                prompt = await asyncio.to_thread(self._prompt, engine, job)  # a big chat: off the event loop
                if job.stream:
                    params.output_kind = RequestOutputKind.DELTA
                    async with aclosing(self._stream(engine, job, prompt, params, request_id)) as batches:
                        async for batch in batches:
                            yield batch
                else:
                    params.output_kind = RequestOutputKind.FINAL_ONLY
                    final = None
                    async for out in engine.generate(prompt, params, request_id):
                        final = out  # FINAL_ONLY: the one and only output
                    yield _batch(final, [[c.text] for c in final.outputs], [c.finish_reason for c in final.outputs],
                                 sum(len(c.token_ids) for c in final.outputs))
        except (JobInputError, ValueError) as e:  # bad prompt or params, prompt too long, ...
            yield job_error(str(e))
        except OpenAIError as e:  # an unknown model, one that failed to load
            yield job_error(e.message)
        except EngineDeadError as e:
            yield job_error(str(e))
        except Exception as e:
            logger.exception("native job %s failed", request_id)
            yield job_error(f"internal error: {type(e).__name__}: {e}")

    def _check_limits(self, engine: AsyncEngine, params) -> None:
        self.config.check_sampling(n=params.n, logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
                                   stop=params.stop, where="sampling_params.")
        max_model_len = engine.engine.max_model_len
        if params.max_tokens is not None and params.max_tokens >= max_model_len:
            raise JobInputError(f"sampling_params.max_tokens is {params.max_tokens}, but max_model_len is "
                                f"{max_model_len} (prompt + output must fit)")

    def _prompt(self, engine: AsyncEngine, job: JobInput):
        messages = job.messages
        if messages is None and job.apply_chat_template:
            messages = [{"role": "user", "content": job.prompt}]
        if messages is None:
            return job.prompt
        try:
            return {"prompt_token_ids": engine.tokenizer.render_chat(messages)}
        except ValueError as e:
            raise JobInputError(str(e)) from None

    async def _stream(self, engine: AsyncEngine, job: JobInput, prompt, params, request_id: str
                      ) -> AsyncIterator[dict]:
        finish_reasons: list[str | None] = [None] * params.n
        completion_tokens = 0
        outputs = engine.generate(prompt, params, request_id)
        max_wait = self.config.stream_flush_ms / 1000
        groups = timed_batches(outputs, job.batch_size(self.config), _tokens_per_choice, max_wait)
        async with aclosing(groups):
            async for group in groups:
                pieces: list[list[str]] = [[] for _ in range(params.n)]
                for out in group:
                    for c in out.outputs:
                        if c.text:
                            pieces[c.index].append(c.text)
                        completion_tokens += len(c.token_ids)
                        finish_reasons[c.index] = c.finish_reason or finish_reasons[c.index]
                yield _batch(group[-1], pieces, finish_reasons, completion_tokens)


def _tokens_per_choice(out: RequestOutput) -> int:
    return max((len(c.token_ids) for c in out.outputs), default=0)


def _batch(out: RequestOutput, pieces: list[list[str]], finish_reasons: list, completion_tokens: int) -> dict:
    prompt_tokens = len(out.prompt_token_ids)
    return {
        "choices": [{"index": i, "tokens": p, "finish_reason": f}
                    for i, (p, f) in enumerate(zip(pieces, finish_reasons, strict=True))],
        "usage": {"input": prompt_tokens, "output": completion_tokens, "prompt_tokens": prompt_tokens,
                  "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }
