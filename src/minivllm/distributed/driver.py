"""Rank 0's stand-in for the model: each call first tells the other ranks to make the same call
(a header down their pipes, then the inputs by torch.distributed broadcast), then runs this rank's
shard. The ranks' collectives inside the model then line up one for one.

It has the model's interface (forward, compute_logits), so the model runner and the engine use it
unchanged. compute_logits broadcasts the hidden rows it is given: the callers pick rows (sampled
tokens, prompt-logprob slices) the other ranks cannot know, and rows × hidden is small.
"""

from __future__ import annotations

import torch

from minivllm.distributed.parallel_state import broadcast
from minivllm.distributed.workers import Workers
from minivllm.ops import AttentionContext


class TensorParallelDriver:
    def __init__(self, model: torch.nn.Module, workers: Workers):
        self.model, self.workers = model, workers
        self.config = model.config

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                 kv_cache: torch.Tensor, aux_layers: tuple[int, ...] = ()):
        """aux_layers (an EAGLE-3 head's): rank 0 alone keeps them; every rank holds the whole
        residual stream, so the other ranks need not know."""
        tables = ctx.block_tables.to(torch.int32)
        self.workers.send(("forward", len(input_ids), tuple(tables.shape), ctx.query_start_loc, ctx.context_lens))
        return self._guarded(self._forward, input_ids, positions, ctx, tables, kv_cache, aux_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()
        self.workers.send(("logits", tuple(hidden.shape), hidden.dtype))
        return self._guarded(self._logits, hidden)

    def _forward(self, input_ids, positions, ctx, tables, kv_cache, aux_layers):
        broadcast(torch.cat((input_ids, positions, ctx.slot_mapping)))
        broadcast(tables.contiguous())
        return self.model(input_ids, positions, ctx, kv_cache, aux_layers)

    def _logits(self, hidden):
        return self.model.compute_logits(broadcast(hidden))

    def _guarded(self, fn, *args):
        """Any error mid-step is fatal: a failed collective (a rank died), or one of rank 0's own,
        which leaves the other ranks waiting in a collective that the next step would mismatch."""
        try:
            return fn(*args)
        except BaseException as e:
            raise self.workers.failure(e) from e
