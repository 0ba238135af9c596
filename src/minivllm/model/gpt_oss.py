"""GPT-OSS in plain torch. Parameter names match the HF checkpoint, so loading is a loop.

Tokens of all sequences in a step are flattened to one (T, hidden) batch; attention finds each
sequence's queries and paged context through the AttentionContext. All math goes through `ops`.

Under tensor parallelism (tp ranks) each rank builds only its shard, as vLLM shards GPT-OSS: q/k/v
by heads (sinks with their heads), o_proj by its input columns; experts along the intermediate
dimension; embedding and lm_head by vocabulary rows. Each sharded parameter carries `tp_shard` =
(dim, start, end), the slice of the checkpoint tensor it holds (the loader reads just that), and
biases of partial sums (o_proj, experts' down_proj) carry `tp_rank0_only`: other ranks hold zeros,
so the all-reduce adds them once.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.config import GptOssConfig
from minivllm.distributed.parallel_state import all_reduce, gather_vocab, shard, tp_rank, tp_size
from minivllm.model.mxfp4 import BLOCK, dequantize_mxfp4
from minivllm.ops import AttentionContext, Ops


def _param(*shape: int, dtype: torch.dtype, tp_shard: tuple[int, int, int] | None = None,
           tp_rank0_only: bool = False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    if tp_size() > 1:
        p.tp_shard, p.tp_rank0_only = tp_shard, tp_rank0_only
    return p


class Linear(nn.Module):
    """out_shard = (start, end): this rank's output rows (column-parallel); in_shard: its input
    columns (row-parallel: the output is a partial sum, the bias added on rank 0 only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 out_shard: tuple[int, int] | None = None, in_shard: tuple[int, int] | None = None):
        super().__init__()
        out_range, in_range = out_shard or (0, out_features), in_shard or (0, in_features)
        w_shard = (0, *out_shard) if out_shard else (1, *in_shard) if in_shard else None
        self.weight = _param(out_range[1] - out_range[0], in_range[1] - in_range[0], dtype=dtype, tp_shard=w_shard)
        self.bias = _param(out_range[1] - out_range[0], dtype=dtype, tp_shard=(0, *out_shard) if out_shard else None,
                           tp_rank0_only=in_shard is not None) if bias else None

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
        rank, tp = tp_rank(), tp_size()
        self.num_heads, self.num_kv_heads = config.num_attention_heads // tp, config.num_key_value_heads // tp
        self.head_dim = d = config.head_dim
        h, q_size, kv_size = config.hidden_size, config.num_attention_heads * d, config.num_key_value_heads * d
        # This rank's heads: a contiguous run of KV heads and the query heads that share them.
        q_shard = (rank * self.num_heads * d, (rank + 1) * self.num_heads * d) if tp > 1 else None
        kv_shard = (rank * self.num_kv_heads * d, (rank + 1) * self.num_kv_heads * d) if tp > 1 else None
        self.q_proj = Linear(h, q_size, True, dtype, out_shard=q_shard)
        self.k_proj = Linear(h, kv_size, True, dtype, out_shard=kv_shard)
        self.v_proj = Linear(h, kv_size, True, dtype, out_shard=kv_shard)
        self.o_proj = Linear(q_size, h, True, dtype, in_shard=q_shard)
        self.sinks = _param(self.num_heads, dtype=dtype,
                            tp_shard=(0, rank * self.num_heads, (rank + 1) * self.num_heads))
        self.reduce = tp > 1
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
        out = self.o_proj(out.reshape(t, -1))
        return all_reduce(out) if self.reduce else out


