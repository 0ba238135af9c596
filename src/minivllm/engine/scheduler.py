"""Continuous batching: each step mixes decodes and (chunked) prefills under a token budget.

Running sequences go first, in admission order; then waiting ones (lowest priority value, then
oldest) while the budget, `max_num_seqs` and free KV blocks allow. When a running sequence needs a
block and none is free, the least important running sequence is preempted: its blocks are freed
and it is recomputed later (its tokens are kept, so the prefix cache often makes that cheap).
"""

from __future__ import annotations

import bisect

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick this step's work: (sequence, number of its tokens to run through the model)."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._is_ready_decode(seq):
                scheduled.append((seq, 1))
                budget -= 1
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + num_new):
                victim = max(self.running[i:], key=lambda s: s.sort_key)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._schedule(seq, num_new, scheduled)
                budget -= num_new
                i += 1
        # Admitting new work right after a preemption would only thrash the cache.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.allocate_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + num_new):
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
        return scheduled

    def _is_ready_decode(self, seq: Sequence) -> bool:
        """A decode whose token already has a KV slot and fills no block: the common case.

        Scheduling it needs no new block (what ensure_slots would check) and registers nothing
        for the prefix cache (what cache_full_blocks would do), so both calls can be skipped:
        plain integer checks instead, as most steps are all decodes.
        """
        num_tokens = len(seq.token_ids)
        computed = seq.num_computed_tokens
        bm = self.block_manager
        return (num_tokens - computed == 1 and computed < len(seq.block_table) * bm.block_size
                and (not bm.enable_prefix_caching or num_tokens // bm.block_size <= len(seq.block_hashes)))

    def _schedule(self, seq: Sequence, num_new: int, scheduled: list) -> None:
        scheduled.append((seq, num_new))
        # Registered now, not after the loop: a sibling (n > 1) or another request with the same
        # prefix admitted later in this very step already shares these blocks.
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + num_new)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        self.num_preemptions += 1
        self.add(seq)
