"""Triton paged-attention kernels against the torch reference (fp32, tiny shapes).

Without CUDA they run in Triton's interpreter, which is chosen when a kernel is decorated (at
import) from TRITON_INTERPRET and would then apply to every kernel imported later in the same
process — including GPU test modules. So this file re-runs itself in a child pytest with
TRITON_INTERPRET=1 (`test_kernels_in_triton_interpreter`) and leaves this process untouched.
With CUDA (or inside that child) the same tests run directly.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from minivllm.engine.cuda_graphs import DecodeGraphs  # no kernels behind it: safe before the interpreter choice

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
RUN_HERE = INTERPRETED or HAS_CUDA
DEVICE = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"

triton = pytest.importorskip("triton")



def kernel_test(fn):
    """Outermost decorator of the kernel tests: they exist only where kernels run (in the
    interpreter child, or with CUDA); elsewhere the child runner stands for them."""
    return fn if RUN_HERE else None


@pytest.mark.skipif(RUN_HERE, reason="the kernel tests run directly here")
def test_kernels_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning", __file__],
        env=env, capture_output=True, text=True, timeout=900, check=False, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    print("interpreter child:", *summary)
    assert proc.returncode == 0, proc.stdout[-10000:] + proc.stderr[-3000:]


# ---- scenarios -----------------------------------------------------------------------------------

def _paged_scenario(q_lens, kv_lens, num_heads, num_kv_heads, head_dim=16, block_size=4, shared_blocks=0, seed=0):
    """Random q and paged K/V for sequences with q_lens[i] queries ending a kv_lens[i]-token context.

    Block ids are shuffled (pages out of order); with shared_blocks=k, sequence 1 starts with
    sequence 0's first k blocks, as a prefix-cache hit does.
    """
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in kv_lens]
    if shared_blocks:  # whole blocks of sequence 0 that are cached context (not queries) of sequence 1
        assert shared_blocks * block_size <= min(kv_lens[0], kv_lens[1] - q_lens[1])
    num_blocks = sum(pages) + 3
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for i, n in enumerate(pages):
        own = n - shared_blocks if (i == 1 and shared_blocks) else n
        table = ids[used:used + own]
        used += own
        if i == 1 and shared_blocks:
            table = tables[0][:shared_blocks] + table
        tables.append(table)
    width = max(pages) + 2  # padded like the runner's tables, plus slack
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    query_start_loc = [0]
    for n in q_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    q = torch.randn(query_start_loc[-1], num_heads, head_dim, generator=g)
    sinks = torch.randn(num_heads, generator=g) * 2
    from minivllm.ops import AttentionContext

    ctx = AttentionContext(torch.zeros(len(q), dtype=torch.long), query_start_loc, list(kv_lens),
                           block_tables, block_size)
    to = lambda t: t.to(DEVICE)
    ctx_dev = dataclasses.replace(ctx, block_tables=to(block_tables), slot_mapping=to(ctx.slot_mapping))
    return to(q), to(k_cache), to(v_cache), ctx_dev, to(sinks)


def _reference(q, k_cache, v_cache, ctx, sinks, window, scale):
    from minivllm.ops import reference

    cpu_ctx = dataclasses.replace(ctx, block_tables=ctx.block_tables.cpu(), slot_mapping=ctx.slot_mapping.cpu())
    return reference.paged_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), cpu_ctx, sinks.cpu(), window, scale)


TOL = dict(atol=2e-5, rtol=2e-5)


# ---- decode ------------------------------------------------------------------------------------

@kernel_test
@pytest.mark.parametrize("window", [0, 5, 37])
def test_decode_matches_reference_with_splits(window):
    """Ragged contexts (1 token, block edges, many tiles), a shared prefix, windows cutting blocks,
    one pass (splits=1) and split-K (some splits of the short sequences are empty)."""
    from minivllm.kernels.attention_decode import paged_decode

    kv_lens = [23, 61, 1, 4, 40]
    q, k_cache, v_cache, ctx, sinks = _paged_scenario([1] * 5, kv_lens, 8, 2, shared_blocks=3, seed=window)
    expected = _reference(q, k_cache, v_cache, ctx, sinks, window, 0.3)
    _, lens = ctx.device_lens()
    for splits in (1, 4):
        out = paged_decode(q, k_cache, v_cache, ctx.block_tables, lens, sinks, 0.3, window,
                           num_splits=splits, block_n=16, min_chunk=16)
        torch.testing.assert_close(out.cpu(), expected, **TOL, msg=f"splits={splits}")


@kernel_test
def test_decode_of_an_empty_context_is_zero():
    """CUDA-graph padding rows have context length 0: the output is 0 (all mass on the sink)."""
    from minivllm.kernels.attention_decode import paged_decode

    q, k_cache, v_cache, ctx, sinks = _paged_scenario([1, 1], [9, 3], 4, 2, seed=3)
    lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = paged_decode(q, k_cache, v_cache, ctx.block_tables, lens, sinks, 0.3, 0, num_splits=splits,
                           block_n=16, min_chunk=16)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0


# ---- prefill ------------------------------------------------------------------------------------

@kernel_test
@pytest.mark.parametrize("window", [0, 5, 37])
def test_prefill_matches_reference(window):
    """A fresh prompt, chunks continuing a cached prefix (one on blocks shared with another
    sequence), decode rows mixed in, a 3:1 head group (packed rows that do not fill the tile)."""
    from minivllm.kernels.attention_prefill import paged_prefill

    q_lens, kv_lens = [13, 9, 1, 20, 1], [13, 30, 40, 61, 7]
    q, k_cache, v_cache, ctx, sinks = _paged_scenario(q_lens, kv_lens, 6, 2, shared_blocks=2, seed=10 + window)
    expected = _reference(q, k_cache, v_cache, ctx, sinks, window, 0.25)
    qsl, lens = ctx.device_lens()
    for block_m, block_n in ((16, 16), (32, 16)):
        out = paged_prefill(q, k_cache, v_cache, ctx.block_tables, qsl, lens, sinks, 0.25, window,
                            block_m=block_m, block_n=block_n)
        torch.testing.assert_close(out.cpu(), expected, **TOL, msg=f"block_m={block_m}")


# ---- the SM90 adapter ---------------------------------------------------------------------------

@kernel_test
def test_write_kv_scatters_and_skips_padding():
    from minivllm.ops import attention_sm90, reference

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([7, 0, -1, 13, -1])
    expected_k, expected_v = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    live = slots >= 0
    reference.write_kv(k[live], v[live], expected_k, expected_v, slots[live])
    k_cache = torch.zeros(4, 4, 2, 16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    attention_sm90.write_kv(k.to(DEVICE), v.to(DEVICE), k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.cpu(), expected_k) and torch.equal(v_cache.cpu(), expected_v)


@kernel_test
def test_adapter_dispatches_decode_and_prefill():
    from minivllm.ops import attention_sm90

    for q_lens, kv_lens in (([1, 1, 1], [5, 33, 17]), ([4, 1, 6], [4, 33, 20])):
        q, k_cache, v_cache, ctx, sinks = _paged_scenario(q_lens, kv_lens, 4, 2, seed=len(q_lens))
        for window in (0, 6):
            out = attention_sm90.paged_attention(q, k_cache, v_cache, ctx, sinks, window, 0.3)
            torch.testing.assert_close(out.cpu(), _reference(q, k_cache, v_cache, ctx, sinks, window, 0.3), **TOL)


@kernel_test
def test_engine_greedy_tokens_equal_with_kernels(tiny_mxfp4, monkeypatch):
    """The whole engine path: prefix-cache hits, chunked prefill (a 24-token step budget), mixed
    prefill + decode steps and pure decode steps, kernels vs reference, same greedy tokens; then
    again with decode steps going through the CUDA-graph buffers (replay emulated, see below)."""
    pytest.importorskip("pydantic", reason="the engine needs the package's dependencies")
    pytest.importorskip("openai_harmony", reason="the engine needs the package's dependencies")
    from conftest import mixed_prompts

    from minivllm import LLM, SamplingParams
    from minivllm.engine import model_runner
    from minivllm.ops import REFERENCE_OPS, attention_sm90

    base = mixed_prompts(seed=7, lengths=(21,))[0]
    prompts = [base + t for t in mixed_prompts(seed=8, lengths=(3, 12))] + mixed_prompts(seed=9, lengths=(5,))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine_args = dict(num_kv_blocks=64, block_size=4, max_model_len=64, max_num_batched_tokens=24,
                       device=DEVICE, dtype="float32", enforce_eager=True)
    kernel_ops = dataclasses.replace(REFERENCE_OPS, name="triton", attention=attention_sm90.paged_attention,
                                     write_kv=attention_sm90.write_kv)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    expected = LLM(tiny_mxfp4, ops_backend="reference", **engine_args).generate(inputs, params, use_tqdm=False)
    expected = [o.outputs[0].token_ids for o in expected]
    monkeypatch.setattr(model_runner, "get_ops", lambda backend, device_type: kernel_ops)
    llm = LLM(tiny_mxfp4, **engine_args)
    assert llm.engine.runner.ops is kernel_ops
    got = llm.generate(inputs, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert got[1].num_cached_tokens > 0  # the second prompt really reused the first one's blocks

    llm = LLM(tiny_mxfp4, **engine_args)
    runner = llm.engine.runner
    runner.graphs = _ReplayByRerun(runner.model, runner.kv_cache, runner.block_size, 4, 64)
    got = llm.generate(inputs, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert runner.graphs.replays[4] > 0  # batches of 3 ran in the 4-bucket, one padding row


class _ReplayByRerun(DecodeGraphs):
    """DecodeGraphs whose 'replay' re-runs the forward on the fixed buffers. The Python lists of the
    captured context stay the capture-time placeholders, so an op that read them instead of the
    buffers would go wrong here as it would in a real graph."""

    def _capture(self):
        self.replays = dict.fromkeys(self.buckets, 0)
        for bs in self.buckets:
            self.graphs[bs] = type("Replay", (), {"replay": staticmethod(lambda bs=bs: self._rerun(bs))})

    def _rerun(self, bs):
        self.replays[bs] += 1
        self._forward(bs)


# ---- the sink correction (FA3 path) ---------------------------------------------------------------

@kernel_test
def test_sink_correction_equals_softmax_with_a_sink_column():
    """out * sigmoid(lse - sink) == softmax over [scores, sink] with the sink column dropped."""
    from minivllm.kernels.attention_elementwise import apply_sinks, apply_sinks_torch

    g = torch.Generator().manual_seed(0)
    heads, tokens, keys, dim = 4, 5, 9, 16
    scores = torch.randn(heads, tokens, keys, generator=g) * 3
    scores[:, :, 6:] = float("-inf")  # masked keys
    scores[:, 2, :] = float("-inf")  # a row that sees no key at all
    values = torch.randn(heads, keys, dim, generator=g)
    sinks = torch.randn(heads, generator=g) * 2

    with_sink = torch.cat([scores, sinks[:, None, None].expand(heads, tokens, 1)], dim=-1)
    expected = (torch.softmax(with_sink, -1)[..., :-1] @ values).transpose(0, 1)  # (T, H, D)

    lse = torch.logsumexp(scores, -1)  # (H, T), -inf on the empty row
    plain = (torch.softmax(scores, -1).nan_to_num(0.0) @ values).transpose(0, 1).contiguous()  # FA3: 0 there
    torch.testing.assert_close(apply_sinks_torch(plain, lse, sinks), expected)
    got = apply_sinks(plain.clone().to(DEVICE), lse.to(DEVICE), sinks.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected)


# ---- CUDA-graph bookkeeping (no GPU needed) ------------------------------------------------------

def test_graph_buckets_and_capturability():
    from types import SimpleNamespace

    from minivllm.engine.cuda_graphs import batch_buckets, uncapturable_ops
    from minivllm.ops import REFERENCE_OPS

    assert batch_buckets(1) == [1]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(256)[-1] == 256 and batch_buckets(4096)[-1] == 512
    config = SimpleNamespace(head_dim=64)
    assert uncapturable_ops(REFERENCE_OPS, config) == ["write_kv", "attention", "moe"]

    def safe_moe(*args):
        pass

    safe_moe.cuda_graph_safe = True
    attention = lambda *a: None
    attention.cuda_graph_safe = lambda config: config.head_dim == 64
    write_kv = lambda *a: None
    write_kv.cuda_graph_safe = True
    ops = dataclasses.replace(REFERENCE_OPS, moe=safe_moe, attention=attention, write_kv=write_kv)
    assert uncapturable_ops(ops, config) == []
    assert uncapturable_ops(ops, SimpleNamespace(head_dim=8)) == ["attention"]


def test_decode_split_policy_depends_on_the_batch_bucket_only():
    from minivllm.kernels.attention_decode import MAX_SPLITS, default_num_splits

    cpu = torch.device("cpu")  # counts as 8 SMs: 32 programs wanted
    assert default_num_splits(1, 2, 0, cpu, 256) == 16
    assert default_num_splits(3, 2, 0, cpu, 256) == default_num_splits(4, 2, 0, cpu, 256) == 4
    assert default_num_splits(64, 8, 0, cpu, 256) == 1
    assert default_num_splits(1, 2, 128, cpu, 256) == 1  # a sliding layer reads <= 128 keys
    assert default_num_splits(1, 1, 0, cpu, 1) <= MAX_SPLITS


# ---- sm90 code generation (no GPU needed) --------------------------------------------------------

def _compile_launches(kernels, launch, *args, **kwargs):
    """Run a launcher with its kernels' launches intercepted; compile each launch for sm90 with the
    argument specialization (types, 16-divisibility, ==1 constants) a real launch would get."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    launches = []
    for kernel in kernels:
        kernel.run = lambda *a, grid, warmup, _k=kernel, **kw: launches.append((_k, a, kw))
    try:
        launch(*args, **kwargs)
    finally:
        for kernel in kernels:
            del kernel.run
    compiled = []
    for kernel, a, kw in launches:
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        values = dict(zip(kernel.arg_names, a), **kw)
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
                continue
            ty, key = native_specialize_impl(CUDABackend, value, False, True, True)
            signature[param.name] = ty
            if ty == "constexpr":
                constexprs[param.name] = key
            elif isinstance(key, str):
                attrs[(i,)] = CUDABackend.parse_attr(key)
        src = ASTSource(kernel, signature, constexprs, attrs)
        compiled.append(triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options))
    return compiled