class Experts(nn.Module):
    """MXFP4 experts stay packed (u8); unquantized ones are stored (E, out, in).

    Under tp each rank holds intermediate channels [i0, i1) of every expert: gate_up rows
    [2·i0, 2·i1) (gate and linear rows are interleaved, so a contiguous run keeps its pairs) and
    down_proj input columns [i0, i1), cut in whole MXFP4 blocks so packed bytes slice as they are."""

    def __init__(self, config: GptOssConfig, dtype: torch.dtype):
        super().__init__()
        e, h = config.num_local_experts, config.hidden_size
        self.quantized = config.quant_method == "mxfp4"
        i0, i1 = shard(config.intermediate_size, tp_rank(), tp_size(), BLOCK if self.quantized else 1)
        i, rows, cols = i1 - i0, (1, 2 * i0, 2 * i1), (2, i0, i1)
        if self.quantized:
            blocks = (2, i0 // BLOCK, i1 // BLOCK)
            self.gate_up_proj_blocks = _param(e, 2 * i, h // BLOCK, 16, dtype=torch.uint8, tp_shard=rows)
            self.gate_up_proj_scales = _param(e, 2 * i, h // BLOCK, dtype=torch.uint8, tp_shard=rows)
            self.down_proj_blocks = _param(e, h, i // BLOCK, 16, dtype=torch.uint8, tp_shard=blocks)
            self.down_proj_scales = _param(e, h, i // BLOCK, dtype=torch.uint8, tp_shard=blocks)
        else:
            self.gate_up_proj = _param(e, 2 * i, h, dtype=dtype, tp_shard=rows)
            self.down_proj = _param(e, h, i, dtype=dtype, tp_shard=cols)
        self.gate_up_proj_bias = _param(e, 2 * i, dtype=dtype, tp_shard=rows)
        self.down_proj_bias = _param(e, h, dtype=dtype, tp_rank0_only=True)

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
        self.reduce = tp_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The router is replicated: every rank picks the same experts and runs its slice of each.
        out = self.ops.moe(x, self.router.weight, self.router.bias, self.experts, self.top_k, self.limit, self.alpha)
        return all_reduce(out) if self.reduce else out


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


class VocabParallelEmbedding(nn.Module):
    """The embedding rows [start, end) of this rank's vocabulary share; a token outside it embeds
    to zeros here, and the all-reduce brings in the one rank that holds it."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.start, self.end = shard(vocab_size, tp_rank(), tp_size())
        self.weight = _param(self.end - self.start, hidden_size, dtype=dtype, tp_shard=(0, self.start, self.end))
        self.reduce = tp_size() > 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return nn.functional.embedding(input_ids, self.weight)
        outside = (input_ids < self.start) | (input_ids >= self.end)
        x = nn.functional.embedding((input_ids - self.start).masked_fill_(outside, 0), self.weight)
        return all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class GptOssModel(nn.Module):
    def __init__(self, config: GptOssConfig, dtype: torch.dtype, ops: Ops):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ops)


class GptOssForCausalLM(nn.Module):
    def __init__(self, config: GptOssConfig, dtype: torch.dtype, ops: Ops, max_positions: int):
        super().__init__()
        self.config = config
        self.model = GptOssModel(config, dtype, ops)
        self.gather = tp_size() > 1  # fixed at construction, like every tp choice of the model
        vocab_shard = shard(config.vocab_size, tp_rank(), tp_size()) if self.gather else None
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype, out_shard=vocab_shard)
        inv_freq, scale = config.yarn_inv_freq_and_scale()
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos() * scale, freqs.sin() * scale), -1), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                kv_cache: torch.Tensor, aux_layers: tuple[int, ...] = ()):
        """Hidden states (T, hidden) of every token; kv_cache is (layers, 2, blocks, block_size, Hkv, D).

        With `aux_layers` (an EAGLE-3 head's layer ids), also the residual stream entering each of
        those layers (id num_layers: leaving the last one), concatenated in layer order: (hidden, aux)."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        aux = []
        for i, layer in enumerate(self.model.layers):
            if i in aux_layers:
                aux.append(x if residual is None else x + residual)
            x, residual = layer(x, residual, positions, self.cos_sin_cache, ctx, kv_cache[i, 0], kv_cache[i, 1])
        if len(self.model.layers) in aux_layers:
            aux.append(x + residual)
        x, _ = self.model.norm(x, residual)
        return (x, torch.cat(aux, dim=-1)) if aux_layers else x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(T, vocab) float32 logits; under tp, on rank 0 only (gathered from the vocab shards)."""
        logits = self.lm_head(hidden).float()
        return gather_vocab(logits, self.config.vocab_size) if self.gather else logits
