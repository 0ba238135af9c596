"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A full block is identified by a chained hash of (previous block's hash, its token ids); a new
sequence whose prompt starts with the same tokens reuses those blocks instead of recomputing them.
Freed blocks keep their hash until they are handed out again, least recently freed first.
"""

from __future__ import annotations

from minivllm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: LRU first
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks matching the sequence's leading full blocks; returns tokens reused.

        The block holding the last token is never taken from the cache: that token must run through
        the model to produce the next token's logits.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position to run through the model
        prev_hash = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((prev_hash, tokens))
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            prev_hash = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq.num_cached_tokens

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; all or nothing."""
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > len(self.free_block_ids):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that `num_tokens` computed tokens fill, so later sequences can share them.

        Called at schedule time: a block counts once this step will have written it, which is safe
        because each layer writes the step's K/V before any sequence attends.
        """
        # Only blocks of known tokens: a pending token (async scheduling) waits for a later call.
        num_full = min(num_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= len(seq.block_hashes) or not self.enable_prefix_caching:
            return
        prev_hash = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((prev_hash, tokens))
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block.block_id
            block.hash, block.token_ids = h, tokens
            seq.block_hashes.append(h)
            prev_hash = h

    def uncache_uncomputed(self, seq: Sequence) -> None:
        """Forget the hashes of blocks whose K/V the sequence has not written yet.

        cache_full_blocks registers a step's blocks before the model runs; when that step fails,
        they hold no (or stale) K/V and must never be matched by a later prompt.
        """
        keep = seq.num_computed_tokens // self.block_size
        for i in range(keep, len(seq.block_hashes)):
            block = self.blocks[seq.block_table[i]]
            if self.hash_to_block.get(block.hash) == block.block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        del seq.block_hashes[keep:]

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the shared prefix blocks are the last to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
