"""SM90 attention on a GPU (skipped without CUDA): the Triton kernels and FA3 (when importable)
against the torch reference at gpt-oss shapes (64 q heads, 8 kv heads, head_dim 64, bf16,
16-token pages) for contexts 1 ... 32k, and end-to-end greedy tokens with CUDA graphs on and off.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HQ, HKV, D, PAGE = 64, 8, 64, 16
CONTEXTS = [1, 2, 127, 128, 129, 1000, 4096, 32768]


def _backends():
    from minivllm.ops import attention_sm90

    return ["triton"] + (["fa3"] if attention_sm90.flash_attn_with_kvcache is not None else [])


def _scenario(q_lens, kv_lens, seed=0, dtype=torch.bfloat16):
    from minivllm.ops import AttentionContext

    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // PAGE) for n in kv_lens]
    num_blocks = sum(pages) + 7
    ids = torch.randperm(num_blocks, generator=g)
    tables, used = [], 0
    for n in pages:
        tables.append(ids[used:used + n].tolist())
        used += n
    # A prefix-cache hit: the first sequence with a cached first block reads an earlier one's instead.
    full = [j for j, n in enumerate(kv_lens) if n >= PAGE]
    hit = next((i for i in range(1, len(kv_lens)) if kv_lens[i] - q_lens[i] >= PAGE and full[0] < i), None) if full else None
    if hit is not None:
        tables[hit][0] = tables[full[0]][0]
    width = max(pages) + 1
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    k_cache = torch.randn(num_blocks, PAGE, HKV, D, generator=g).to("cuda", dtype)
    v_cache = torch.randn(num_blocks, PAGE, HKV, D, generator=g).to("cuda", dtype)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], HQ, D, generator=g).to("cuda", dtype)
    sinks = (torch.randn(HQ, generator=g) * 2).to("cuda", dtype)
    ctx = AttentionContext(torch.zeros(qsl[-1], dtype=torch.long, device="cuda"), qsl, list(kv_lens), block_tables, PAGE)
    return q, k_cache, v_cache, ctx, sinks


def _run(backend, q, k_cache, v_cache, ctx, sinks, window):
    from minivllm.kernels.attention_decode import paged_decode
    from minivllm.kernels.attention_prefill import paged_prefill
    from minivllm.ops import attention_sm90

    qsl, lens = ctx.device_lens()
    scale = D**-0.5
    if backend == "fa3":
        return attention_sm90._fa3_attention(q, k_cache, v_cache, ctx, qsl, lens, sinks, window, scale)
    if q.shape[0] == lens.shape[0]:
        return paged_decode(q, k_cache, v_cache, ctx.block_tables, lens, sinks, scale, window)
    return paged_prefill(q, k_cache, v_cache, ctx.block_tables, qsl, lens, sinks, scale, window)


def _check(out, q, k_cache, v_cache, ctx, sinks, window):
    from minivllm.ops import reference

    expected = reference.paged_attention(q, k_cache, v_cache, ctx, sinks, window, D**-0.5)
    torch.testing.assert_close(out.float(), expected.float(), atol=1.5e-2, rtol=1.5e-2)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("window", [0, 128])
def test_decode_matches_reference_at_gpt_oss_shapes(backend, window):
    q, k_cache, v_cache, ctx, sinks = _scenario([1] * len(CONTEXTS), CONTEXTS, seed=window)
    _check(_run(backend, q, k_cache, v_cache, ctx, sinks, window), q, k_cache, v_cache, ctx, sinks, window)
    for n in (1000, 32768):  # batch 1: the most splits
        q, k_cache, v_cache, ctx, sinks = _scenario([1], [n], seed=n)
        _check(_run(backend, q, k_cache, v_cache, ctx, sinks, window), q, k_cache, v_cache, ctx, sinks, window)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("window", [0, 128])
def test_prefill_matches_reference_at_gpt_oss_shapes(backend, window):
    # Fresh prompts, chunks continuing cached prefixes (up to 32k), and decode rows mixed in.
    q_lens = [1, 17, 300, 1000, 2048, 1, 128]
    kv_lens = [1, 17, 5000, 1000, 2048, 129, 32768]
    q, k_cache, v_cache, ctx, sinks = _scenario(q_lens, kv_lens, seed=10 + window)
    _check(_run(backend, q, k_cache, v_cache, ctx, sinks, window), q, k_cache, v_cache, ctx, sinks, window)


def test_write_kv_matches_reference():
    from minivllm.ops import attention_sm90, reference

    k = torch.randn(40, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * PAGE, device="cuda")[:40]
    slots[::7] = -1
    k_cache = torch.zeros(64, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    live = slots >= 0
    reference.write_kv(k[live], v[live], expected_k, expected_v, slots[live])
    attention_sm90.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# ---- end to end ----------------------------------------------------------------------------------

def _capturable_moe():
    """A MoE made of tensor ops only (every expert on every token, weighted by the router), used
    when the SM90 build's MoE does not declare itself capturable, so graphs can still be tested."""
    from minivllm.ops import reference

    cache = {}

    def moe(x, router_weight, router_bias, experts, top_k, swiglu_limit, swiglu_alpha):
        if id(experts) not in cache:
            pairs = [experts.expert_weights(e, x.dtype) for e in range(experts.gate_up_proj_bias.shape[0])]
            cache[id(experts)] = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        gate_up, down = cache[id(experts)]
        weights, ids = reference.route(x, router_weight, router_bias, top_k)
        dense = torch.zeros(x.shape[0], gate_up.shape[0], dtype=weights.dtype, device=x.device).scatter(1, ids, weights)
        h = torch.einsum("th,eoh->teo", x, gate_up) + experts.gate_up_proj_bias
        y = torch.einsum("tei,ehi->teh", reference.swiglu(h, swiglu_limit, swiglu_alpha), down) + experts.down_proj_bias
        return torch.einsum("te,teh->th", dense.to(y.dtype), y)

    moe.cuda_graph_safe = True
    return moe


