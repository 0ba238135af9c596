"""Engine arguments (what a user sets) and the GPT-OSS model config (what a checkpoint says)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # torch loads lazily: the worker parses its config before the ~2 s torch import
    import torch


class EngineArgs(BaseModel):
    """Every knob of the engine; names follow vLLM's engine args."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str | None = Field(None, description="HF repo id or local folder; None serves the embedded tiny model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer name; GPT-OSS always uses o200k_harmony.")
    hf_token: str | None = Field(None, description="Hugging Face token for gated or private repos.")
    download_dir: str | None = Field(None, description="Where hub downloads go (default: the HF cache).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Activation dtype: auto = bfloat16 on GPU, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    max_model_len: int | None = Field(None, ge=1, description="Max prompt + output tokens per sequence.")
    max_num_seqs: int = Field(256, ge=1, description="Max sequences in one batch.")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget of one engine step.")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(None, ge=2, description="Explicit KV-cache size in blocks (overrides sizing).")
    kv_cache_space_gib: float = Field(1.0, gt=0, description="KV-cache size on CPU, in GiB.")
    gpu_memory_utilization: float = Field(0.95, gt=0, le=1, description="Fraction of GPU memory the engine may use.")
    background_priority: int | None = Field(
        10, description="Requests with at least this priority value (the Batch API's lines: 10) run only in steps "
        "with no other request: they use idle capacity and never slow a real-time one. none: plain priority order.")
    deterministic: bool = Field(
        False, description="Batch-invariant results: a request's tokens (greedy or seeded) and logprobs are the same "
        "alone or in any batch. Each request's part of a step runs alone, prefill chunks have fixed sizes, no "
        "prefix caching; costs the batching's speed-up.")
    async_scheduling: bool | None = Field(
        None, description="Overlap: schedule and launch step N+1 before processing step N's tokens, so the host's work "
        "hides behind the device's. none: on with a CUDA device (off with speculative decoding, deterministic mode, "
        "tp > 1); false: off (debugging); true: on, also on a CPU (same outputs, no gain there).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    seed: int = Field(0, description="Seed of the engine's global random generator.")
    tensor_parallel_size: int = Field(
        1, ge=1, le=8, description="GPUs (ranks) the model is split across, one node; the engine process is rank 0.")
    ops_backend: Literal["auto", "reference", "kernels"] = Field(
        "auto", description="auto: compiled kernels where available; reference: pure torch; kernels: kernels or fail.")
    # str first: the CLI flag and the env var give JSON text; a dict comes from Python or a config file.
    speculative_config: str | dict | None = Field(
        None, description='Speculative decoding, vLLM\'s keys as JSON, e.g. {"method": "ngram", '
        '"num_speculative_tokens": 3, "prompt_lookup_max": 4} or {"method": "eagle3", "model": '
        '"RedHatAI/gpt-oss-20b-speculator.eagle3", "num_speculative_tokens": 3}; off when unset.')

    @model_validator(mode="after")
    def _check_deterministic(self) -> "EngineArgs":
        if self.deterministic and self.speculative_config is not None:
            raise ValueError("deterministic mode does not combine with speculative_config: how many drafts a "
                             "step verifies depends on the batch")
        if self.deterministic and self.max_num_batched_tokens <= self.max_num_seqs:
            raise ValueError(f"deterministic mode needs max_num_batched_tokens ({self.max_num_batched_tokens}) > "
                             f"max_num_seqs ({self.max_num_seqs}): a fixed-size prefill chunk must fit beside "
                             "every running decode")
        return self

    @model_validator(mode="after")
    def _check_async_scheduling(self) -> "EngineArgs":
        if self.async_scheduling:
            clash = [name for name, on in (("speculative_config", self.speculative_config is not None),
                                            ("deterministic", self.deterministic),
                                            ("tensor_parallel_size > 1", self.tensor_parallel_size > 1)) if on]
            if clash:
                raise ValueError(f"async_scheduling does not combine with {', '.join(clash)} (yet)")
        return self

    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return (self.resolved_device().type == "cuda" and self.speculative_config is None and not self.deterministic
                and self.tensor_parallel_size == 1)

    @field_validator("max_model_len", "num_kv_blocks", "background_priority", "async_scheduling", mode="before")
    @classmethod
    def _none_text(cls, value):
        """`none` (an env var, a config file) unsets an optional number, as the flags' `none` does."""
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _check_speculative_config(cls, value):
        from minivllm.engine.spec_decode.config import parse_speculative_config

        return parse_speculative_config(value)

    def resolved_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> "torch.dtype":
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass
class GptOssConfig:
    """The fields of a GPT-OSS config.json that the model needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    layer_types: list[str]
    sliding_window: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling: dict = field(default_factory=dict)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    quant_method: str | None = None  # "mxfp4" or None (unquantized)
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cfg: dict) -> "GptOssConfig":
        model_type = cfg.get("model_type")
        if model_type != "gpt_oss":
            raise ValueError(f"unsupported model_type {model_type!r}: this engine serves GPT-OSS ('gpt_oss') checkpoints")
        n_layers = cfg["num_hidden_layers"]
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
        ]
        # transformers 5 writes rope_parameters (with rope_theta inside); older files rope_scaling + rope_theta.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 150000.0))
        quant = cfg.get("quantization_config")
        quant_method = quant.get("quant_method") if quant else None
        if quant_method not in (None, "mxfp4"):
            raise ValueError(f"unsupported quantization {quant_method!r}: only MXFP4 experts or unquantized weights")
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            num_local_experts=cfg["num_local_experts"],
            num_experts_per_tok=cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4)),
            layer_types=list(layer_types),
            sliding_window=cfg.get("sliding_window") or 128,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            rope_theta=rope_theta,
            rope_scaling=rope,
            swiglu_limit=cfg.get("swiglu_limit", 7.0),
            swiglu_alpha=cfg.get("swiglu_alpha", 1.702),
            quant_method=quant_method,
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )

    @classmethod
    def from_folder(cls, path: str) -> "GptOssConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(config_path) as f:
            config = cls.from_dict(json.load(f))
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        return config

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of all layers, per token, per element byte."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def yarn_inv_freq_and_scale(self) -> tuple["torch.Tensor", float]:
        """NeoX YaRN inverse frequencies and the cos/sin scale (same math as the reference and HF)."""
        return rope_inv_freq_and_scale(self.head_dim, self.rope_theta, self.rope_scaling)


def rope_inv_freq_and_scale(dim: int, base: float, rope_scaling: dict) -> tuple["torch.Tensor", float]:
    """Rotary inverse frequencies and the cos/sin scale for HF's `default`, `yarn` and `llama3` rope types
    (the same math as transformers' rope init functions)."""
    import torch

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type")) or "default"
    if rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(1.0 / pos_freqs, rope_scaling), 1.0
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, yarn, llama3)")
    factor = float(rope_scaling["factor"])
    orig = rope_scaling["original_max_position_embeddings"]
    beta_fast = rope_scaling.get("beta_fast") or 32.0
    beta_slow = rope_scaling.get("beta_slow") or 1.0
    scale = rope_scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, scale


def _llama3_inv_freq(inv_freq: "torch.Tensor", rope_scaling: dict) -> "torch.Tensor":
    """Llama 3's frequency scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    import torch

    factor = float(rope_scaling["factor"])
    low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
    old_len = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)
