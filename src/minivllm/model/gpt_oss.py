"""GPT-OSS in plain torch. Parameter names match the HF checkpoint, so loading is a loop.

Tokens of all sequences in a step are flattened to one (T, hidden) batch; attention finds each
sequence's queries and paged context through the AttentionContext. All math goes through `ops`.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.config import GptOssConfig
from minivllm.model.mxfp4 import dequantize_mxfp4
from minivllm.ops import AttentionContext, Ops


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.weight = _param(dim, dtype=dtype)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q_size, True, dtype)
        self.k_proj = Linear(h, kv_size, True, dtype)
        self.v_proj = Linear(h, kv_size, True, dtype)
        self.o_proj = Linear(q_size, h, True, dtype)
        self.sinks = _param(self.num_heads, dtype=dtype)
        self.sliding_window = config.sliding_window if config.is_sliding(layer_idx) else 0
        self.scale = self.head_dim**-0.5
        self.ops = ops

    def forward(self, x, positions, cos_sin_cache, ctx: AttentionContext, k_cache, v_cache):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary(q, k, positions, cos_sin_cache)
        # Write first, then attend: a sequence can read blocks written earlier in this same step.
        self.ops.write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        out = self.ops.attention(q, k_cache, v_cache, ctx, self.sinks, self.sliding_window, self.scale)
        return self.o_proj(out.reshape(t, -1))


class Experts(nn.Module):
    """MXFP4 experts stay packed (u8); unquantized ones are stored (E, out, in)."""

    def __init__(self, config: GptOssConfig, dtype: torch.dtype):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.quantized = config.quant_method == "mxfp4"
        if self.quantized:
            self.gate_up_proj_blocks = _param(e, 2 * i, h // 32, 16, dtype=torch.uint8)
            self.gate_up_proj_scales = _param(e, 2 * i, h // 32, dtype=torch.uint8)
            self.down_proj_blocks = _param(e, h, i // 32, 16, dtype=torch.uint8)
            self.down_proj_scales = _param(e, h, i // 32, dtype=torch.uint8)
        else:
            self.gate_up_proj = _param(e, 2 * i, h, dtype=dtype)
            self.down_proj = _param(e, h, i, dtype=dtype)
        self.gate_up_proj_bias = _param(e, 2 * i, dtype=dtype)
        self.down_proj_bias = _param(e, h, dtype=dtype)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (2I, H), down (H, I)) of expert e, dequantized if packed."""
        if self.quantized:
            return (dequantize_mxfp4(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e], dtype),
                    dequantize_mxfp4(self.down_proj_blocks[e], self.down_proj_scales[e], dtype))
        return self.gate_up_proj[e].to(dtype), self.down_proj[e].to(dtype)


class MLP(nn.Module):
    def __init__(self, config: GptOssConfig, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.router = Linear(config.hidden_size, config.num_local_experts, True, dtype)
        self.experts = Experts(config, dtype)
        self.top_k, self.limit, self.alpha = config.num_experts_per_tok, config.swiglu_limit, config.swiglu_alpha
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.moe(x, self.router.weight, self.router.bias, self.experts, self.top_k, self.limit, self.alpha)


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ops)
        self.self_attn = Attention(config, layer_idx, dtype, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ops)
        self.mlp = MLP(config, dtype, ops)

    def forward(self, x, residual, positions, cos_sin_cache, ctx, k_cache, v_cache):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin_cache, ctx, k_cache, v_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class GptOssModel(nn.Module):
    def __init__(self, config: GptOssConfig, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ops)


class GptOssForCausalLM(nn.Module):
    def __init__(self, config: GptOssConfig, dtype: torch.dtype, ops: Ops, max_positions: int):
        super().__init__()
        self.config = config
        self.model = GptOssModel(config, dtype, ops)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        inv_freq, scale = config.yarn_inv_freq_and_scale()
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos() * scale, freqs.sin() * scale), -1), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states (T, hidden) of every token; kv_cache is (layers, 2, blocks, block_size, Hkv, D)."""
        x = nn.functional.embedding(input_ids, self.model.embed_tokens.weight)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, ctx, kv_cache[i, 0], kv_cache[i, 1])
        x, _ = self.model.norm(x, residual)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
