"""The reference MoE keeps a small layer's MXFP4 experts dequantized."""

from __future__ import annotations

import torch

from minivllm.ops import reference


def test_small_mxfp4_experts_are_dequantized_once(tiny_mxfp4, monkeypatch):
    """A small layer's experts are dequantized on first use and reused (same values); past the
    byte budget they are dequantized at every use."""
    from minivllm.config import GptOssConfig
    from minivllm.model.gpt_oss import Experts

    experts = Experts(GptOssConfig.from_folder(tiny_mxfp4), torch.float32)
    g = torch.Generator().manual_seed(0)
    for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
        param = getattr(experts, name)
        high = 256 if "blocks" in name else 130  # scales near 2^0
        param.data.copy_(torch.randint(120 if "scales" in name else 0, high, param.shape, generator=g))
    first = reference._expert_weights(experts, 1, torch.float32)
    again = reference._expert_weights(experts, 1, torch.float32)
    assert again[0] is first[0] and again[1] is first[1]
    fresh = experts.expert_weights(1, torch.float32)
    assert torch.equal(first[0], fresh[0]) and torch.equal(first[1], fresh[1])
    monkeypatch.setattr(reference, "DEQUANTIZED_EXPERTS_BYTES", 0)
    assert reference._expert_weights(experts, 2, torch.float32)[0] is not reference._expert_weights(
        experts, 2, torch.float32)[0]
