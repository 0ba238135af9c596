"""MXFP4 grouped GEMMs of the MoE, with the epilogues fused.

Weights stay in the checkpoint layout, viewed without a copy:
    blocks (E, N, K/2) u8   row n = output channel, two e2m1 codes per byte, low nibble first
    scales (E, N, K/32) u8  e8m0, one per 32 inputs
A program computes acc[BLOCK_M tokens, BLOCK_N] += A_tile @ dequant(W_tile)^T with `tl.dot_scaled`.
On Hopper Triton lowers it with the weights as the wgmma register operand: the packed bytes are
upcast in registers (in the MMA operand layout) and scaled, while the token tile streams global ->
shared memory with cp.async as the other operand, whose width (16 tokens and up) is all a decode
step pays for.

K order. The packed bytes of a 16-byte group (32 elements, one scale) are read in a permuted order:
physical byte 4c + j plays logical byte 4j + c, so the 4 bytes each thread of an MMA quad needs are
contiguous and reach the operand layout through 16-byte copies instead of a byte-by-byte
shared-memory shuffle. (sm_90 SASS, triton 3.9, batch-1 tile: 6.9 -> 5.4 instructions per weight
element in the K loop, together with the operand order above.) The permutation is an
involution that swaps two 2-bit fields of the element index (`mx_perm`); the activations must be in
the same order, so their producers write them permuted: the router writes `x_perm` for GEMM1 and
GEMM1's epilogue writes its activation permuted for GEMM2. Scales and biases are untouched.

Tiles follow the ragged expert segments of the sort (`moe_routing`): tile t of the grid belongs to
the expert whose cumulative tile count first exceeds t, so no padding buffer is needed. For
M <= 64 the host picks BLOCK_M >= M: each active expert is ONE tile, and each (expert, N tile)
program streams its packed nibbles and scales exactly once and applies them to every token routed
there.

GEMM1 (gate_up): gathers x rows by pair, adds the bias, applies GPT-OSS's clamped SwiGLU to the
interleaved (gate, linear) column pairs and stores the bf16 activation by sorted row.
GEMM2 (down): adds the bias, multiplies by the routing weight and scatters the result by pair; the
sum over the top-k experts then happens either in the same launch (decode: the last program to
finish an N tile sums its column block in a fixed order; optional split-K adds programs for free)
or in a small reduction kernel (prefill). Both are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minivllm.kernels.moe_routing import Routing, _counters, mx_perm


@triton.jit
def _expert_tile(offsets_ptr, E, pid_m, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row, end row, number of tiles) of tile pid_m over the ragged segments."""
    experts = tl.arange(0, E_PAD)
    valid = experts < E
    starts = tl.load(offsets_ptr + experts, mask=valid, other=0)
    ends = tl.load(offsets_ptr + 1 + experts, mask=valid, other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    mine = experts == expert
    row0 = tl.sum(tl.where(mine, starts + (pid_m - tile_end + tiles) * BLOCK_M, 0), axis=0)
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    return expert, row0, row_end, tl.sum(tiles, axis=0)


@triton.jit
def _sum_slots(part_ptr, stride_ps, stride_pm, out_ptr, stride_om, t0, offs_n, num_tokens, N,
               TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[t, n] = sum over splits and slots of part[s, t * TOP_K + j, n], in a fixed order."""
    t = t0 + tl.arange(0, BLOCK_T)
    mask = (t < num_tokens)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros([BLOCK_T, offs_n.shape[0]], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        for j in tl.static_range(TOP_K):
            ptrs = part_ptr + s * stride_ps + (t.to(tl.int64) * TOP_K + j)[:, None] * stride_pm + offs_n[None, :]
            acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mx_step(acc, a_ptrs, w_ptrs, s_ptrs, row_mask, k_left, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             MASK_K: tl.constexpr):
    """acc += A[BLOCK_M, BLOCK_K] @ dequant(W)^T for one K block; MASK_K for the ragged tail only."""
    if MASK_K:
        offs_k = tl.arange(0, BLOCK_K)
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        wq = tl.load(w_ptrs, mask=(tl.arange(0, BLOCK_K // 2) < k_left // 2)[:, None], other=0)
        ws = tl.load(s_ptrs, mask=(tl.arange(0, BLOCK_K // 32) < k_left // 32)[None, :], other=0)
    else:
        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        wq = tl.load(w_ptrs)
        ws = tl.load(s_ptrs)
    # W^T tile [BLOCK_K/2, BLOCK_N]: physical byte 4c + j of each 16-byte group -> logical 4j + c.
    wq = tl.reshape(tl.permute(tl.reshape(wq, [BLOCK_K // 32, 4, 4, BLOCK_N]), [0, 2, 1, 3]), [BLOCK_K // 2, BLOCK_N])
    # fast_math: e8m0 scale 0xFF (NaN) is not special-cased; checkpoints never use it.
    return tl.dot_scaled(a, None, "bf16", wq, ws, "e2m1", acc, fast_math=True)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, stride_am,
    w_ptr, stride_we, stride_wn,
    s_ptr, stride_se, stride_sn,
    bias_ptr, stride_be,
    c_ptr, stride_cs, stride_cm,
    offsets_ptr, sorted_ptr, topk_weights_ptr,
    out_ptr, stride_om, counter_ptr,
    num_tokens, N, K, E,
    limit, alpha,
    TOP_K: tl.constexpr, GATE_UP: tl.constexpr, FUSED_SUM: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Grid (tiles, cdiv(N, BLOCK_N), SPLIT_K); programs past the last tile exit at once.
    A rows (bf16, K in mx_perm order): GEMM1 x_perm gathered by token, GEMM2 the activation by
    sorted row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    expert, row0, row_end, num_tiles = _expert_tile(offsets_ptr, E, pid_m, BLOCK_M, E_PAD)
    if pid_m >= num_tiles:
        return

    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_ptr + rows, mask=row_mask, other=0)
    if GATE_UP:
        a_rows = pairs // TOP_K  # token of the pair
    else:
        a_rows = rows  # the activation was stored by sorted row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = tl.where(n_mask, offs_n, 0)  # clamp instead of masking the weight loads on ragged N

    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    k_full = k_lo + tl.maximum(k_hi - k_lo, 0) // BLOCK_K * BLOCK_K
    e64 = expert.to(tl.int64)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + (k_lo + tl.arange(0, BLOCK_K))[None, :]
    w_ptrs = w_ptr + e64 * stride_we + w_rows[None, :] * stride_wn + (k_lo // 2 + tl.arange(0, BLOCK_K // 2))[:, None]
    s_ptrs = s_ptr + e64 * stride_se + w_rows[:, None] * stride_sn + (k_lo // 32 + tl.arange(0, BLOCK_K // 32))[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in tl.range(k_lo, k_full, BLOCK_K, num_stages=NUM_STAGES):
        acc = _mx_step(acc, a_ptrs, w_ptrs, s_ptrs, row_mask, 0, BLOCK_N, BLOCK_K, False)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 32
    if k_full < k_hi:  # ragged last block (K = 2880 is not a multiple of 128)
        acc = _mx_step(acc, a_ptrs, w_ptrs, s_ptrs, row_mask, k_hi - k_full, BLOCK_N, BLOCK_K, True)

    bias = tl.load(bias_ptr + e64 * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if GATE_UP:
        gate, linear = tl.split(tl.reshape(acc + bias[None, :], [BLOCK_M, BLOCK_N // 2, 2]))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        act = gate * tl.sigmoid(alpha * gate) * (linear + 1.0)
        offs_i = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + mx_perm(offs_i)[None, :]
        tl.store(c_ptrs, act.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_i < N // 2)[None, :])
    else:
        weight = tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0)
        y = (acc + tl.where(pid_k == 0, bias, 0.0)[None, :]) * weight[:, None]
        c_ptrs = c_ptr + pid_k * stride_cs + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
        if FUSED_SUM:
            # Last program to finish this column block sums it for every token, then re-arms the
            # ticket (zero between launches, so CUDA-graph replays work).
            tl.debug_barrier()
            ticket = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == num_tiles * SPLIT_K - 1:
                for t0 in range(0, num_tokens, BLOCK_M):
                    _sum_slots(c_ptr, stride_cs, stride_cm, out_ptr, stride_om, t0, offs_n, num_tokens, N,
                               TOP_K, SPLIT_K, BLOCK_M)
                tl.atomic_xchg(counter_ptr + pid_n, 0)


@triton.jit
def _sum_slots_kernel(part_ptr, stride_ps, stride_pm, out_ptr, stride_om, num_tokens, N,
                      TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _sum_slots(part_ptr, stride_ps, stride_pm, out_ptr, stride_om, tl.program_id(0) * BLOCK_T, offs_n, num_tokens, N,
               TOP_K, SPLIT_K, BLOCK_T)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # tokens per tile (the wgmma operand from shared memory): >= M at decode
    block_n: int  # weight rows per tile (the register operand: 64 per warpgroup)
    block_k: int
    split_k: int = 1  # down projection at decode only
    num_warps: int = 8
    num_stages: int = 3


SMALL_M = 64  # up to here every active expert is one tile and the down sum is fused


def pick_config(num_tokens: int, n: int, k: int, top_k: int, num_experts: int, gate_up: bool,
                num_sms: int = 132) -> GemmConfig:
    """Tiles for H100 chosen from sm_90 SASS (instructions per weight element at decode, per MAC at
    prefill); benchmarks/bench_moe_gpu.py --sweep measures the alternatives on the device."""
    block_k = min(256, max(64, triton.next_power_of_2(k)))
    if num_tokens <= SMALL_M:
        block_m = max(16, triton.next_power_of_2(num_tokens))
        # 64 weight rows and 4 warps (167 registers: 3 CTAs per SM) keep batch 1's few programs in one
        # wave; from 32 tokens on all experts are busy and 128 rows halve the token-tile reloads.
        block_n, num_warps = (64, 4) if block_m <= 16 else (128, 8)
        split_k = 1
        if not gate_up:
            # Few active experts (batch 1: 4 experts x 45 column tiles): split K so every SM streams.
            programs = min(num_experts, num_tokens * top_k) * triton.cdiv(n, block_n)
            while split_k < 4 and programs * split_k < 2 * num_sms and k // (block_k * split_k * 2) >= 2:
                split_k *= 2
        return GemmConfig(block_m, block_n, block_k, split_k, num_warps=num_warps, num_stages=3)
    # Prefill is tensor-core bound: 1.5 / 1.8 warp-instructions per 1k MACs and no spills in sm_90
    # SASS (the down epilogue's scatter spills with 256 rows).
    if gate_up:
        return GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
    return GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _check_weights(blocks: torch.Tensor, scales: torch.Tensor, k: int) -> None:
    e, n, kb = blocks.shape
    if kb * 2 != k or k % 32 or scales.shape != (e, n, k // 32) or blocks.stride(2) != 1 or scales.stride(2) != 1:
        raise ValueError(f"MXFP4 weights {tuple(blocks.shape)}/{tuple(scales.shape)} do not match K={k}")


def _launch(a, routing, blocks, scales, bias, c, stride_cs, out, counters, gate_up, fused, limit, alpha, cfg):
    m, top_k = routing.topk_ids.shape
    e, n, _ = blocks.shape
    p = m * top_k
    # One tile per active expert when BLOCK_M covers the batch, else an upper bound on the tiles.
    tiles = min(e, p) if m <= cfg.block_m else triton.cdiv(p, cfg.block_m) + min(e, p)
    _moe_gemm_kernel[(tiles, triton.cdiv(n, cfg.block_n), cfg.split_k)](
        a, a.stride(0),
        blocks, blocks.stride(0), blocks.stride(1),
        scales, scales.stride(0), scales.stride(1),
        bias, bias.stride(0),
        c, stride_cs, c.stride(-2),
        routing.expert_offsets, routing.sorted_pairs, routing.topk_weights,
        out, out.stride(0), counters,
        m, n, blocks.shape[2] * 2, e,
        float(limit), float(alpha),
        TOP_K=top_k, GATE_UP=gate_up, FUSED_SUM=fused, SPLIT_K=cfg.split_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, E_PAD=max(16, triton.next_power_of_2(e)),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )


def gate_up(routing: Routing, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
            limit: float, alpha: float, config: GemmConfig | None = None) -> torch.Tensor:
    """SwiGLU(x @ W1^T + b1) of every pair, by sorted row, K-permuted (see mx_perm): (P, N/2) bf16."""
    x = routing.x_perm
    m, k = x.shape
    e, n, _ = blocks.shape
    top_k = routing.topk_ids.shape[1]
    _check_weights(blocks, scales, k)
    cfg = config or pick_config(m, n, k, top_k, e, True, _num_sms(x.device))
    if cfg.split_k != 1 or cfg.block_n % 64:
        raise ValueError("gate_up needs split_k == 1 and block_n a multiple of 64 (SwiGLU pairs, mx_perm groups)")
    act = torch.empty(m * top_k, n // 2, dtype=torch.bfloat16, device=x.device)
    _launch(x, routing, blocks, scales, bias, act, 0, act, routing.expert_offsets, True, False, limit, alpha, cfg)
    return act


def down(act: torch.Tensor, routing: Routing, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
         out_dtype: torch.dtype, config: GemmConfig | None = None) -> torch.Tensor:
    """sum_k weight_k * (act @ W2^T + b2) per token: (M, N) in out_dtype. act as gate_up returns it."""
    p, k = act.shape
    e, n, _ = blocks.shape
    m, top_k = routing.topk_ids.shape
    _check_weights(blocks, scales, k)
    cfg = config or pick_config(m, n, k, top_k, e, False, _num_sms(act.device))
    fused = m <= SMALL_M and cfg.block_m >= m
    if not fused and cfg.split_k != 1:
        raise ValueError("split-K is only supported on the fused decode path")
    out = torch.empty(m, n, dtype=out_dtype, device=act.device)
    part = torch.empty(cfg.split_k, p, n, dtype=torch.float32 if fused else out_dtype, device=act.device)
    counters = _counters(act.device, triton.cdiv(n, cfg.block_n))
    _launch(act, routing, blocks, scales, bias, part, part.stride(0), out, counters, False, fused, 0.0, 0.0, cfg)
    if not fused:
        block_t, block_n = 32, 128
        _sum_slots_kernel[(triton.cdiv(m, block_t), triton.cdiv(n, block_n))](
            part, part.stride(0), part.stride(1), out, out.stride(0), m, n,
            TOP_K=top_k, SPLIT_K=1, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)
    return out
