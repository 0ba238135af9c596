"""POST /v1/completions: plain-text prompts (strings or token ids, one or many), echo, logprobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from minivllm.openai.base import ServingBase, merge_streams, random_id
from minivllm.openai.errors import bad_request
from minivllm.openai.logprobs import append_completion_logprobs, prompt_logprobs_json
from minivllm.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)


@dataclass
class Prompt:
    text: str
    token_ids: list[int]


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    offset: int = 0  # text_offset of the next token
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    started: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionServing(ServingBase):
    def prompts(self, prompt) -> list[Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty.", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(Prompt(p, self.tokenizer.encode(p)))
            else:
                self.check_token_ids(p)  # before decoding: out-of-range ids cannot be decoded
                out.append(Prompt(self.tokenizer.decode(p, skip_special_tokens=False), list(p)))
        return out

    async def create(self, req: CompletionRequest) -> dict | AsyncIterator[dict]:
        self.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported by this server.", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n: this server does not rank extra candidates.", "best_of")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        prompts = await asyncio.to_thread(self.prompts, req.prompt)  # O(input) work stays off the event loop
        params = []
        for p in prompts:
            self.check_token_ids(p.token_ids)
            max_tokens = self.resolve_max_tokens(len(p.token_ids), req.max_tokens, "prompt")
            echo_logprobs = req.logprobs if req.echo else None
            wanted = [k for k in (echo_logprobs, req.prompt_logprobs) if k is not None]
            params.append(self.sampling_params(
                req, max_tokens, logprobs=req.logprobs, skip_special_tokens=req.skip_special_tokens,
                prompt_logprobs=max(wanted) if wanted else None))
        request_id = random_id("cmpl-")
        streams = [self.generate(p.token_ids, sp, f"{request_id}-{i}", p.text)
                   for i, (p, sp) in enumerate(zip(prompts, params))]
        choices = [ChoiceState(logprobs=CompletionLogprobs() if req.logprobs is not None else None)
                   for _ in range(len(prompts) * req.n)]
        if req.stream:
            return self._stream(req, request_id, prompts, streams, choices, self.include_usage(req))
        return await self._complete(req, request_id, prompts, streams, choices)

    def _add(self, req: CompletionRequest, st: ChoiceState, prompt: Prompt, out, c) -> str:
        """Take one output delta into the choice; returns its new text (the echoed prompt first)."""
        text = c.text
        if not st.started:
            st.started = True
            if req.echo:
                if st.logprobs is not None:
                    st.offset = append_completion_logprobs(st.logprobs, prompt.token_ids, out.prompt_logprobs,
                                                           st.offset, self.tokenizer)
                else:
                    st.offset = len(prompt.text)
                text = prompt.text + text
        st.text.append(text)
        st.num_tokens += len(c.token_ids)
        st.token_ids.extend(c.token_ids)
        if st.logprobs is not None and c.token_ids:
            st.offset = append_completion_logprobs(st.logprobs, c.token_ids, c.logprobs, st.offset)
        if c.finish_reason is not None:
            st.finish_reason, st.stop_reason = c.finish_reason, c.stop_reason
        return text

    async def _complete(self, req, request_id, prompts, streams, choices) -> dict:
        n = req.n
        cached = [0] * len(prompts)
        prompt_logprobs: list = [None] * len(prompts)
        async with aclosing(merge_streams(streams)) as merged:
            async for p, out in merged:
                cached[p] = out.num_cached_tokens
                prompt_logprobs[p] = out.prompt_logprobs or prompt_logprobs[p]
                for c in out.outputs:
                    if choices[p * n + c.index].finish_reason is None:  # finished choices are reported again
                        self._add(req, choices[p * n + c.index], prompts[p], out, c)
        response = CompletionResponse(
            id=request_id, model=self.model_name,
            choices=[CompletionChoice(index=i, text="".join(st.text), logprobs=st.logprobs,
                                      finish_reason=st.finish_reason, stop_reason=st.stop_reason)
                     for i, st in enumerate(choices)],
            usage=self._usage(prompts, choices, cached)).model_dump()
        if req.prompt_logprobs is not None:  # vLLM's extra field, per choice
            for i, choice in enumerate(response["choices"]):
                choice["prompt_logprobs"] = prompt_logprobs_json(prompt_logprobs[i // n])
        if req.return_token_ids:  # vLLM's extra fields, per choice (prompts differ between choices)
            for i, (choice, st) in enumerate(zip(response["choices"], choices)):
                choice["prompt_token_ids"], choice["token_ids"] = prompts[i // n].token_ids, st.token_ids
        return response

    async def _stream(self, req, request_id, prompts, streams, choices, include_usage) -> AsyncIterator[dict]:
        created, n = int(time.time()), req.n

        def chunk(choice: CompletionChoice | None, usage: Usage | None = None) -> dict:
            c = CompletionResponse(id=request_id, created=created, model=self.model_name,
                                   choices=[choice] if choice else [], usage=usage)
            return c.model_dump(exclude=None if include_usage else {"usage"})

        cached = [0] * len(prompts)
        async with aclosing(merge_streams(streams)) as merged:
            async for p, out in merged:
                cached[p] = out.num_cached_tokens
                for c in out.outputs:
                    i = p * n + c.index
                    st = choices[i]
                    if st.finish_reason is not None:  # finished choices are reported again
                        continue
                    first = not st.started
                    text = self._add(req, st, prompts[p], out, c)
                    new_ids = c.token_ids if req.return_token_ids else None
                    if text or c.finish_reason is not None or (st.logprobs is not None and st.logprobs.tokens) \
                            or new_ids or (first and req.return_token_ids):
                        body = chunk(CompletionChoice(index=i, text=text, logprobs=_take(st),
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                        if req.return_token_ids:
                            body["choices"][0]["token_ids"] = list(c.token_ids)
                            if first:
                                body["choices"][0]["prompt_token_ids"] = prompts[p].token_ids
                        yield body
        if include_usage:
            yield chunk(None, self._usage(prompts, choices, cached))

    @staticmethod
    def _usage(prompts: list[Prompt], choices: list[ChoiceState], cached: list[int]) -> Usage:
        return Usage.of(sum(len(p.token_ids) for p in prompts), sum(st.num_tokens for st in choices), sum(cached))


def _take(st: ChoiceState) -> CompletionLogprobs | None:
    """Streaming sends each token's logprobs once: hand out what accumulated and start afresh."""
    if st.logprobs is None:
        return None
    taken, st.logprobs = st.logprobs, CompletionLogprobs()
    return taken
