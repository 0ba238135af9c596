"""SM90 paged attention with learned sinks and sliding windows, behind the reference's signatures.

Backends, fastest first:
- FA3 (`flash_attn_interface`, the flash-attention `hopper/` build) when importable, for what our
  image builds: bf16, head_dim 64: `flash_attn_with_kvcache` over the paged cache
  (`page_table`), varlen queries, window (W - 1, 0) on sliding layers, and the sink applied from the
  returned log-sum-exp: out * sigmoid(lse - sink).
- The Triton kernels of `minivllm.kernels` (split-K decode, packed-GQA prefill), sinks in-kernel.
- The torch reference for what neither handles (head_dim not a power of two in [16, 256]).

`MINIVLLM_ATTENTION_BACKEND=triton` skips FA3, `=fa3` fails fast if FA3 is missing (default
`auto`); shapes FA3 does not take (not bf16, other head dims, non-Hopper GPUs) use Triton either way.
`ops_backend=reference` in the engine args forces the reference everywhere.

Both functions read only tensors (no host sync, no per-step Python values baked into a launch
except the batch size), so a decode step that uses them can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from minivllm.kernels.attention_decode import paged_decode
from minivllm.kernels.attention_elementwise import apply_sinks
from minivllm.kernels.attention_elementwise import write_kv as _triton_write_kv
from minivllm.kernels.attention_prefill import paged_prefill
from minivllm.ops import reference
from minivllm.ops.context import AttentionContext

logger = logging.getLogger(__name__)

try:
    from flash_attn_interface import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None
except OSError as e:  # installed but its extension does not load (CUDA / torch mismatch)
    logger.warning("FA3 (flash_attn_interface) does not load, using the Triton kernels: %s", e)
    flash_attn_with_kvcache = None

FA3_HEAD_DIMS = (64,)  # what the Dockerfile's FA3 build compiles (FLASHATTENTION_DISABLE_HDIM* else)
FA3_DTYPES = (torch.bfloat16,)

BACKEND = os.environ.get("MINIVLLM_ATTENTION_BACKEND", "auto")
if BACKEND not in ("auto", "fa3", "triton"):
    raise ValueError(f"MINIVLLM_ATTENTION_BACKEND={BACKEND!r}: expected auto, fa3 or triton")
if BACKEND == "fa3" and flash_attn_with_kvcache is None:
    raise ValueError("MINIVLLM_ATTENTION_BACKEND=fa3 but flash_attn_interface (FlashAttention-3) is not importable")


def _triton_supports(head_dim: int) -> bool:
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@functools.lru_cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def _fa3_supports(q: torch.Tensor) -> bool:
    return (flash_attn_with_kvcache is not None and BACKEND != "triton" and q.is_cuda and _is_hopper(q.device)
            and q.dtype in FA3_DTYPES and q.shape[-1] in FA3_HEAD_DIMS)


def backend_for(q: torch.Tensor) -> str:
    """Which implementation `paged_attention` uses for queries like q: fa3, triton or reference."""
    if _fa3_supports(q):
        return "fa3"
    return "triton" if _triton_supports(q.shape[-1]) else "reference"


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: AttentionContext,
    sinks: torch.Tensor,
    sliding_window: int,
    scale: float,
) -> torch.Tensor:
    """Same contract as `reference.paged_attention`: q (T, Hq, D) → (T, Hq, D)."""
    backend = backend_for(q)
    if backend == "reference":
        return reference.paged_attention(q, k_cache, v_cache, ctx, sinks, sliding_window, scale)
    query_start_loc, context_lens = ctx.device_lens()
    if backend == "fa3":
        return _fa3_attention(q, k_cache, v_cache, ctx, query_start_loc, context_lens, sinks, sliding_window, scale)
    if q.shape[0] == context_lens.shape[0]:  # one query per sequence: a pure decode step
        return paged_decode(q, k_cache, v_cache, ctx.block_tables, context_lens, sinks, scale, sliding_window)
    return paged_prefill(q, k_cache, v_cache, ctx.block_tables, query_start_loc, context_lens, sinks, scale,
                         sliding_window)


def _fa3_attention(q, k_cache, v_cache, ctx, query_start_loc, context_lens, sinks, sliding_window, scale):
    page_table = ctx.block_tables
    if page_table.dtype != torch.int32:
        page_table = page_table.to(torch.int32)
    max_query_len = 1 if q.shape[0] == context_lens.shape[0] else ctx.max_query_len
    out, lse, *_ = flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=context_lens, page_table=page_table,
        cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len, softmax_scale=scale, causal=True,
        window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), return_softmax_lse=True,
    )
    return apply_sinks(out, lse, sinks)  # lse: (Hq, T), natural log


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as `reference.write_kv`, plus: a negative slot (CUDA-graph padding) is skipped."""
    _triton_write_kv(k, v, k_cache, v_cache, slot_mapping)


# Read by engine/cuda_graphs.py: True, or a predicate on the model config (the reference fallback
# is not capturable: it loops over the step's Python lengths).
paged_attention.cuda_graph_safe = lambda config: _triton_supports(config.head_dim)
write_kv.cuda_graph_safe = True
