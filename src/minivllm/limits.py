"""How much one request may ask for: one table for every door (OpenAI routes, RunPod jobs).

Each limit is a setting read from its UPPER_CASE environment variable (the worker's config
inherits these fields); a request past one fails at the edge, before any work, with a message
naming the limit and its variable.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class LimitError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param  # the request field past its limit


class RequestLimits(BaseModel):
    max_n: int = Field(128, ge=1, description="Most choices (n) one request may ask for.")
    max_logprobs: int = Field(
        20, ge=0, le=20,
        description="Most logprobs / top_logprobs / prompt_logprobs per token (20 at most, as OpenAI).")
    max_prompt_bytes: int = Field(
        32 << 20, ge=1, description="Largest request body / job input, in bytes (it holds the prompt).")
    max_stop_sequences: int = Field(64, ge=0, description="Most stop strings one request may give.")
    max_tools: int = Field(128, ge=0, description="Most tools one request may declare (OpenAI's 128).")

    def limits(self) -> RequestLimits:
        """Just the limits (a subclass, e.g. the worker's config, carries more)."""
        return RequestLimits(**{name: getattr(self, name) for name in RequestLimits.model_fields})

    def check_sampling(self, *, n: int = 1, logprobs: int | None = None, prompt_logprobs: int | None = None,
                       stop: str | list | None = None, where: str = "", logprobs_name: str = "logprobs") -> None:
        _at_most(n, self.max_n, f"{where}n", "MAX_N")
        for name, value in ((logprobs_name, logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None:
                _at_most(value, self.max_logprobs, f"{where}{name}", "MAX_LOGPROBS")
        if isinstance(stop, list):
            _at_most(len(stop), self.max_stop_sequences, f"{where}stop", "MAX_STOP_SEQUENCES",
                     "the number of stop strings")

    def check_tools(self, tools: list | None, where: str = "") -> None:
        if tools:
            _at_most(len(tools), self.max_tools, f"{where}tools", "MAX_TOOLS", "the number of tools")

    def check_size(self, num_bytes: int, what: str) -> None:
        _at_most(num_bytes, self.max_prompt_bytes, what, "MAX_PROMPT_BYTES", "bytes")


def _at_most(value: int, limit: int, param: str, env: str, counted: str | None = None) -> None:
    if value > limit:
        what = f"{param} ({counted})" if counted else param
        raise LimitError(f"{what} is {value}, more than this server's limit of {limit} (set by {env}).", param)
