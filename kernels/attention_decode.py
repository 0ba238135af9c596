"""Paged decode attention (one query token per sequence) with learned sinks and a sliding window.

KV cache: (blocks, block_size, kv_heads, head_dim) per layer and for K and V — the FA3 paged
layout. One key of one kv head is a contiguous head_dim row (128 bytes at head_dim 64, bf16),
so a tile of keys gathered through the block table is a set of aligned 128-byte loads whatever
the block size or the tile's start.

Grid (seqs, kv_heads, splits). A program loads the GROUP query heads that share its kv head
(padded to 16 rows for tl.dot), so each K/V byte is read once for all of them (GQA 8:1 for
gpt-oss), and walks its slice of the context with an online softmax in fp32.

Split-K: with few sequences there are too few (seq, kv_head) programs to fill the GPU, so the
context is cut into `splits` chunks (a power of two chosen from the batch size only: eager and
CUDA-graph runs of the same batch use the same split, hence the same rounding), each writing a
partial (out, lse) that `_decode_reduce_kernel` merges. The chunk length is computed in the
kernel from each sequence's own length, so the captured grid serves any context length.

The sink is a key with logit `sink` and a zero value: it starts the running max (so no -inf
arithmetic ever happens) and, without splits, the running sum; with splits the reduce adds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, context_lens_ptr, sinks_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(context_lens_ptr + seq)
    kv_start = 0
    if WINDOW > 0:  # the query (position kv_len - 1) sees keys (kv_len - 1 - WINDOW, kv_len - 1]
        kv_start = tl.maximum(kv_len - WINDOW, 0)
    if NUM_SPLITS == 1:
        lo = kv_start
        hi = kv_len
    else:
        chunk = tl.cdiv(tl.cdiv(kv_len - kv_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
        chunk = tl.maximum(chunk, MIN_CHUNK)
        lo = kv_start + split * chunk
        hi = tl.minimum(lo + chunk, kv_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
    sink = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    m_i = sink
    if NUM_SPLITS == 1:
        l_i = tl.full([BLOCK_G], 1.0, tl.float32)  # the sink's own exp(sink - m) = 1
    else:
        l_i = tl.zeros([BLOCK_G], tl.float32)  # the reduce adds the sink once
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)

    table = block_table_ptr + seq * stride_bt
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        valid = pos < hi
        page = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        k = tl.load(k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt + d[None, :],
                    mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt + d[None, :],
                    mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        # Partials are (seqs, heads, splits, head_dim) / (seqs, heads, splits), contiguous fp32.
        # An empty split (its chunk starts past the context) leaves l = 0: lse -inf, out 0.
        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        row = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=head_ok[:, None])
        tl.store(part_lse_ptr + row, lse, mask=head_ok)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Merge the splits of one (sequence, head): softmax over [split lse..., sink] weights."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * NUM_HEADS + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + s)
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    m = tl.maximum(tl.max(lse, 0), sink)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0) + tl.exp2(sink - m)
    parts = tl.load(part_out_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(parts * w[:, None], 0) / denom
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, window: int, device: torch.device,
                       min_chunk: int) -> int:
    """Splits so (seqs x kv_heads x splits) gives each SM a few programs; a function of the batch
    size rounded up to a power of two (the CUDA-graph buckets), never of the context lengths."""
    if window and window <= min_chunk:
        return 1  # a sliding layer reads at most `window` keys: one chunk
    want = PROGRAMS_PER_SM * _num_sms(device) // (_next_pow2(batch) * num_kv_heads)
    if want < 2:
        return 1
    return min(1 << (want.bit_length() - 1), MAX_SPLITS)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    min_chunk: int = 256,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q: (B, Hq, D); k_cache/v_cache: (blocks, block_size, Hkv, D); block_tables: (B, >= pages) int32
    or int64; context_lens: (B,) int32 — keys of sequence i are its first context_lens[i] cache
    slots (the query is the last of them). Returns (B, Hq, D) in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, sliding_window, q.device, min_chunk)
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, sinks, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=max(16, _next_pow2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, PAGE_SIZE=page_size, WINDOW=sliding_window,
        NUM_SPLITS=num_splits, MIN_CHUNK=min_chunk, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, sinks, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=2,
        )
    return out
