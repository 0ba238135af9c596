"""MoE routing on the GPU: router linear + bias, top-k, softmax over the chosen k, and the sort of
(token, slot) pairs by expert that the grouped GEMMs walk.

A *pair* is one (token, slot) of the top-k choice, numbered `token * top_k + slot`. The sort writes

    expert_offsets (E + 1,) int32   expert e owns sorted rows [offsets[e], offsets[e + 1])
    sorted_pairs   (P,)     int32   the pair at each sorted row; ascending pair id within an expert

so the order is deterministic (a stable counting sort) and needs no padding: the GEMMs map their
tiles onto the ragged expert segments themselves. The router also writes `x_perm`, x in bf16 with
its hidden dimension in the GEMMs' K order (`mx_perm`, see moe_gemm), since it reads x anyway.

Decode (M <= 64 tokens) runs routing and sorting in ONE launch: the router's hidden dimension is
split over SPLIT_H programs (the router weight is read by several SMs), each writes its partial
logits, and the last program to finish (an atomic ticket, reset afterwards so CUDA graphs replay)
sums them in a fixed order, picks the top-k and sorts in registers. Prefill (and decode with many
experts) uses a router grid over token blocks and a two-launch counting sort (per-chunk
histograms, then a deterministic scatter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Routing(NamedTuple):
    topk_ids: torch.Tensor  # (M, top_k) int32
    topk_weights: torch.Tensor  # (M, top_k) float32, softmax over the chosen k
    expert_offsets: torch.Tensor  # (E + 1,) int32
    sorted_pairs: torch.Tensor  # (M * top_k,) int32
    x_perm: torch.Tensor  # (M, H) bfloat16, x[:, mx_perm(h)]: GEMM1's input in the kernels' K order


@triton.jit
def mx_perm(k):
    """The MXFP4 GEMMs' K order: swaps the 2-bit fields k[1:3] and k[3:5] inside each 32-element
    group (an involution; see moe_gemm). Position p of a permuted row holds element mx_perm(p)."""
    return (k & ~31) | ((k & 6) << 2) | ((k >> 2) & 6) | (k & 1)


def permute_k(t: torch.Tensor) -> torch.Tensor:
    """t[..., mx_perm(arange(K))] in torch (K a multiple of 32)."""
    k = torch.arange(t.shape[-1], device=t.device)
    return t[..., (k & ~31) | ((k & 6) << 2) | ((k >> 2) & 6) | (k & 1)]


@triton.jit
def _sort_pairs(ids, valid, base, E_PAD: tl.constexpr):
    """Sorted rows of one chunk of pairs: base[expert] + rank among the chunk's earlier pairs of
    the same expert (stable). ids/valid: (BLOCK_P,); base: (E_PAD,) first free row per expert."""
    experts = tl.arange(0, E_PAD)
    onehot = ((ids[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot
    return tl.sum(onehot * (base[None, :] + rank), axis=1)


@triton.jit
def _router_kernel(
    x_ptr, stride_xm, w_ptr, stride_we, b_ptr, xp_ptr, stride_xpm,
    partial_ptr, counter_ptr,
    topk_ids_ptr, topk_weights_ptr, offsets_ptr, sorted_ptr,
    M, H, E,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT_H: tl.constexpr,
    FUSE_SORT: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_T), SPLIT_H). Logits are rounded to x's dtype before the top-k, as the
    reference's linear produces them, so both pick the same experts. Also writes x_perm."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    row_mask = rows < M
    expert_mask = experts < E

    h_chunk = tl.cdiv(tl.cdiv(H, BLOCK_H), SPLIT_H) * BLOCK_H
    h_lo = pid_h * h_chunk
    h_hi = tl.minimum(H, h_lo + h_chunk)
    acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for h0 in range(h_lo, h_hi, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        x_mask = row_mask[:, None] & (hs[None, :] < h_hi)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + hs[None, :], mask=x_mask, other=0.0)
        tl.store(xp_ptr + rows[:, None].to(tl.int64) * stride_xpm + mx_perm(hs)[None, :], x.to(tl.bfloat16), mask=x_mask)
        wt = tl.load(w_ptr + experts[None, :] * stride_we + hs[:, None],
                     mask=expert_mask[None, :] & (hs[:, None] < h_hi), other=0.0)
        if IEEE:
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)

    is_last = True
    if SPLIT_H > 1:
        tile = (pid_h * tl.cdiv(M, BLOCK_T) + pid_t) * BLOCK_T * E_PAD
        offs = tl.arange(0, BLOCK_T)[:, None] * E_PAD + experts[None, :]
        tl.store(partial_ptr + tile + offs, acc)
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
        is_last = ticket == SPLIT_H - 1
    if is_last:
        if SPLIT_H > 1:
            # Fixed summation order over the splits: the result does not depend on who finished last.
            acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
            for s in range(SPLIT_H):
                tile = (s * tl.cdiv(M, BLOCK_T) + pid_t) * BLOCK_T * E_PAD
                acc += tl.load(partial_ptr + tile + offs, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + pid_t, 0)
        bias = tl.load(b_ptr + experts, mask=expert_mask, other=0.0).to(tl.float32)
        logits = (acc + bias[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        logits = tl.where(expert_mask[None, :], logits, float("-inf"))

        slots = tl.arange(0, K_PAD)
        top_ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        top_vals = tl.full([BLOCK_T, K_PAD], float("-inf"), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            best = tl.max(logits, axis=1)
            # Lowest expert id among ties, like a stable top-k.
            idx = tl.min(tl.where(logits == best[:, None], experts[None, :], E_PAD), axis=1)
            top_ids = tl.where(slots[None, :] == k, idx[:, None], top_ids)
            top_vals = tl.where(slots[None, :] == k, best[:, None], top_vals)
            logits = tl.where(experts[None, :] == idx[:, None], float("-inf"), logits)
        # top_vals[:, 0] is the largest; padded slots are -inf and vanish in the softmax.
        p = tl.exp(top_vals - tl.max(top_vals, axis=1)[:, None])
        weights = p / tl.sum(p, axis=1)[:, None]

        pair_ids = rows[:, None] * TOP_K + slots[None, :]
        pair_mask = row_mask[:, None] & (slots[None, :] < TOP_K)
        tl.store(topk_ids_ptr + pair_ids, top_ids, mask=pair_mask)
        tl.store(topk_weights_ptr + pair_ids, weights, mask=pair_mask)

        if FUSE_SORT:  # the whole batch is this one token block: sort it in registers
            flat_ids = tl.reshape(top_ids, [BLOCK_T * K_PAD])
            flat_pairs = tl.reshape(pair_ids, [BLOCK_T * K_PAD])
            flat_mask = tl.reshape(pair_mask, [BLOCK_T * K_PAD])
            counts = tl.sum(((flat_ids[:, None] == experts[None, :]) & flat_mask[:, None]).to(tl.int32), axis=0)
            ends = tl.cumsum(counts, axis=0)
            dest = _sort_pairs(flat_ids, flat_mask, ends - counts, E_PAD)
            tl.store(sorted_ptr + dest, flat_pairs, mask=flat_mask)
            tl.store(offsets_ptr + 1 + experts, ends, mask=expert_mask)
            tl.store(offsets_ptr, 0)


@triton.jit
def _histogram_kernel(ids_ptr, hist_ptr, P, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-chunk expert counts: hist[chunk, e]."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=E_PAD)
    experts = tl.arange(0, E_PAD)
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + pid * E_PAD + experts, counts)


@triton.jit
def _scatter_kernel(ids_ptr, hist_ptr, offsets_ptr, sorted_ptr, P, E, num_chunks,
                    E_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each chunk finds its rows from all chunks' histograms (a tiny redundant scan) and scatters."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        h = tl.load(hist_ptr + chunks[:, None] * E_PAD + experts[None, :], mask=chunks[:, None] < num_chunks, other=0)
        totals += tl.sum(h, axis=0)
        before += tl.sum(tl.where(chunks[:, None] < pid, h, 0), axis=0)
    ends = tl.cumsum(totals, axis=0)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = offs < P
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    dest = _sort_pairs(ids, valid, ends - totals + before, E_PAD)
    tl.store(sorted_ptr + dest, offs, mask=valid)
    if pid == 0:
        tl.store(offsets_ptr + 1 + experts, ends, mask=experts < E)
        tl.store(offsets_ptr, 0)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_FUSED_TOKENS = 64  # decode: split router, and routing + sort in one launch


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets, shared by all MoE calls on a device (so those must not run concurrently
    on two streams); every kernel leaves the ones it used at zero."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int,
          split_h: int | None = None) -> Routing:
    """Router + top-k + softmax + sort by expert. x (M, H); router_weight (E, H); router_bias (E,)."""
    m, h = x.shape
    e = router_weight.shape[0]
    if router_weight.stride(1) != 1 or x.stride(1) != 1 or h % 32:
        raise ValueError("route needs the hidden dimension contiguous and a multiple of 32")
    p = m * top_k
    dev = x.device
    topk_ids = torch.empty(m, top_k, dtype=torch.int32, device=dev)
    topk_weights = torch.empty(m, top_k, dtype=torch.float32, device=dev)
    offsets = torch.empty(e + 1, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
    x_perm = torch.empty(m, h, dtype=torch.bfloat16, device=dev)
    e_pad = max(16, triton.next_power_of_2(e))
    k_pad = triton.next_power_of_2(top_k)
    router_bias = router_bias.contiguous()

    small = m <= MAX_FUSED_TOKENS
    block_t = max(16, triton.next_power_of_2(m)) if small else 64
    # The in-register sort holds a (pairs x experts) one-hot: fine for 20b (64 x 4 x 32), too big
    # for 128 experts past 16 tokens, which then take the two-launch sort.
    fuse_sort = small and block_t * k_pad * e_pad <= 8192
    block_h = 64
    if split_h is None:  # decode: spread the router weight over several SMs; prefill has token blocks
        split_h = max(1, min(8, triton.cdiv(h, 4 * block_h))) if small else 1
    t_blocks = triton.cdiv(m, block_t)
    partial = torch.empty(split_h * t_blocks * block_t * e_pad, dtype=torch.float32, device=dev) if split_h > 1 \
        else topk_weights
    _router_kernel[(t_blocks, split_h)](
        x, x.stride(0), router_weight, router_weight.stride(0), router_bias, x_perm, x_perm.stride(0),
        partial, _counters(dev, t_blocks),
        topk_ids, topk_weights, offsets, sorted_pairs,
        m, h, e,
        TOP_K=top_k, K_PAD=k_pad, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_H=block_h, SPLIT_H=split_h,
        FUSE_SORT=fuse_sort, IEEE=x.dtype == torch.float32, num_warps=4,
    )
    if not fuse_sort:
        sort_by_expert(topk_ids, e, out=(offsets, sorted_pairs))
    return Routing(topk_ids, topk_weights, offsets, sorted_pairs, x_perm)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the pairs by expert: (expert_offsets (E+1,), sorted_pairs (P,))."""
    ids = topk_ids.reshape(-1)
    p = ids.numel()
    if out is None:
        out = (torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device),
               torch.empty(p, dtype=torch.int32, device=ids.device))
    offsets, sorted_pairs = out
    e_pad = max(16, triton.next_power_of_2(num_experts))
    block_p = 256 if e_pad <= 64 else 128
    chunks = max(1, triton.cdiv(p, block_p))
    hist = torch.empty(chunks, e_pad, dtype=torch.int32, device=ids.device)
    _histogram_kernel[(chunks,)](ids, hist, p, E_PAD=e_pad, BLOCK_P=block_p, num_warps=4)
    _scatter_kernel[(chunks,)](ids, hist, offsets, sorted_pairs, p, num_experts, chunks,
                               E_PAD=e_pad, BLOCK_P=block_p, BLOCK_C=32, num_warps=4)
    return offsets, sorted_pairs
