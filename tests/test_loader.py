"""Checkpoints: the embedded default, sharded files, and clear errors for broken ones."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivllm import LLM, SamplingParams
from minivllm.model.loader import resolve_model_path
from minivllm.model.tiny import default_model_path


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_embedded_default_is_deterministic_and_real_gpt_oss():
    path = default_model_path()
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["vocab_size"] == 201088 and config["quantization_config"]["quant_method"] == "mxfp4"
    assert json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"] == [200002, 199999, 200012]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8
    assert resolve_model_path(None) == path


def test_llm_keeps_mxfp4_experts_packed(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=32, max_model_len=128)
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(experts, "gate_up_proj")


def test_sharded_checkpoint_loads_identically(tiny_mxfp4, tmp_path):
    path = _copy(tiny_mxfp4, tmp_path)
    tensors = load_file(path / "model.safetensors")
    os.remove(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / shard)
        weight_map.update({k: shard for k in keys})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(path / "model.safetensors.index.json", "w"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(tiny_mxfp4, num_kv_blocks=32, max_model_len=128).generate("shards", params, use_tqdm=False)
    b = LLM(str(path), num_kv_blocks=32, max_model_len=128).generate("shards", params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_missing_tensor_is_named(tiny_mxfp4, tmp_path):
    path = _copy(tiny_mxfp4, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model.layers.1.self_attn.sinks"):
        LLM(str(path), num_kv_blocks=32, max_model_len=128)


def test_wrong_shape_is_named(tiny_mxfp4, tmp_path):
    path = _copy(tiny_mxfp4, tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:-1]

    _edit_tensors(path, shrink)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight .* shape \(63, 64\).*\(64, 64\)"):
        LLM(str(path), num_kv_blocks=32, max_model_len=128)


def test_unsupported_quantization(tiny_mxfp4, tmp_path):
    path = _copy(tiny_mxfp4, tmp_path)
    config = json.load(open(path / "config.json"))
    config["quantization_config"] = {"quant_method": "gptq"}
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported quantization 'gptq'"):
        LLM(str(path), num_kv_blocks=32, max_model_len=128)


def test_quantization_mismatch(tiny_mxfp4, tmp_path):
    path = _copy(tiny_mxfp4, tmp_path)
    config = json.load(open(path / "config.json"))
    del config["quantization_config"]
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="unexpected tensor.*_blocks.*quantization_config"):
        LLM(str(path), num_kv_blocks=32, max_model_len=128)


def test_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="neither a local folder nor a Hugging Face repo id"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="could not download model 'nobody/not-a-model'"):
        LLM("nobody/not-a-model")


def test_kv_cache_too_small_for_max_model_len(tiny_mxfp4):
    with pytest.raises(ValueError, match="max_model_len 1024 needs 64 KV blocks but the cache has 8"):
        LLM(tiny_mxfp4, num_kv_blocks=8, max_model_len=1024)


def test_bfloat16_runs_on_cpu(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, dtype="bfloat16", num_kv_blocks=32, max_model_len=128)
    out = llm.generate("bf16", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
