"""An EAGLE-3 draft head in the `speculators` library's format (e.g. RedHatAI/gpt-oss-20b-speculator.eagle3).

The head predicts the target's next tokens from the target's own hidden states. A draft row at
position p takes the target's residual stream entering layers `eagle_aux_hidden_state_layer_ids`
at p (concatenated; RMS-normed first when `norm_before_fc`, as gpt-oss heads are), projects it with
`fc`, and pairs it with the embedding of token p + 1: the first decoder layer attends over
cat(input_layernorm(embedding), hidden_norm(hidden)), with the hidden part as its residual. The
final norm and `lm_head` score the draft vocabulary; draft id d is target token d + d2t[d]. Later
draft steps feed back the layer stack's output before the final norm (after it with `norm_output`)
in place of the projected target states.

Layers are Llama's (or Qwen3's, with per-head q/k norms): causal attention without sinks (over
a sliding window where `layer_types` says so), rotary from the head's own config, a SiLU-gated
MLP. The head keeps its own paged K/V (see spec_decode/eagle3.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from minivllm.config import GptOssConfig, rope_inv_freq_and_scale
from minivllm.model.gpt_oss import Linear, RMSNorm
from minivllm.ops import AttentionContext, Ops

# What transformers writes for a config field left at its class default: `to_diff_dict` drops it.
_LAYER_DEFAULTS = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, vocab_size=32000),
    "qwen3": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=32768, vocab_size=151936),
}


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3 layers: RMSNorm over each head's q and k
    sliding_windows: list[int]  # per layer: its sliding window (keys it sees), 0 for full attention
    target_hidden_size: int
    target_vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: list[int]
    norm_before_fc: bool
    fc_norm: bool
    norm_before_residual: bool
    norm_output: bool
    num_speculative_tokens: int | None  # the checkpoint's own proposal length, if it names one

    @classmethod
    def from_folder(cls, path: str, target: GptOssConfig) -> "Eagle3Config":
        file = os.path.join(path, "config.json")
        try:
            with open(file) as f:
                raw = json.load(f)
        except OSError as e:
            raise ValueError(f"EAGLE-3 head {path!r}: cannot read config.json ({e})") from None
        return cls.from_dict(raw, target, where=file)

    @classmethod
    def from_dict(cls, raw: dict, target: GptOssConfig, where: str = "config.json") -> "Eagle3Config":
        if "speculators_model_type" not in raw and any("Eagle3" in a for a in raw.get("architectures") or ()):
            raw = _from_flat_layout(raw)
        if raw.get("speculators_model_type") != "eagle3":
            raise ValueError(f"{where}: not an EAGLE-3 head in the speculators format "
                             f"(speculators_model_type is {raw.get('speculators_model_type')!r}, expected 'eagle3')")
        layer = dict(raw.get("transformer_layer_config") or {})
        model_type = layer.get("model_type", "llama")
        if model_type not in _LAYER_DEFAULTS:
            raise ValueError(f"{where}: transformer_layer_config.model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(_LAYER_DEFAULTS)})")
        layer = {**_LAYER_DEFAULTS[model_type], **layer}
        if layer.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {layer['hidden_act']!r} is not supported (only silu)")
        heads = layer["num_attention_heads"]
        rope = dict(layer.get("rope_parameters") or layer.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", layer["rope_theta"])
        aux = raw.get("eagle_aux_hidden_state_layer_ids")
        n = target.num_hidden_layers
        if aux is None:  # speculators' and vLLM's default choice
            aux = [2, n // 2, n - 3]
        if not aux or min(aux) < 0 or max(aux) > n or len(set(aux)) != len(aux):
            raise ValueError(f"{where}: eagle_aux_hidden_state_layer_ids {aux} must be distinct layer ids "
                             f"within [0, {n}] of the {n}-layer target")
        proposals = (raw.get("speculators_config") or {}).get("proposal_methods") or [{}]
        layer_types = layer.get("layer_types") or ["full_attention"] * layer["num_hidden_layers"]
        window = layer.get("sliding_window") or 0
        config = cls(
            hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
            num_layers=layer["num_hidden_layers"], num_heads=heads,
            num_kv_heads=layer.get("num_key_value_heads") or heads,
            head_dim=layer.get("head_dim") or layer["hidden_size"] // heads, rms_norm_eps=layer["rms_norm_eps"],
            rope_theta=rope_theta, rope_scaling=rope, attention_bias=bool(layer.get("attention_bias", False)),
            mlp_bias=bool(layer.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
            sliding_windows=[window if kind == "sliding_attention" else 0 for kind in layer_types],
            target_hidden_size=raw.get("target_hidden_size") or layer["hidden_size"],
            target_vocab_size=layer["vocab_size"], draft_vocab_size=raw.get("draft_vocab_size", 32000),
            aux_layer_ids=list(aux), norm_before_fc=bool(raw.get("norm_before_fc", False)),
            fc_norm=bool(raw.get("fc_norm", False)), norm_before_residual=bool(raw.get("norm_before_residual", False)),
            norm_output=bool(raw.get("norm_output", False)),
            num_speculative_tokens=proposals[0].get("speculative_tokens"),
        )
        if config.target_hidden_size != target.hidden_size:
            raise ValueError(f"{where}: the head reads hidden states of size {config.target_hidden_size}, "
                             f"the target's are {target.hidden_size}: this head was trained for another model")
        if config.target_vocab_size != target.vocab_size:
            raise ValueError(f"{where}: the head's vocabulary has {config.target_vocab_size} tokens, "
                             f"the target's {target.vocab_size}: this head was trained for another model")
        return config

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of all draft layers, per token, per element byte."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _from_flat_layout(raw: dict) -> dict:
    """The EAGLE / ModelOpt layout (architectures LlamaForCausalLMEagle3, the Llama fields at the
    top; the aux layer ids and the norm flags in `eagle_config`, or for the flags at the top) as
    the speculators layout."""
    eagle = raw.get("eagle_config") or {}
    flags = {key: eagle.get(key, raw.get(key)) for key in ("norm_before_residual", "norm_before_fc", "fc_norm",
                                                            "norm_output")}
    return {"speculators_model_type": "eagle3", "transformer_layer_config": {"model_type": "llama", **raw},
            "draft_vocab_size": raw.get("draft_vocab_size", raw.get("vocab_size")),
            "target_hidden_size": raw.get("target_hidden_size"),
            "eagle_aux_hidden_state_layer_ids": eagle.get("eagle_aux_hidden_state_layer_ids"),
            **{key: value for key, value in flags.items() if value is not None}}


class DraftAttention(nn.Module):
    def __init__(self, cfg: Eagle3Config, in_features: int, sliding_window: int, dtype: torch.dtype, ops: Ops):
        super().__init__()
        d, h = cfg.head_dim, cfg.hidden_size
        self.sliding_window = sliding_window
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = Linear(in_features, cfg.num_heads * d, cfg.attention_bias, dtype)
        self.k_proj = Linear(in_features, cfg.num_kv_heads * d, cfg.attention_bias, dtype)
        self.v_proj = Linear(in_features, cfg.num_kv_heads * d, cfg.attention_bias, dtype)
        self.o_proj = Linear(cfg.num_heads * d, h, cfg.attention_bias, dtype)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, ops) if cfg.qk_norm else None
        # No sinks: a sink logit this low takes no softmax mass, so the ops' sink attention is plain attention.
        self.register_buffer("no_sinks", torch.full((cfg.num_heads,), torch.finfo(dtype).min, dtype=dtype),
                             persistent=False)
        self.scale = d**-0.5
        self.ops = ops

    def forward(self, x, positions, cos_sin_cache, ctx: AttentionContext, k_cache, v_cache):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rotary(q, k, positions, cos_sin_cache)
        self.ops.write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        out = self.ops.attention(q, k_cache, v_cache, ctx, self.no_sinks, self.sliding_window, self.scale)
        return self.o_proj(out.reshape(t, -1))


class DraftMLP(nn.Module):
    def __init__(self, cfg: Eagle3Config, dtype: torch.dtype):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, cfg.mlp_bias, dtype)
        self.up_proj = Linear(h, i, cfg.mlp_bias, dtype)
        self.down_proj = Linear(i, h, cfg.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """A Llama decoder layer; the first one reads cat(embedding, hidden) (2 x hidden wide)."""

    def __init__(self, cfg: Eagle3Config, index: int, dtype: torch.dtype, ops: Ops):
        super().__init__()
        h, eps, first = cfg.hidden_size, cfg.rms_norm_eps, index == 0
        self.first, self.norm_before_residual = first, cfg.norm_before_residual
        self.input_layernorm = RMSNorm(h, eps, dtype, ops)
        self.hidden_norm = RMSNorm(h, eps, dtype, ops) if first else None
        self.self_attn = DraftAttention(cfg, 2 * h if first else h, cfg.sliding_windows[index], dtype, ops)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, ops)
        self.mlp = DraftMLP(cfg, dtype)

    def forward(self, x, embeds, positions, cos_sin_cache, ctx, k_cache, v_cache):
        residual = x
        if self.first:
            hidden = self.hidden_norm(x)
            if self.norm_before_residual:
                residual = hidden
            x = torch.cat([self.input_layernorm(embeds), hidden], dim=-1)
        else:
            x = self.input_layernorm(x)
        x = residual + self.self_attn(x, positions, cos_sin_cache, ctx, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(nn.Module):
    """Parameter names are the checkpoint's, so loading is a loop (embed_tokens is optional)."""

    def __init__(self, cfg: Eagle3Config, dtype: torch.dtype, ops: Ops, max_positions: int):
        super().__init__()
        self.config = cfg
        h, eps, num_aux = cfg.hidden_size, cfg.rms_norm_eps, len(cfg.aux_layer_ids)
        self.embed_tokens: nn.Module | None = None  # set by the loader: the head's own, or the target's
        th = cfg.target_hidden_size  # the aux states are the target's
        self.input_norm = RMSNorm(num_aux * th, eps, dtype, ops) if cfg.norm_before_fc else None
        self.fc_norm = nn.ModuleList(RMSNorm(th, eps, dtype, ops) for _ in range(num_aux)) if cfg.fc_norm else None
        self.fc = Linear(num_aux * cfg.target_hidden_size, h, False, dtype)
        self.layers = nn.ModuleList(DraftLayer(cfg, i, dtype, ops) for i in range(cfg.num_layers))
        self.norm = RMSNorm(h, eps, dtype, ops)
        self.lm_head = Linear(h, cfg.draft_vocab_size, False, dtype)
        # Draft id -> target id offset; absent (zeros) when the head scores the target's whole vocabulary.
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        inv_freq, scale = rope_inv_freq_and_scale(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos() * scale, freqs.sin() * scale), -1),
                             persistent=False)

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's concatenated aux hidden states (T, num_aux x target hidden) -> the head's input (T, hidden)."""
        if self.input_norm is not None:
            aux = self.input_norm(aux)
        elif self.fc_norm is not None:
            aux = torch.cat([norm(part) for norm, part in zip(self.fc_norm, aux.chunk(len(self.fc_norm), -1))], -1)
        return self.fc(aux)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed hidden states to score, hidden states to feed back) for T rows; kv_cache is the
        head's (layers, 2, blocks, block_size, Hkv, D)."""
        embeds = self.embed_tokens(input_ids)
        x = hidden
        for i, layer in enumerate(self.layers):
            x = layer(x, embeds, positions, self.cos_sin_cache, ctx, kv_cache[i, 0], kv_cache[i, 1])
        normed = self.norm(x)
        return normed, normed if self.config.norm_output else x

    @torch.inference_mode()
    def draft_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """The target token ids of the draft vocabulary's argmax for each row."""
        draft = self.lm_head(normed).argmax(dim=-1)
        return draft + self.d2t[draft]
