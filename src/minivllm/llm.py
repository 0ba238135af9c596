"""Offline batch inference with vLLM's API: LLM(model).generate(prompts, params) / .chat(messages)."""

from __future__ import annotations

import dataclasses
import itertools

from tqdm import tqdm

from minivllm.config import EngineArgs
from minivllm.engine.llm_engine import LLMEngine, PromptType
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType], sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        # Validate every prompt before any runs, so a bad one fails the call without partial work.
        requests = [
            self.engine.make_request(str(next(self._ids)), prompt,
                                     dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY),
                                     priority[i] if priority else 0)
            for i, (prompt, p) in enumerate(zip(prompts, params_list))
        ]
        for request in requests:
            self.engine.add_request(request.request_id, request)
        return self._run(requests, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list | None = None,
             use_tqdm: bool = True, reasoning_effort: str | None = None, tools: list[dict] | None = None
             ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tokenizer.render_chat(conv, reasoning_effort=reasoning_effort, tools=tools)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm or len(requests) < 2) as bar:
                while self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    failed = self.engine.take_failed()
                    if failed:
                        request_id, error = failed[0]
                        raise RuntimeError(f"request {request_id} failed: {type(error).__name__}: {error}") from error
                    for out in outputs:
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            # A failed step (or Ctrl-C): drop this call's requests, else they keep their KV blocks
            # and run again inside every later generate() call.
            for r in requests:
                self.engine.abort_request(r.request_id)
            raise
        return [results[r.request_id] for r in requests]
