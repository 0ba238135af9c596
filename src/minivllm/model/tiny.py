"""The embedded default model: a tiny random GPT-OSS written in the exact HF layout.

Real vocab (201088, o200k_harmony), MXFP4-packed experts, config.json and generation_config.json,
generated deterministically from a seed, so the engine runs with no GPU and no network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from minivllm.model.mxfp4 import quantize_mxfp4

TINY_CONFIG = dict(
    vocab_size=201088, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
    num_experts_per_tok=2, sliding_window=128, max_position_embeddings=131072,
)
EOS_TOKEN_IDS = [200002, 199999, 200012]


def cache_dir() -> str:
    return os.environ.get("MINIVLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minivllm")


def default_model_path() -> str:
    """The embedded default's folder, written on first use."""
    path = os.path.join(cache_dir(), "models", "tiny-gpt-oss-mxfp4-seed0")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_tiny_checkpoint(path, seed=0)
    return path


def hf_config(quantized: bool = True, **overrides) -> dict:
    cfg = dict(TINY_CONFIG, **overrides)
    n = cfg["num_hidden_layers"]
    cfg.update(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", torch_dtype="bfloat16",
        attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        swiglu_limit=7.0, rope_theta=150000.0, experts_per_token=cfg["num_experts_per_tok"],
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "truncate": False, "original_max_position_embeddings": 4096},
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
        eos_token_id=200002, pad_token_id=199999, use_cache=True,
    )
    if quantized:
        cfg["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        }
    return cfg


def random_state_dict(cfg: dict, seed: int, quantized: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    h, v, e, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"], cfg["intermediate_size"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    sd = {"model.embed_tokens.weight": randn(v, h, std=1.0), "model.norm.weight": 1 + randn(h, std=0.1),
          "lm_head.weight": randn(v, h, std=0.5)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd[p + "input_layernorm.weight"] = 1 + randn(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + randn(h, std=0.1)
        for name, out_dim in (("q_proj", hq * d), ("k_proj", hkv * d), ("v_proj", hkv * d)):
            sd[p + f"self_attn.{name}.weight"] = randn(out_dim, h, std=0.2)
            sd[p + f"self_attn.{name}.bias"] = randn(out_dim, std=0.1)
        sd[p + "self_attn.o_proj.weight"] = randn(h, hq * d, std=0.1)
        sd[p + "self_attn.o_proj.bias"] = randn(h, std=0.02)
        sd[p + "self_attn.sinks"] = randn(hq, std=1.0)
        sd[p + "mlp.router.weight"] = randn(e, h, std=0.2)
        sd[p + "mlp.router.bias"] = randn(e, std=0.1)
        gate_up = torch.randn(e, 2 * i, h, generator=g) * 0.2  # (E, out, in)
        down = torch.randn(e, h, i, generator=g) * 0.2
        if quantized:
            for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
                blocks, scales = quantize_mxfp4(w)
                sd[p + f"mlp.experts.{name}_blocks"], sd[p + f"mlp.experts.{name}_scales"] = blocks, scales
        else:  # HF's unquantized layout is (E, in, out)
            sd[p + "mlp.experts.gate_up_proj"] = gate_up.transpose(1, 2).contiguous().to(dtype)
            sd[p + "mlp.experts.down_proj"] = down.transpose(1, 2).contiguous().to(dtype)
        sd[p + "mlp.experts.gate_up_proj_bias"] = randn(e, 2 * i, std=0.1)
        sd[p + "mlp.experts.down_proj_bias"] = randn(e, h, std=0.02)
    return sd


def write_tiny_checkpoint(path: str, seed: int = 0, quantized: bool = True, dtype: torch.dtype = torch.bfloat16,
                          **config_overrides) -> str:
    """Write a random GPT-OSS checkpoint into `path` (atomically: readers never see half a model)."""
    cfg = hf_config(quantized, **config_overrides)
    state = random_state_dict(cfg, seed, quantized, dtype)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 199998, "eos_token_id": EOS_TOKEN_IDS, "pad_token_id": 199999}, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# 8 cycles of 5 tokens that write_copy_checkpoint's model follows.
CYCLE = list(range(1000, 1000 + 40 * 13, 13))


def write_copy_checkpoint(path: str, shift: int) -> str:
    """The tiny checkpoint made to repeat itself, for speculative decoding's tests and benchmark:
    lm_head maps token CYCLE[i]'s embedding to the next token of its 5-cycle (every other row is
    zero), and the layers' outputs are scaled by 2**-shift so the last hidden state stays close to
    the current token's embedding. shift 1: follows the cycles about half of the time (drafts partly
    accepted); shift 4: copies the cycle exactly."""
    write_tiny_checkpoint(path, seed=1, sliding_window=16)
    state = load_file(f"{path}/model.safetensors")
    embed = state["model.embed_tokens.weight"].float()
    head = torch.zeros(state["lm_head.weight"].shape)
    for i, token in enumerate(CYCLE):
        head[CYCLE[i // 5 * 5 + (i + 1) % 5]] = embed[token] / embed[token].norm() * 40
    for name in list(state):
        if name.endswith(("o_proj.weight", "o_proj.bias", "down_proj_bias")):
            state[name] = state[name] / 2**shift
        elif name.endswith("down_proj_scales"):  # MXFP4 scales are powers of two
            state[name] = state[name] - shift
    state["lm_head.weight"] = head.to(state["lm_head.weight"].dtype)
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def write_copy_eagle3_head(path: str, target_path: str, num_speculative_tokens: int = 3,
                           own_embedding: bool = False) -> str:
    """An EAGLE-3 head (speculators format) for write_copy_checkpoint's model: its draft vocabulary
    is the 40 CYCLE tokens, and its first draft is the cycle token after the one the target is about
    to emit, so it is accepted whenever the target follows its cycle; later drafts repeat the first
    (usually rejected). It reads the target's last residual state (aux layer id num_layers) through
    `fc` unchanged (its layer adds zeros), and scores it with the target's own final norm and
    lm_head rows."""
    with open(os.path.join(target_path, "config.json")) as f:
        target_cfg = json.load(f)
    target = load_file(os.path.join(target_path, "model.safetensors"))
    h, n, d = target_cfg["hidden_size"], target_cfg["num_hidden_layers"], target_cfg["head_dim"]
    q, kv, i = target_cfg["num_attention_heads"] * d, target_cfg["num_key_value_heads"] * d, 128
    layer = dict(model_type="llama", hidden_size=h, intermediate_size=i,
                 num_attention_heads=target_cfg["num_attention_heads"],
                 num_key_value_heads=target_cfg["num_key_value_heads"], head_dim=d, num_hidden_layers=1,
                 vocab_size=target_cfg["vocab_size"], rms_norm_eps=1e-5, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
           "transformer_layer_config": layer, "draft_vocab_size": len(CYCLE), "norm_before_fc": False,
           "eagle_aux_hidden_state_layer_ids": [1, 2, n],
           "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                  "proposal_methods": [{"proposal_type": "greedy",
                                                        "speculative_tokens": num_speculative_tokens}],
                                  "verifier": {"name_or_path": None, "architectures": ["GptOssForCausalLM"]}}}

    def after(token: int, steps: int) -> int:
        at = CYCLE.index(token)
        return CYCLE[at // 5 * 5 + (at + steps) % 5]

    g = torch.Generator().manual_seed(0)
    state = {"fc.weight": torch.cat([torch.zeros(h, 2 * h), torch.eye(h)], dim=1),
             "norm.weight": target["model.norm.weight"].float(),
             "lm_head.weight": target["lm_head.weight"].float()[[after(t, 1) for t in CYCLE]],
             "d2t": torch.tensor([after(t, 2) - d for d, t in enumerate(CYCLE)]),
             "t2d": torch.zeros(target_cfg["vocab_size"], dtype=torch.bool)}
    state["t2d"][[after(t, 2) for t in CYCLE]] = True
    p = "layers.0."
    for name, shape in (("self_attn.q_proj", (q, 2 * h)), ("self_attn.k_proj", (kv, 2 * h)),
                        ("self_attn.v_proj", (kv, 2 * h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h))):
        state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.1
    state[p + "self_attn.o_proj.weight"] = torch.zeros(h, q)  # the layer adds nothing to its input state
    state[p + "mlp.down_proj.weight"] = torch.zeros(h, i)
    for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        state[p + name + ".weight"] = torch.ones(h)
    if own_embedding:
        state["embed_tokens.weight"] = target["model.embed_tokens.weight"]
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path