@pytest.mark.skipif(INTERPRETED, reason="compiles real kernels (the parent process does)")
def test_kernels_compile_for_sm90():
    libtriton = pytest.importorskip("triton._C.libtriton")
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.nvidia.compiler import CUDABackend

    if not (hasattr(libtriton, "native_specialize_impl") and hasattr(CUDABackend, "parse_attr")):
        pytest.skip("this triton lacks the internals used to mimic a launch's argument specialization")
    from minivllm.kernels import attention_decode, attention_elementwise, attention_prefill

    if not hasattr(attention_decode._decode_kernel, "arg_names"):
        pytest.skip("kernels are interpreted in this process")
    # gpt-oss shapes: 64 q heads, 8 kv heads, head_dim 64, bf16 cache of 16-token blocks
    q = torch.zeros(4, 64, 64, dtype=torch.bfloat16)
    kv = torch.zeros(2, 2, 32, 16, 8, 64, dtype=torch.bfloat16)
    tables = torch.zeros(4, 24, dtype=torch.int32)
    lens = torch.ones(4, dtype=torch.int32)
    qsl = torch.arange(5, dtype=torch.int32)
    sinks = torch.zeros(64, dtype=torch.bfloat16)
    decoders = [attention_decode._decode_kernel, attention_decode._decode_reduce_kernel]
    decode = _compile_launches(decoders, attention_decode.paged_decode,
                               q, kv[1, 0], kv[1, 1], tables, lens, sinks, 0.125, 0, num_splits=8)
    assert [k.name for k in decode] == ["_decode_kernel", "_decode_reduce_kernel"]
    decode = decode[:1] + _compile_launches(decoders, attention_decode.paged_decode,
                                            q, kv[1, 0], kv[1, 1], tables, lens, sinks, 0.125, 128)
    prefill = []
    for window in (0, 128):
        prefill += _compile_launches([attention_prefill._prefill_kernel], attention_prefill.paged_prefill,
                                     q, kv[1, 0], kv[1, 1], tables, qsl, lens, sinks, 0.125, window)
    _compile_launches([attention_elementwise._write_kv_kernel], attention_elementwise.write_kv,
                      q[:, :8], q[:, 8:16], kv[1, 0], kv[1, 1], torch.zeros(4, dtype=torch.long))
    _compile_launches([attention_elementwise._sink_correction_kernel], attention_elementwise.apply_sinks,
                      q, torch.zeros(64, 4), sinks)
    # The K/V gathers must be 16-byte asynchronous copies (pipelined), not scalar loads.
    for k in decode + prefill:
        assert "cp.async" in k.asm["ptx"], k.name
    assert all("wgmma" in k.asm["ptx"] for k in prefill)  # Hopper tensor cores for prefill


@pytest.mark.skipif(INTERPRETED, reason="the parent process runs it (it sets up its own interpreter)")
def test_attention_benchmark_smoke_run():
    """benchmarks/bench_attention_gpu.py --tiny: the GPU benchmark's code path at toy sizes, on CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "benchmarks/bench_attention_gpu.py", "--tiny"], cwd=root,
                          env=dict(os.environ, TRITON_DEFAULT_FP_FUSION="1"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Triton decode best" in proc.stdout and "TFLOP/s" in proc.stdout
