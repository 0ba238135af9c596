"""vLLM-compatible sampling parameters, validated on construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# The widest integers the engine's tensors (and torch's generators) take.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all text/tokens so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI clamps to [-100, 100])
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        for name in floats:
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                  f"{name} must be a finite number, got {value!r}")
        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and 0 <= self.top_k <= INT64_MAX,
              f"top_k must be -1 (disable), 0 or a positive integer <= {INT64_MAX}, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.seed is None or (isinstance(self.seed, int) and INT64_MIN <= self.seed <= INT64_MAX),
              f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}], got {self.seed!r}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
              f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop must be a non-empty string or a list of non-empty strings")
        check(all(isinstance(t, int) and 0 <= t <= INT64_MAX for t in self.stop_token_ids),
              "stop_token_ids must be non-negative integers")
        for token, bias in (self.logit_bias or {}).items():
            check(isinstance(token, int) and 0 <= token <= INT64_MAX,
                  f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
            check(isinstance(bias, (int, float)) and math.isfinite(bias),
                  f"logit_bias[{token}] must be a finite number, got {bias!r}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler must touch this request's logits row before choosing."""
        return bool(self.min_tokens or self.repetition_penalty != 1.0 or self.presence_penalty
                    or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def stop_buffer_length(self) -> int:
        """Characters held back from a stream because they may start a stop string."""
        if not self.stop_strings or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop_strings) - 1
