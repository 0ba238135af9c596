"""Pure-torch reference implementations: readable, exact (fp32 on CPU), the oracle for kernels."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from minivllm.model.gpt_oss import Experts
    from minivllm.ops.context import AttentionContext


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in fp32; with `residual`, adds it first and also returns the new residual stream."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, residual)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """NeoX (half-split) rotary embedding. q: (T, Hq, D), k: (T, Hkv, D); cache: (max_pos, D) = [cos | sin]."""
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Scatter this step's K/V (T, Hkv, D) into the paged cache (num_blocks, block_size, Hkv, D)."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


# Tile sizes of the reference attention. Working memory per step is a few (heads, Q_TILE, keys)
# fp32 score tiles plus one tile of gathered K/V, whatever the context length.
Q_TILE = 512  # queries per tile
SCORE_TILE = 1 << 19  # queries x keys per tile and head (2 MiB of fp32 scores per head)
MAX_K_TILE = 8192  # keys per tile even when few queries (decode), bounding the K/V gather
BATCH_KEYS = 1 << 15  # keys gathered for one padded batch of sequences, all rows together (256 windows of 128)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: "AttentionContext",
    sinks: torch.Tensor,
    sliding_window: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context, with learned sinks.

    A query at position p sees keys (p - sliding_window, p] when sliding_window > 0 (128 keys
    including itself), else [0, p]. The sink is one extra logit per head that takes softmax mass
    and contributes no value: softmax over [scores, sink], then drop the sink column.

    Sequences whose queries x visible keys fit one score tile go in padded batches: all the
    decodes of a step in one gather and one masked softmax, short prefill chunks likewise (see
    PaddedBatch). Longer ones go tiled (`_attend_tiled`), so memory does not grow with the context.
    The plan is made once per step and window, and shared by the layers.
    """
    plan = ctx.reference_plans.get(sliding_window)
    if plan is None:
        plan = ctx.reference_plans[sliding_window] = _plan(ctx, sliding_window, q.device)
    batches, tiled = plan
    out = torch.zeros_like(q)  # rows of a context-0 sequence (CUDA-graph padding) stay 0, like the kernels'
    sink_logits = sinks.float()
    for batch in batches:
        batch.attend(q, k_cache, v_cache, sink_logits, scale, out)
    for i in tiled:
        _attend_tiled(q, k_cache, v_cache, ctx, i, sink_logits, sliding_window, scale, out)
    return out


def _plan(ctx: "AttentionContext", sliding_window: int, device: torch.device):
    """(padded batches, indices of the sequences to run tiled) for one step and window.

    Decodes and prefill chunks are batched apart (a decode padded to a chunk's query count would
    waste the work), each sorted by key span so that a batch's rows pad to similar lengths.
    """
    spans: list[tuple[bool, int, int, int, int]] = []  # (is chunk, keys, queries, seq index, first key)
    tiled: list[int] = []
    for i, ctx_len in enumerate(ctx.context_lens):
        n = ctx.query_start_loc[i + 1] - ctx.query_start_loc[i]
        if n == 0 or ctx_len == 0:
            continue
        first_key = max(0, ctx_len - n - sliding_window + 1) if sliding_window else 0
        keys = ctx_len - first_key
        if n * keys > SCORE_TILE or keys > BATCH_KEYS:
            tiled.append(i)
        else:
            spans.append((n > 1, keys, n, i, first_key))
    spans.sort()
    batches, members = [], []
    most_queries = 0
    for span in spans:
        is_chunk, keys, n = span[:3]
        # Sorted by keys, so this span's keys are the batch's widest: the batch would cost
        # rows x most queries x keys scores.
        if members and (members[0][0] != is_chunk or (len(members) + 1) * max(most_queries, n) * keys > SCORE_TILE
                        or (len(members) + 1) * keys > BATCH_KEYS):
            batches.append(PaddedBatch(ctx, members, sliding_window, device))
            members, most_queries = [], 0
        members.append(span)
        most_queries = max(most_queries, n)
    if members:
        batches.append(PaddedBatch(ctx, members, sliding_window, device))
    return batches, tiled


