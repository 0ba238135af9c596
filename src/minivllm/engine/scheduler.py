"""Continuous batching: each step mixes decodes and (chunked) prefills under a token budget.

Running sequences go first, in admission order; then waiting ones (lowest priority value, then
oldest) while the budget, `max_num_seqs` and free KV blocks allow. When a running sequence needs a
block and none is free, the least important running sequence is preempted: its blocks are freed
and it is recomputed later (its tokens are kept, so the prefix cache often makes that cheap).

Background requests (priority >= `background_priority`: the Batch API's lines) use idle capacity
only: in a step with any other request running or waiting they are paused (their blocks kept), are
the first to give up a sequence slot or their blocks to an arriving request, and are not admitted.
On the reference path every sequence in a step lengthens it, so this is what keeps a real-time
request's latency beside a running batch at its idle value.

Async scheduling: a sequence's token sampled by the step still in flight is pending (counted by
Sequence.num_tokens, value unknown here), so the sequence is scheduled as a decode of it; one whose
pending token reaches max_tokens or max_model_len is not. Its block is registered for the prefix
cache once the token is known.

Speculative decoding (EAGLE-3 or n-gram): once the real work is placed, decodes get draft tokens from the
token budget that is left, so drafts never displace a prefill chunk, a decode or an admission,
and never cause a preemption (a draft that needs a block none is free for is dropped). It is off
for a step with more than `disable_by_batch_size` running sequences (a big batch keeps the device
busy already), and in a step that preempted (the KV cache is short).
"""

from __future__ import annotations

import bisect

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus
from minivllm.engine.spec_decode.eagle3 import Eagle3Proposer
from minivllm.engine.spec_decode.ngram import NgramProposer