def _attention_ops():
    """The reference, but our attention and KV write, and a capturable MoE: isolates this work."""
    from minivllm.ops import REFERENCE_OPS, attention_sm90

    return dataclasses.replace(REFERENCE_OPS, name="sm90-attention", attention=attention_sm90.paged_attention,
                               write_kv=attention_sm90.write_kv, moe=_capturable_moe())


def _sm90_ops_for_graphs(config):
    """The SM90 build as the engine picks it; ops it cannot capture replaced by capturable twins."""
    from minivllm.engine.cuda_graphs import uncapturable_ops
    from minivllm.ops import REFERENCE_OPS, sm90

    ops = sm90.build_ops(REFERENCE_OPS)
    stand_ins = {"rms_norm": REFERENCE_OPS.rms_norm, "rotary": REFERENCE_OPS.rotary, "moe": _capturable_moe()}
    blocked = uncapturable_ops(ops, config)
    assert "attention" not in blocked and "write_kv" not in blocked
    return dataclasses.replace(ops, **{name: stand_ins[name] for name in blocked})


def _generate(path, monkeypatch, ops, dtype, enforce_eager, prompts, params):
    from minivllm import LLM
    from minivllm.engine import cuda_graphs, model_runner

    replays = []
    original_run = cuda_graphs.DecodeGraphs.run
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run", lambda self, *a: (replays.append(1), original_run(self, *a))[1])
    monkeypatch.setattr(model_runner, "get_ops", lambda backend, device_type: ops)
    llm = LLM(path, device="cuda", dtype=dtype, enforce_eager=enforce_eager, num_kv_blocks=256, block_size=PAGE,
              max_model_len=512, max_num_seqs=8)
    assert (llm.engine.runner.graphs is not None) == (not enforce_eager)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert bool(replays) == (not enforce_eager)
    monkeypatch.undo()
    return outs


def _assert_greedy_equal_up_to_near_ties(got, expected, margin):
    """Tokens equal, except that a divergence is allowed where the expected run's top two
    logprobs were within `margin` (a near tie that rounding may flip); the rest then differs."""
    for g, e in zip(got, expected):
        g_ids, e_out = g.outputs[0].token_ids, e.outputs[0]
        for i, (a, b) in enumerate(zip(g_ids, e_out.token_ids)):
            if a != b:
                top = sorted((lp.logprob for lp in e_out.logprobs[i].values()), reverse=True)
                assert top[0] - top[1] < margin, f"token {i}: {a} != {b}, top-2 logprob gap {top[0] - top[1]:.3f}"
                break


def test_greedy_tokens_sm90_graphs_on_and_off_match_reference(tmp_path, monkeypatch):
    """A tiny checkpoint with gpt-oss attention shapes (8:1 GQA, head_dim 64, a 16-token window)."""
    pytest.importorskip("pydantic", reason="the engine needs the package's dependencies")
    pytest.importorskip("openai_harmony", reason="the engine needs the package's dependencies")
    from conftest import mixed_prompts

    from minivllm import SamplingParams
    from minivllm.config import GptOssConfig
    from minivllm.model.tiny import write_tiny_checkpoint
    from minivllm.ops import REFERENCE_OPS

    path = write_tiny_checkpoint(str(tmp_path / "tiny"), seed=3, num_attention_heads=16, num_key_value_heads=2,
                                 head_dim=64, sliding_window=16)
    base = mixed_prompts(seed=1, lengths=(40,))[0]
    prompts = [base + t for t in mixed_prompts(seed=2, lengths=(3, 30))] + mixed_prompts(seed=3, lengths=(5, 70, 17))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)

    # fp32, our attention (Triton: FA3 is bf16-only) with graphs off and on: exactly the reference's tokens.
    reference = _generate(path, monkeypatch, REFERENCE_OPS, "float32", True, prompts, params)
    for eager in (True, False):
        got = _generate(path, monkeypatch, _attention_ops(), "float32", eager, prompts, params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in reference], f"eager={eager}"

    # bf16, the whole SM90 build (FA3 when importable): graphs and eager agree, and both follow the
    # reference except at near ties.
    ops = _sm90_ops_for_graphs(GptOssConfig.from_folder(path))
    reference = _generate(path, monkeypatch, REFERENCE_OPS, "bfloat16", True, prompts, params)
    eager = _generate(path, monkeypatch, ops, "bfloat16", True, prompts, params)
    graphs = _generate(path, monkeypatch, ops, "bfloat16", False, prompts, params)
    _assert_greedy_equal_up_to_near_ties(graphs, eager, margin=0.02)
    _assert_greedy_equal_up_to_near_ties(eager, reference, margin=0.1)