class PaddedBatch:
    """Sequences attended together: queries padded to the longest chunk, keys to the widest span.

    Row b gathers the slots of its keys [first_key, first_key + keys) (padding repeats its last
    key, a real one, so no garbage slot is ever read) and masks by position: causal, the window,
    and padding keys lie past every real query of the row. Padding queries are computed and dropped.
    """

    def __init__(self, ctx: "AttentionContext", spans, sliding_window: int, device: torch.device):
        _, keys, queries, seqs, first_keys = (torch.tensor(column, device=device) for column in zip(*spans))
        num_q, num_k = int(queries.max()), int(keys.max())
        starts = torch.tensor(ctx.query_start_loc, device=device)[seqs]
        q_offset = torch.arange(num_q, device=device)
        self.q_rows = starts[:, None] + torch.minimum(q_offset, queries[:, None] - 1)  # (B, Q)
        self.q_valid = None if num_q == 1 else (q_offset < queries[:, None]).flatten()
        k_offset = torch.arange(num_k, device=device)
        k_pos = first_keys[:, None] + torch.minimum(k_offset, keys[:, None] - 1)  # (B, L)
        blocks = ctx.block_tables[seqs[:, None], k_pos // ctx.block_size].long()
        self.slots = blocks * ctx.block_size + k_pos % ctx.block_size
        ctx_lens = torch.tensor(ctx.context_lens, device=device)[seqs]
        q_pos = (ctx_lens - queries)[:, None, None] + q_offset[None, :, None]  # (B, Q, 1)
        k_pos = (first_keys[:, None] + k_offset)[:, None, :]  # (B, 1, L), unclamped
        visible = k_pos <= q_pos
        if sliding_window:
            visible &= q_pos - k_pos < sliding_window
        # An additive mask: much faster than masked_fill_. (B, 1, 1, Q, L) against (B, Hkv, G, Q, L) scores.
        self.bias = torch.where(visible, 0.0, float("-inf"))[:, None, None]

    def attend(self, q, k_cache, v_cache, sink_logits, scale, out) -> None:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        b, num_q = self.q_rows.shape
        group = q.shape[1] // num_kv_heads
        # (B, Hkv, G, Q, D), pre-scaled.
        qb = (q[self.q_rows].float() * scale).view(b, num_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        keys = k_cache.view(-1, num_kv_heads, head_dim)[self.slots].float()  # (B, L, Hkv, D)
        values = v_cache.view(-1, num_kv_heads, head_dim)[self.slots].float()
        s = torch.einsum("bhgqd,blhd->bhgql", qb, keys).add_(self.bias)
        sink = sink_logits.view(1, num_kv_heads, group, 1, 1)
        m = torch.maximum(s.amax(-1, keepdim=True), sink)
        p = s.sub_(m).exp_()  # masked keys: exp(-inf) = 0
        denom = p.sum(-1, keepdim=True).add_(torch.exp(sink - m))
        o = torch.einsum("bhgql,blhd->bqhgd", p, values).div_(denom.permute(0, 3, 1, 2, 4))
        o = o.reshape(b * num_q, -1, head_dim).to(q.dtype)
        rows = self.q_rows.flatten()
        if self.q_valid is None:
            out[rows] = o
        else:
            out[rows[self.q_valid]] = o[self.q_valid]


def _attend_tiled(q, k_cache, v_cache, ctx: "AttentionContext", i: int, sink_logits: torch.Tensor,
                  sliding_window: int, scale: float, out: torch.Tensor) -> None:
    """Sequence i's queries Q_TILE at a time; each query tile walks its visible KV blocks (those
    inside the window of some query of the tile, up to its last query) a key tile at a time."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    sink_logits = sink_logits.view(num_kv_heads, group, 1, 1)
    start, end = ctx.query_start_loc[i], ctx.query_start_loc[i + 1]
    first_pos = ctx.context_lens[i] - (end - start)  # the queries are the last end - start positions
    for t0 in range(start, end, Q_TILE):
        t1 = min(end, t0 + Q_TILE)
        q_pos = first_pos + (t0 - start)
        # (kv_head, group, queries, head_dim), pre-scaled.
        qt = (q[t0:t1].float() * scale).view(t1 - t0, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        ot = _attend_tile(qt.contiguous(), q_pos, k_cache, v_cache, ctx.block_tables[i], ctx.block_size,
                          sink_logits, sliding_window)
        out[t0:t1] = ot.permute(2, 0, 1, 3).reshape(t1 - t0, -1, head_dim).to(q.dtype)


def _attend_tile(qt: torch.Tensor, q_start: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, block_size: int, sink_logits: torch.Tensor,
                 sliding_window: int) -> torch.Tensor:
    """Attention of one query tile qt (Hkv, G, n, D) at positions [q_start, q_start + n).

    Online softmax: the running max m, running sum l and running output acc start as the sink
    alone (m = sink, l = exp(sink - m) = 1, acc = 0); each key tile rescales them to its new max.
    Since m starts finite, a query that sees no key of some tile stays well defined.
    """
    n = qt.shape[2]
    q_end = q_start + n  # exclusive
    k_start = max(0, q_start - sliding_window + 1) if sliding_window else 0
    k_end = q_end  # causal: no query of the tile sees past its last position
    tile_blocks = max(1, min(MAX_K_TILE, SCORE_TILE // n) // block_size)
    q_pos = torch.arange(q_start, q_end, device=qt.device)[:, None]

    m, l, acc = sink_logits, 1.0, None
    for b0 in range(k_start // block_size, (k_end - 1) // block_size + 1, tile_blocks):
        b1 = min(b0 + tile_blocks, (k_end - 1) // block_size + 1)
        lo, hi = max(k_start, b0 * block_size), min(k_end, b1 * block_size)  # key positions [lo, hi)
        blocks = block_table[b0:b1]
        cut = slice(lo - b0 * block_size, hi - b0 * block_size)
        keys = k_cache[blocks].flatten(0, 1)[cut].float()  # (L, Hkv, D)
        values = v_cache[blocks].flatten(0, 1)[cut].float()

        s = torch.einsum("hgnd,lhd->hgnl", qt, keys)
        # Mask only tiles that some query cannot fully see (the diagonal, the window's edge).
        if hi - 1 > q_start or (sliding_window and q_end - 1 - lo >= sliding_window):
            k_pos = torch.arange(lo, hi, device=qt.device)[None, :]
            visible = k_pos <= q_pos
            if sliding_window:
                visible &= q_pos - k_pos < sliding_window
            s.add_(torch.where(visible, 0.0, float("-inf")))  # an additive mask: much faster than masked_fill_

        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = s.sub_(m_new).exp_()  # in place, one score buffer per tile; masked keys: exp(-inf) = 0
        alpha = torch.exp(m - m_new)  # rescales what was summed under the old max
        l = l * alpha + p.sum(-1, keepdim=True)
        pv = torch.einsum("hgnl,lhd->hgnd", p, values)
        acc = pv if acc is None else acc * alpha + pv
        m = m_new
    if acc is None:  # no keys (a context-0 padding row): all mass on the sink, output 0 like the kernels
        return torch.zeros_like(qt)
    return acc / l


def swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """GPT-OSS SwiGLU: interleaved rows (even = gate, odd = linear), clamped, with the +1 on linear."""
    gate, linear = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int):
    """Router: linear + bias, top-k, softmax over the chosen k. Returns (weights, expert ids), (T, k)."""
    logits = F.linear(x, router_weight, router_bias)
    top_values, top_ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top_values, dim=-1), top_ids


def moe(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, experts: "Experts",
        top_k: int, swiglu_limit: float, swiglu_alpha: float) -> torch.Tensor:
    """Mixture of experts, one routed expert at a time; MXFP4 experts are dequantized on the fly
    (kept dequantized when small, see `_expert_weights`)."""
    weights, expert_ids = route(x, router_weight, router_bias, top_k)
    out = torch.zeros_like(x)
    for e in expert_ids.unique().tolist():
        tokens, slots = (expert_ids == e).nonzero(as_tuple=True)
        gate_up_w, down_w = _expert_weights(experts, e, x.dtype)
        h = F.linear(x[tokens], gate_up_w, experts.gate_up_proj_bias[e])
        y = F.linear(swiglu(h, swiglu_limit, swiglu_alpha), down_w, experts.down_proj_bias[e])
        out.index_add_(0, tokens, y * weights[tokens, slots, None])
    return out


# A layer's MXFP4 experts are kept dequantized when all of them fit this many bytes: the small
# checkpoints of tests and CPU runs, where dequantizing again every step was a fifth of a batch-1
# step. A real model's experts (1.6 GB per gpt-oss-20b layer in bf16) are dequantized per use.
# Weights are loaded once, before the first forward, so what is kept never goes stale.
DEQUANTIZED_EXPERTS_BYTES = 64 << 20
_dequantized: "weakref.WeakKeyDictionary[Experts, dict]" = weakref.WeakKeyDictionary()


def _expert_weights(experts: "Experts", e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    num_values = 2 * (experts.gate_up_proj_blocks.numel() + experts.down_proj_blocks.numel()) \
        if experts.quantized else 0
    if not num_values or num_values * dtype.itemsize > DEQUANTIZED_EXPERTS_BYTES:
        return experts.expert_weights(e, dtype)
    kept = _dequantized.setdefault(experts, {})
    if (e, dtype) not in kept:
        kept[e, dtype] = experts.expert_weights(e, dtype)
    return kept[e, dtype]
