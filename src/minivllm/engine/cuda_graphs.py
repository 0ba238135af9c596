"""CUDA graphs of decode steps, one per batch-size bucket (1, 2, 4, 8, ...), as nano-vllm does.

A decode step (every sequence runs one token) at batch size n replays the graph of the smallest
bucket >= n. The graphs read fixed input buffers: before a replay the step's tokens, positions,
slots, context lengths and block tables are copied in; the rows past n are padding (slot -1: no
KV write; context length 0: attention reads nothing). Prefill and mixed steps run eagerly.

Only ops that read their per-step values from tensors can be captured (a Python int taken from
the step would be frozen into the graph). An op declares it with a `cuda_graph_safe` attribute:
True, or a predicate on the model's GptOssConfig (for ops that fall back to uncapturable code on
some shapes). The reference rms_norm and rotary are plain tensor math; the reference attention
and MoE are not capturable, so with them the runner stays eager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minivllm.ops import AttentionContext, Ops, reference

if TYPE_CHECKING:
    from minivllm.config import GptOssConfig

MAX_CAPTURED_BATCH = 512


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= max_num_seqs, capped at MAX_CAPTURED_BATCH."""
    top = min(max_num_seqs, MAX_CAPTURED_BATCH)
    buckets = [1]
    while buckets[-1] < top:
        buckets.append(buckets[-1] * 2)
    return buckets


def uncapturable_ops(ops: Ops, config: GptOssConfig) -> list[str]:
    """Names of the ops a decode step uses that cannot be captured in a CUDA graph."""
    blocked = []
    for name in ("rms_norm", "rotary", "write_kv", "attention", "moe"):
        fn = getattr(ops, name)
        safe = getattr(fn, "cuda_graph_safe", False)
        if callable(safe):
            safe = safe(config)
        if not safe and fn not in (reference.rms_norm, reference.rotary):
            blocked.append(name)
    return blocked


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int, max_num_seqs: int,
                 max_model_len: int):
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.buckets = batch_buckets(max_num_seqs)
        max_bs, device = self.buckets[-1], kv_cache.device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)  # one query each
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, model.config.hidden_size, dtype=kv_cache.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _context(self, bs: int) -> AttentionContext:
        # The lists only give the batch size; the captured kernels read the tensors.
        return AttentionContext(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=list(range(bs + 1)), context_lens=[0] * bs,
            block_tables=self.block_tables[:bs], block_size=self.block_size,
            query_start_loc_t=self.query_start_loc[: bs + 1], context_lens_t=self.context_lens[:bs], max_query_len=1,
        )

    def _forward(self, bs: int) -> None:
        self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], self._context(bs), self.kv_cache)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            self._forward(bs)  # warm-up: compiles kernels and settles allocations outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, num_tokens: int, ctx: AttentionContext) -> bool:
        """A pure decode step (one token per sequence) of a captured size."""
        return num_tokens == ctx.num_seqs <= self.buckets[-1] and ctx.block_tables.shape[1] <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Hidden states (n, hidden) of the step; valid until the next replay."""
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        _, context_lens = ctx.device_lens()
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = ctx.slot_mapping
        self.slot_mapping[n:bs] = -1
        self.context_lens[:n] = context_lens
        self.context_lens[n:bs] = 0
        # Entries past a sequence's own pages are never read, so stale ones need no clearing.
        self.block_tables[:n, : ctx.block_tables.shape[1]] = ctx.block_tables
        self.graphs[bs].replay()
        return self.hidden[:n]
