"""Paged prefill / chunked-prefill attention (any number of queries per sequence) with learned
sinks and a sliding window, over the same (blocks, block_size, kv_heads, head_dim) cache as the
decode kernel.

Each sequence's queries are the last `q_len` of its `kv_len` cached tokens (this step's K/V were
written first), so a chunk that continues a cached prefix is just a sequence with
kv_len > q_len. Decode sequences mixed into the same step are sequences with q_len = 1.

GQA packing: a program owns BLOCK_Q query tokens of one sequence and all GROUP query heads of one
kv head — BLOCK_M = BLOCK_Q * GROUP rows (token-major) — so each K/V tile is loaded once for the
whole group and the dot products are BLOCK_M tall even for a handful of tokens.

The grid is flat over query tiles: tile t belongs to the sequence i with the largest
`query_start_loc[i] // BLOCK_Q + i <= t` (found by binary search), which bounds the tile count by
T // BLOCK_Q + B without the host knowing the per-sequence lengths.

Key tiles are visited in three runs: a masked run through the bottom of the sliding window, an
unmasked middle (every row sees every key), and a masked run over the causal diagonal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, table, start, hi, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr,
            MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile [start, start + BLOCK_N) into the running softmax of the rows."""
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k_pos = start + n
    if MASKED:
        in_range = k_pos < hi
        page = tl.load(table + k_pos // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
    else:
        page = tl.load(table + k_pos // PAGE_SIZE).to(tl.int64)
    slot = k_pos % PAGE_SIZE
    k_ptrs = k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt + d[None, :]
    v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt + d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        if WINDOW > 0:
            visible &= q_pos[:, None] - k_pos[None, :] < WINDOW
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts at the sink
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, query_start_loc_ptr, context_lens_ptr, sinks_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # The sequence of this tile: largest i with query_start_loc[i] // BLOCK_Q + i <= tile.
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            left = mid + 1
        else:
            right = mid
    seq = left - 1

    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    t0 = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if t0 >= q_len:
        return
    kv_len = tl.load(context_lens_ptr + seq)
    first_pos = kv_len - q_len + t0  # positions of this tile's first and last query
    last_pos = kv_len - q_len + tl.minimum(t0 + BLOCK_Q, q_len) - 1

    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    tok = t0 + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = kv_len - q_len + tok
    q = tl.load(q_ptr + (q_begin + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.load(sinks_ptr + heads).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)  # the sink: a key of logit `sink` and value 0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(first_pos - WINDOW + 1, 0)
    hi = last_pos + 1
    num_tiles = tl.cdiv(hi - lo, BLOCK_N)
    full_end = (first_pos + 1 - lo) // BLOCK_N  # tiles before this lie wholly at or before first_pos
    full_start = 0
    if WINDOW > 0:  # tiles from here on lie wholly inside the window of last_pos
        full_start = tl.cdiv(tl.maximum(last_pos - WINDOW + 1 - lo, 0), BLOCK_N)
    full_start = tl.minimum(full_start, full_end)

    table = block_table_ptr + seq * stride_bt
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    if WINDOW > 0:
        for i in range(full_start):
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, table, lo + i * BLOCK_N, hi, qk_scale,
                                    stride_kb, stride_kt, stride_vb, stride_vt,
                                    HEAD_DIM, BLOCK_N, PAGE_SIZE, WINDOW, True, DOT_PRECISION)
    for i in range(full_start, full_end):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, table, lo + i * BLOCK_N, hi, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt,
                                HEAD_DIM, BLOCK_N, PAGE_SIZE, WINDOW, False, DOT_PRECISION)
    for i in range(full_end, num_tiles):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, table, lo + i * BLOCK_N, hi, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt,
                                HEAD_DIM, BLOCK_N, PAGE_SIZE, WINDOW, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_begin + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """Causal attention of every sequence's queries over its paged context.

    q: (T, Hq, D), the step's tokens, sequence i owning rows [query_start_loc[i], query_start_loc[i+1]);
    query_start_loc: (B + 1,) int32; context_lens: (B,) int32, cached tokens after this step.
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    assert block_m >= group, f"block_m {block_m} must hold a whole query-head group ({group})"
    batch = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    block_q = block_m // group
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (total // block_q + batch, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, sinks,
        scale * LOG2E, batch,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_N=block_n, PAGE_SIZE=page_size, WINDOW=sliding_window, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
