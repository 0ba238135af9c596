"""What the attention op needs to know about one engine step (filled by the model runner)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    # Per token: where its K/V goes in the flattened cache (block_id * block_size + offset).
    slot_mapping: torch.Tensor  # (T,) int64
    # Per sequence: its queries are tokens [query_start_loc[i], query_start_loc[i+1]) of the step,
    # and after this step its cache holds context_lens[i] tokens (the queries are the last ones).
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)
