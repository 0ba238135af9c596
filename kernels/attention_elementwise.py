"""The attention kernels' small companions: the paged KV-cache write, and the sink correction
applied to an attention output that came with its log-sum-exp (FA3)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding (CUDA-graph batch slots with no sequence): nothing to write
        return
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + page * stride_kcb + offset * stride_kct + h[:, None] * stride_kch + d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + offset * stride_vct + h[:, None] * stride_vch + d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter K/V (T, Hkv, D) into the paged cache (blocks, block_size, Hkv, D); slot < 0 is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1], num_warps=1,
    )


@triton.jit
def _sink_correction_kernel(
    out_ptr, lse_ptr, sinks_ptr, stride_ot, stride_oh, stride_lh, stride_lt,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    ok = h < NUM_HEADS
    lse = tl.load(lse_ptr + h * stride_lh + token * stride_lt, mask=ok, other=0.0)
    sink = tl.load(sinks_ptr + h, mask=ok, other=0.0).to(tl.float32)
    keep = 1.0 / (1.0 + tl.exp(sink - lse))  # sigmoid(lse - sink); lse = -inf (no keys) gives 0
    ptrs = out_ptr + token * stride_ot + h[:, None] * stride_oh + d[None, :]
    o = tl.load(ptrs, mask=ok[:, None])
    tl.store(ptrs, (o.to(tl.float32) * keep[:, None]).to(out_ptr.dtype.element_ty), mask=ok[:, None])


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """In place: out (T, H, D) of a softmax without the sink, lse (H, T) its natural log-sum-exp.

    Adding a sink logit s to the softmax's denominator scales every output by
    e^lse / (e^lse + e^s) = sigmoid(lse - s).
    """
    num_tokens, num_heads, head_dim = out.shape
    if num_tokens:
        _sink_correction_kernel[(num_tokens,)](
            out, lse, sinks, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            NUM_HEADS=num_heads, BLOCK_H=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim, num_warps=4,
        )
    return out


def apply_sinks_torch(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The same correction in plain torch (the formula's readable form; used by tests)."""
    keep = torch.sigmoid(lse.float() - sinks.float()[:, None])  # (H, T)
    return (out.float() * keep.t()[:, :, None]).to(out.dtype)
