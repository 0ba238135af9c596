"""GPU checks of the SM90 kernels at gpt-oss-20b shapes (hidden 2880, 32 experts, top-4) in bf16:
Triton MoE vs the torch reference, CUDA-graph replay, and the csrc ops vs the reference.
Skipped without CUDA. Benchmarks: benchmarks/bench_moe_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 would run these in the CPU interpreter", allow_module_level=True)

from minivllm.config import GptOssConfig  # noqa: E402
from minivllm.model.gpt_oss import Experts  # noqa: E402
from minivllm.model.mxfp4 import dequantize_mxfp4  # noqa: E402
from minivllm.ops import reference  # noqa: E402

E, H, I, TOP_K = 32, 2880, 2880, 4
LIMIT, ALPHA = 7.0, 1.702
DEV = torch.device("cuda")


def random_experts(num_experts=E, hidden=H, inter=I, seed=0, device=DEV) -> Experts:
    """Experts with random packed weights and scales like a trained checkpoint's (2^-9 .. 2^-4)."""
    cfg = GptOssConfig(vocab_size=16, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_local_experts=num_experts,
                       num_experts_per_tok=TOP_K, layer_types=["full_attention"], quant_method="mxfp4")
    experts = Experts(cfg, torch.bfloat16).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in (experts.gate_up_proj_blocks, experts.down_proj_blocks):
            p.copy_(torch.randint(0, 256, p.shape, dtype=torch.uint8, device=device, generator=g))
        for p in (experts.gate_up_proj_scales, experts.down_proj_scales):
            p.copy_(torch.randint(118, 124, p.shape, dtype=torch.uint8, device=device, generator=g))
        experts.gate_up_proj_bias.normal_(std=0.5, generator=g)
        experts.down_proj_bias.normal_(std=0.5, generator=g)
    return experts


def router(m: int, seed: int, hidden=H, num_experts=E):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, hidden, device=DEV, generator=g).to(torch.bfloat16)
    w = (torch.randn(num_experts, hidden, device=DEV, generator=g) * 0.02).to(torch.bfloat16)
    b = (torch.randn(num_experts, device=DEV, generator=g) * 0.1).to(torch.bfloat16)
    return x, w, b


@pytest.fixture(scope="module")
def experts():
    return random_experts()


