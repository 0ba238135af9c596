"""Pure-torch reference implementations: readable, exact (fp32 on CPU), the oracle for kernels."""

from __future__ import annotations

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
    and contributes no value.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    sink_logits = sinks.float().view(num_kv_heads, group, 1, 1)
    for i, ctx_len in enumerate(ctx.context_lens):
        start, end = ctx.query_start_loc[i], ctx.query_start_loc[i + 1]
        n = end - start
        first_pos = ctx_len - n
        key_start = max(0, first_pos - sliding_window + 1) if sliding_window else 0
        first_block, last_block = key_start // ctx.block_size, (ctx_len - 1) // ctx.block_size
        blocks = ctx.block_tables[i, first_block : last_block + 1]
        offset = key_start - first_block * ctx.block_size
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[offset : offset + ctx_len - key_start]
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[offset : offset + ctx_len - key_start]

        qi = q[start:end].float().view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.einsum("hgnd,lhd->hgnl", qi, keys.float()) * scale
        q_pos = torch.arange(first_pos, ctx_len, device=q.device)[:, None]
        k_pos = torch.arange(key_start, ctx_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window:
            visible &= q_pos - k_pos < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        combined = torch.cat([scores, sink_logits.expand(-1, -1, n, 1)], dim=-1)
        probs = torch.softmax(combined - combined.amax(-1, keepdim=True), dim=-1)[..., :-1]
        oi = torch.einsum("hgnl,lhd->nhgd", probs, values.float())
        out[start:end] = oi.reshape(n, -1, head_dim).to(q.dtype)
    return out


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
    """Mixture of experts, one routed expert at a time; MXFP4 experts are dequantized on the fly."""
    weights, expert_ids = route(x, router_weight, router_bias, top_k)
    out = torch.zeros_like(x)
    for e in expert_ids.unique().tolist():
        tokens, slots = (expert_ids == e).nonzero(as_tuple=True)
        gate_up_w, down_w = experts.expert_weights(e, x.dtype)
        h = F.linear(x[tokens], gate_up_w, experts.gate_up_proj_bias[e])
        y = F.linear(swiglu(h, swiglu_limit, swiglu_alpha), down_w, experts.down_proj_bias[e])
        out.index_add_(0, tokens, y * weights[tokens, slots, None])
    return out

