"""A request and its sequences (one per choice when n > 1): token ids, KV blocks, text so far."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from minivllm.outputs import Logprob
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from minivllm.engine.sampler import SampledTokens


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_arrival_counter = itertools.count()


class Sequence:
    def __init__(self, request: "Request", index: int, params: SamplingParams,
                 detokenizer: IncrementalDetokenizer):
        self.request = request
        self.index = index  # choice index within the request
        self.params = params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks
        # Speculative decoding: this step's draft tokens (set by the scheduler, never in token_ids until
        # accepted), the n-gram proposer's index of this sequence's tokens, an EAGLE-3 head's drafts.
        self.spec_token_ids: list[int] = []
        self.ngram_index = None
        self.draft_token_ids: list[int] = []
        # Async scheduling: tokens sampled but not yet processed, oldest first, as (the step's
        # sampled ids, this sequence's row); they count as tokens for scheduling (see num_tokens).
        self.pending_tokens: list[tuple["SampledTokens | list[int]", int]] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = detokenizer
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        # Prompt logprobs: entry p scores prompt token p given the tokens before it (entry 0 is None).
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)
        self.sent_text_len = 0  # for DELTA outputs: what the caller has already received
        self.sent_token_len = 0
        self.finish_reported = False  # DELTA outputs report a choice's finish once
        # Read once (the engine asks for them every step; params do not change after submission).
        self.stop_buffer_length = params.stop_buffer_length
        self.plain_greedy = _is_plain_greedy(params)
        self.output_kind = params.output_kind
        # Waiting-queue order: lower priority value first, then arrival (preempted ones keep theirs).
        self.sort_key = (request.priority, next(_arrival_counter))
        self.is_background = False  # priority >= the scheduler's background_priority (set when it is added)

    @property
    def num_tokens(self) -> int:
        """Tokens the model has or will have seen: token_ids plus any sampled but not yet processed."""
        return len(self.token_ids) + len(self.pending_tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def draft_room(self, max_model_len: int) -> int:
        """Drafts that can still be accepted: accepted drafts + the bonus token fit max_tokens and max_model_len."""
        room = max_model_len - len(self.token_ids) - 1
        if self.params.max_tokens is not None:
            room = min(room, self.params.max_tokens - self.num_output_tokens - 1)
        return room

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __lt__(self, other: "Sequence") -> bool:
        return self.sort_key < other.sort_key


def _is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy, with no logits adjustment and no logprobs: the argmax is the whole answer.

    Params that break these checks leave the request to the full sampler, which then fails this
    request alone inside a step (as it fails any request whose params it cannot use)."""
    try:
        return bool(params.greedy and params.logprobs is None and not params.adjusts_logits)
    except Exception:
        return False


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None

    @property
    def is_finished(self) -> bool:
        for seq in self.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True
