"""EAGLE-3 proposals: right after each step, the head drafts the next step's tokens.

The head's rows pair the target's aux hidden states at position p with token p + 1, so after a step
it first catches up on every position the step verified (prefill chunk rows, decode rows, the
accepted rows of a verification), in one batched forward that writes the head's K/V for them. A
sequence that decodes next takes its first draft from its last caught-up row, then k - 1 more
from single-row forwards that feed back the head's own hidden states, at positions len - 1,
len, ... (their K/V is scratch: the next catch-up overwrites it with the verified tokens' K/V).
Drafts are the head's argmax, so each is a point mass and the rejection sampler's test (accept d
with probability p(d)) keeps the target's distribution.

The head's K/V lives in its own tensor at the target's block and slot for each position, so it is
paged, preempted and freed with the sequence. A prefix-cache hit reuses the head's K/V of the
shared blocks as their first owner wrote it; the last slot of a block then saw that owner's next
token, which only lowers the hit's first acceptances (outputs never depend on drafts).
"""

from __future__ import annotations

import torch

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus


class Eagle3Proposer:
    def __init__(self, runner, block_manager: BlockManager, num_speculative_tokens: int, max_model_len: int):
        self.runner = runner
        self.head = runner.draft
        self.block_manager = block_manager
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The scheduler's call: the tokens drafted for `seq` after its last step (at most max_tokens)."""
        return seq.draft_token_ids[:max_tokens]

    @torch.inference_mode()
    def after_step(self, rows: list[tuple[Sequence, int, torch.Tensor]], draft: bool, spare_blocks: int) -> None:
        """rows: per sequence that ran, (sequence, its first position in the step, the aux hidden
        states of its step rows). draft: whether to draft at all (off for large batches); drafting
        leaves `spare_blocks` free blocks for the scheduler's own needs."""
        catch_up, states, drafting = [], [], []
        num_rows = 0
        for seq, first, aux in rows:
            seq.draft_token_ids = []
            if seq.status is not SequenceStatus.RUNNING:
                continue
            # The rows whose position is verified and whose next token is known.
            n = min(len(aux), seq.num_computed_tokens - first, len(seq.token_ids) - 1 - first)
            if n <= 0:
                continue
            catch_up.append((seq.block_table, first, seq.token_ids[first + 1:first + 1 + n]))
            states.append(aux[:n])
            num_rows += n
            if draft and seq.num_computed_tokens == len(seq.token_ids) - 1:
                k = min(self.k, seq.draft_room(self.max_model_len))
                if k > 0:
                    drafting.append((seq, k, num_rows - 1))
        if not catch_up:
            return
        normed, fed_back = self.runner.run_draft(catch_up, self.head.combine(torch.cat(states)))
        if not drafting:
            return
        last_rows = [row for _, _, row in drafting]
        for (seq, _, _), token in zip(drafting, self.head.draft_tokens(normed[last_rows]).tolist()):
            seq.draft_token_ids = [token]
        hidden = fed_back[last_rows]
        active = [(seq, k) for seq, k, _ in drafting]
        for j in range(1, self.k):
            step, keep = [], []
            for i, (seq, k) in enumerate(active):
                pos = len(seq.token_ids) - 2 + j  # draft j - 1 follows the token at this position
                if j < k and self._slot(seq, pos, spare_blocks):
                    step.append((seq.block_table, pos, seq.draft_token_ids[-1:]))
                    keep.append(i)
            if not step:
                return
            normed, hidden = self.runner.run_draft(step, hidden[keep])
            active = [active[i] for i in keep]
            for (seq, _), token in zip(active, self.head.draft_tokens(normed).tolist()):
                seq.draft_token_ids.append(token)

    def _slot(self, seq: Sequence, pos: int, spare_blocks: int) -> bool:
        """Whether position `pos` has a KV slot, taking a free block for it only beyond `spare_blocks`."""
        bm = self.block_manager
        if bm.blocks_needed(pos + 1) <= len(seq.block_table):
            return True
        return bm.num_free_blocks > spare_blocks and bm.ensure_slots(seq, pos + 1)