# The token budget of a step of background work only: a real-time request that arrives waits for
# at most such a short step (on a GPU, a step this size costs about what a decode step costs).
BACKGROUND_STEP_TOKENS = 256
LONG_CONTEXT = 8192  # context up to which a prefill chunk may use the whole token budget beside other work


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 proposer: NgramProposer | Eagle3Proposer | None = None, max_model_len: int | None = None,
                 disable_by_batch_size: int = 0, background_priority: int | None = None,
                 fixed_chunks: bool = False):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.disable_by_batch_size = disable_by_batch_size
        self.background_priority = background_priority
        # Deterministic mode: a prefill chunk is always min(what is left, fixed_chunk) tokens, alone or
        # beside others (it waits a step rather than shrink), so a prompt's chunks never depend on the
        # batch. Beside at most max_num_seqs - 1 decodes, the first chunk of a step always fits.
        self.fixed_chunk = max_num_batched_tokens - max_num_seqs + 1 if fixed_chunks else None
        self.drafted: list[Sequence] = []  # sequences given drafts by the last schedule()
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.is_background = self.background_priority is not None and seq.sort_key[0] >= self.background_priority
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort); a token it has
        pending (async scheduling) is dropped."""
        seq.pending_tokens.clear()
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        # Blocks registered for a chunk scheduled but never run (its request failed or was aborted
        # in between) hold no K/V: no later prompt may match them.
        self.block_manager.uncache_uncomputed(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick this step's work: (sequence, number of its tokens to run through the model)."""
        if self.drafted:
            for seq in self.drafted:
                seq.spec_token_ids = []
            self.drafted = []
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        # `running` and `waiting` are sorted most important first: only a prefix of them runs.
        foreground = self._has_foreground()
        budget = self.max_num_batched_tokens
        if not foreground and self.fixed_chunk is None:  # background work only (or none)
            budget = min(budget, BACKGROUND_STEP_TOKENS)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if foreground and seq.is_background:
                break  # paused: every later one is background too
            if seq.pending_tokens and self._reaches_length(seq):
                i += 1  # its pending token ends it (async scheduling): running it again would be waste
                continue
            if self._is_ready_decode(seq):
                scheduled.append((seq, 1))
                budget -= 1
                i += 1
                continue
            num_new = self._chunk(seq, budget)
            if num_new == 0:  # a fixed-size chunk that does not fit this step
                i += 1
                continue
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + num_new):
                victim = max(self.running[i:], key=lambda s: s.sort_key)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._schedule(seq, num_new, scheduled)
                budget -= num_new
                i += 1
        # Admitting new work right after a preemption would only thrash the cache.
        while not preempted and self.waiting and budget > 0:
            seq = self.waiting[0]
            if foreground and seq.is_background:
                break
            if len(self.running) >= self.max_num_seqs and not self._yield_background(seq):
                break
            self.block_manager.allocate_cached_prefix(seq)
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self._reserve(seq, num_new):
                self.block_manager.free(seq)
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            # Keep `running` most important first: then a preemption victim taken from running[i:]
            # (the not yet scheduled part) is the least important running sequence overall, never a
            # high-priority one while a lower-priority one that was admitted earlier keeps its blocks.
            bisect.insort(self.running, seq)
            self._schedule(seq, num_new, scheduled)
            budget -= num_new
        if (self.proposer is not None and budget > 0 and not preempted
                and len(self.running) <= self.disable_by_batch_size):
            self._add_drafts(scheduled, budget)
        return scheduled

    def _add_drafts(self, scheduled: list[tuple[Sequence, int]], budget: int) -> None:
        """Give decodes draft tokens from the leftover budget, in scheduling order."""
        bm = self.block_manager
        for i, (seq, num_new) in enumerate(scheduled):
            if num_new != 1 or seq.num_computed_tokens + 1 != len(seq.token_ids):
                continue  # a prefill chunk
            room = seq.draft_room(self.max_model_len)
            if room <= 0:
                continue
            draft = self.proposer.propose(seq, min(room, budget))
            if not draft or not bm.ensure_slots(seq, len(seq.token_ids) + len(draft)):
                continue
            seq.spec_token_ids = draft
            self.drafted.append(seq)
            scheduled[i] = (seq, 1 + len(draft))
            budget -= len(draft)
            if budget == 0:
                return

    def _has_foreground(self) -> bool:
        """Whether a request that is not background is running or waiting (both queues are sorted)."""
        return any(queue and not queue[0].is_background for queue in (self.running, self.waiting))

    def _yield_background(self, seq: Sequence) -> bool:
        """Preempt the least important running sequence for arriving `seq` if that one is background
        and `seq` is not: a batch line gives its slot or blocks to a real-time request at once."""
        victim = self.running[-1] if self.running else None
        if victim is None or seq.is_background or not victim.is_background:
            return False
        self.preempt(victim)
        return True

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        """KV slots for `num_new` more tokens of an arriving sequence, freed from background ones if need be."""
        while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + num_new):
            if not self._yield_background(seq):
                return False
        return True

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of `seq`'s uncomputed tokens run this step (0: none, it waits)."""
        left = seq.num_tokens - seq.num_computed_tokens
        if self.fixed_chunk is not None:
            num_new = min(left, self.fixed_chunk)
            return num_new if num_new <= budget else 0
        return min(left, budget, self._chunk_cap(seq))

    def _chunk_cap(self, seq: Sequence) -> int:
        """The largest prefill chunk for ``seq`` this step. Alone, the whole budget. Beside other
        running sequences, a long prompt's chunk shrinks as its context grows: a step's attention
        work grows with chunk x context, and every running stream waits for the step, so its
        chunks keep the work of a full-budget chunk over LONG_CONTEXT tokens (a 100k-token prompt
        goes in chunks of ~700 tokens near its end instead of 8192, and streams keep flowing)."""
        if not self.running or (len(self.running) == 1 and self.running[0] is seq):
            return self.max_num_batched_tokens
        budget = self.max_num_batched_tokens
        return max(self.block_manager.block_size, budget * LONG_CONTEXT // (seq.num_computed_tokens + budget))

    def _reaches_length(self, seq: Sequence) -> bool:
        """Whether the sequence's tokens, pending ones included, already reach max_tokens or max_model_len."""
        num_tokens, max_tokens = seq.num_tokens, seq.params.max_tokens
        return ((self.max_model_len is not None and num_tokens >= self.max_model_len)
                or (max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens))

    def _is_ready_decode(self, seq: Sequence) -> bool:
        """A decode whose token already has a KV slot and fills no block: the common case.

        Scheduling it needs no new block (what ensure_slots would check) and registers nothing
        for the prefix cache (what cache_full_blocks would do), so both calls can be skipped:
        plain integer checks instead, as most steps are all decodes.
        """
        computed = seq.num_computed_tokens
        uncomputed = len(seq.token_ids) - computed  # 0 with one token pending (async scheduling)
        bm = self.block_manager
        return ((uncomputed == 1 or (uncomputed == 0 and len(seq.pending_tokens) == 1))
                and computed < len(seq.block_table) * bm.block_size
                and (not bm.enable_prefix_caching or (computed + 1) // bm.block_size <= len(seq.block_hashes)))

    def _schedule(self, seq: Sequence, num_new: int, scheduled: list) -> None:
        scheduled.append((seq, num_new))
        # Registered now, not after the loop: a sibling (n > 1) or another request with the same
        # prefix admitted later in this very step already shares these blocks.
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + num_new)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it again: it is recomputed later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        self.num_preemptions += 1
        self.add(seq)