def _oracle(x, weights, ids, experts):
    """fp32 math on the bf16 inputs with a given routing; the activation rounded to bf16 like GEMM1."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        w1 = dequantize_mxfp4(experts.gate_up_proj_blocks[e], experts.gate_up_proj_scales[e])
        w2 = dequantize_mxfp4(experts.down_proj_blocks[e], experts.down_proj_scales[e])
        h = x[tokens].float() @ w1.T + experts.gate_up_proj_bias[e].float()
        a = reference.swiglu(h, LIMIT, ALPHA).to(torch.bfloat16).float()
        y = a @ w2.T + experts.down_proj_bias[e].float()
        out.index_add_(0, tokens, y * weights[tokens, slots, None].float())
    return out


@pytest.mark.parametrize("m", [1, 3, 8, 64, 65, 300, 4096])
def test_moe_matches_reference(m, experts):
    from minivllm.kernels.moe_routing import route
    from minivllm.ops import moe_triton

    x, w, b = router(m, seed=m)
    out = moe_triton.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA)
    assert moe_triton._broken is None, moe_triton._broken
    assert out.dtype == torch.bfloat16 and out.shape == x.shape

    r = route(x, w, b, TOP_K)
    ref_weights, ref_ids = reference.route(x, w, b, TOP_K)
    # Both round the logits to bf16 after an fp32 sum (in another order): only near-ties may pick
    # differently, so every expert chosen must be within a hair of the exact top-k boundary.
    logits = torch.nn.functional.linear(x.float(), w.float(), b.float())
    boundary = logits.topk(TOP_K, dim=-1).values[:, -1]
    chosen = logits.gather(1, r.topk_ids.long()).min(-1).values
    assert (chosen >= boundary - 2e-2 * boundary.abs().clamp(min=1)).all()
    same = (r.topk_ids.long().sort(-1).values == ref_ids.sort(-1).values).all(-1)
    torch.testing.assert_close(r.topk_weights[same], ref_weights[same].float(), rtol=2e-2, atol=1e-2)

    exact = _oracle(x, r.topk_weights, r.topk_ids.long(), experts)
    scale = exact.abs().max().item()
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=1e-2 * scale)
    ref = reference.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA)  # bf16 torch, rounding at every step
    torch.testing.assert_close(out[same].float(), ref[same].float(), rtol=5e-2, atol=3e-2 * scale)
    assert torch.equal(out, moe_triton.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA)), "not deterministic"


def test_moe_cuda_graph_replay(experts):
    """Decode runs under CUDA graphs: no host sync in the path, ticket counters re-armed per launch."""
    from minivllm.ops import moe_triton

    for m in (1, 8, 64):
        x, w, b = router(m, seed=100 + m)
        static_x = x.clone()
        moe_triton.moe(static_x, w, b, experts, TOP_K, LIMIT, ALPHA)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe_triton.moe(static_x, w, b, experts, TOP_K, LIMIT, ALPHA)
        for seed in (1, 2, 3):
            x2, _, _ = router(m, seed=200 + seed + m)
            static_x.copy_(x2)
            graph.replay()
            torch.testing.assert_close(static_out, moe_triton.moe(x2, w, b, experts, TOP_K, LIMIT, ALPHA), rtol=0, atol=0)


def test_moe_skewed_routing_and_idle_experts(experts):
    """All tokens on the same 4 experts (counts far above a tile), the other 28 idle."""
    from minivllm.ops import moe_triton

    for m in (64, 1000):
        x, w, b = router(m, seed=7)
        b = b.clone()
        b[[3, 9, 17, 30]] = 50.0
        out = moe_triton.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA)
        weights, ids = reference.route(x, w, b, TOP_K)
        assert set(ids.unique().tolist()) == {3, 9, 17, 30}
        exact = _oracle(x, weights, ids, experts)
        torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=1e-2 * exact.abs().max().item())


# ------------------------------------------------------------------------------------------ csrc

@pytest.fixture(scope="module")
def csrc():
    try:
        from minivllm.ops import csrc_ops
    except ImportError as e:
        pytest.fail(f"the csrc extension did not build: {e}")
    return csrc_ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,hidden", [(1, 2880), (7, 2880), (300, 2880), (5, 100)])
def test_rms_norm_matches_reference(csrc, dtype, rows, hidden):
    g = torch.Generator(device=DEV).manual_seed(rows)
    x = torch.randn(rows, hidden, device=DEV, generator=g).to(dtype)
    residual = torch.randn(rows, hidden, device=DEV, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEV, generator=g)).to(dtype)
    x0, r0 = x.clone(), residual.clone()
    out, new_residual = csrc.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, ref_residual)
    assert torch.equal(x, x0) and torch.equal(residual, r0), "inputs must not be modified"
    # Same roundings; the fp32 sum of squares runs in another order, so allow a rare 1-ulp step
    # (in fp32 that step shows in most elements, in 16-bit types it rarely survives the rounding).
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(out, ref_out, rtol=ulp, atol=1e-6)
    if dtype != torch.float32:
        assert (out != ref_out).float().mean() < 0.01
    torch.testing.assert_close(csrc.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 257])
def test_rotary_matches_reference_bitwise(csrc, dtype, tokens):
    from minivllm.config import GptOssConfig

    cfg = GptOssConfig.from_dict({"model_type": "gpt_oss", "vocab_size": 16, "hidden_size": 2880, "intermediate_size": 2880,
                                  "num_hidden_layers": 2, "num_attention_heads": 64, "num_key_value_heads": 8,
                                  "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "truncate": False,
                                                   "original_max_position_embeddings": 4096}})
    inv_freq, scale = cfg.yarn_inv_freq_and_scale()
    freqs = torch.arange(8192, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos() * scale, freqs.sin() * scale), -1).to(DEV)
    g = torch.Generator(device=DEV).manual_seed(tokens)
    qkv = torch.randn(tokens, (64 + 16) * 64, device=DEV, generator=g).to(dtype)
    q = qkv[:, : 64 * 64].view(tokens, 64, 64)  # strided views, as a fused qkv projection gives
    k = qkv[:, 64 * 64: 72 * 64].view(tokens, 8, 64)
    positions = torch.randint(0, 8192, (tokens,), device=DEV, generator=g)
    q_out, k_out = csrc.rotary(q, k, positions, cache)
    q_ref, k_ref = reference.rotary(q, k, positions, cache)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
