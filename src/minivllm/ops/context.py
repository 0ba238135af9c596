"""What the attention op needs to know about one engine step (filled by the model runner)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionContext:
    # Per token: where its K/V goes in the flattened cache (block_id * block_size + offset).
    slot_mapping: torch.Tensor  # (T,) int64
    # Per sequence: its queries are tokens [query_start_loc[i], query_start_loc[i+1]) of the step,
    # and after this step its cache holds context_lens[i] tokens (the queries are the last ones).
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # (B, max_blocks) int32 (the FA3 page_table dtype) or int64, padded with 0
    block_size: int
    # The lengths again as int32 device tensors, for kernels; CUDA graphs pass their fixed buffers
    # here. Left None, `device_lens` builds them once per step from the lists.
    query_start_loc_t: torch.Tensor | None = None  # (B + 1,)
    context_lens_t: torch.Tensor | None = None  # (B,)
    max_query_len: int | None = None
    # The reference attention's gather plan of this step, per sliding window (made by the first
    # layer, reused by the others).
    reference_plans: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def device_lens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query_start_loc, context_lens) as int32 tensors on the cache's device."""
        if self.query_start_loc_t is None or self.context_lens_t is None:
            device = self.block_tables.device
            self.query_start_loc_t = torch.tensor(self.query_start_loc, dtype=torch.int32, device=device)
            self.context_lens_t = torch.tensor(self.context_lens, dtype=torch.int32, device=device)
        if self.max_query_len is None:
            self.max_query_len = max(b - a for a, b in zip(self.query_start_loc, self.query_start_loc[1:]))
        return self.query_start_loc_t, self.context_lens_t
