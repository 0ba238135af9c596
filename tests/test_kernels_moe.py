"""Triton MoE kernels (kernels/moe_*.py) against torch, on CPU, plus an SM90 compile check.

Triton's interpreter is chosen when a kernel module is imported (TRITON_INTERPRET is read by
@triton.jit), so setting it inside a shared pytest process would turn every later Triton import,
e.g. the GPU tests', into interpreted code. This file therefore runs itself in child processes:

- in the parent pytest process (TRITON_INTERPRET unset) it starts ONE child pytest on this file
  with TRITON_INTERPRET=1 and reports each kernel case from the child's JUnit XML, and starts a
  second child (TRITON_INTERPRET removed) that compiles every kernel the wrappers launch for
  sm_90a with Triton's own compiler, no GPU needed;
- in the child (TRITON_INTERPRET=1) the `check_*` cases below are the tests.

Running `TRITON_INTERPRET=1 pytest tests/test_kernels_moe.py` runs the cases directly.
Interpreter dots are exact in fp32 (tl.dot_scaled on bf16 x e2m1 included), so the oracle is fp32
torch on the same inputs. Inputs are bf16-representable; the one rounding left, the bf16 activation
GEMM1 stores, is modelled by `_to_bf16`: the interpreter's fp32 -> bf16 cast truncates (triton 3.9
`cast_impl`), the GPU rounds to nearest even.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HERE = os.path.abspath(__file__)
LIMIT, ALPHA = 7.0, 1.702

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton is a test extra on Linux x86_64
    pytest.skip("triton is not installed", allow_module_level=True)


# ----------------------------------------------------------------------------------------------
# Helpers (child process)

def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 -> fp32 as the kernels' `.to(tl.bfloat16)` does where the test runs."""
    if INTERPRETED:
        return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return t.to(torch.bfloat16).float()


def _random_mxfp4(e: int, n: int, k: int, g: torch.Generator, scale_lo: int = 118, scale_hi: int = 124):
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(scale_lo, scale_hi + 1, (e, n, k // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def _experts(e: int, h: int, i: int, seed: int, scale_lo: int = 118, scale_hi: int = 124):
    """A real model.gpt_oss.Experts with random packed weights."""
    from minivllm.config import GptOssConfig
    from minivllm.model.gpt_oss import Experts

    cfg = GptOssConfig(vocab_size=16, hidden_size=h, intermediate_size=i, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_local_experts=e,
                       num_experts_per_tok=2, layer_types=["full_attention"], quant_method="mxfp4")
    experts = Experts(cfg, torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (experts.gate_up_proj_blocks, experts.down_proj_blocks):
            p.copy_(torch.randint(0, 256, p.shape, dtype=torch.uint8, generator=g))
        for p in (experts.gate_up_proj_scales, experts.down_proj_scales):
            p.copy_(torch.randint(scale_lo, scale_hi + 1, p.shape, dtype=torch.uint8, generator=g))
        experts.gate_up_proj_bias.normal_(generator=g)
        experts.down_proj_bias.normal_(generator=g)
    return experts


def _router(m: int, e: int, h: int, seed: int, ragged: bool):
    """x, router weight, router bias. Ragged: expert 1 and 2 win for most tokens, the last two never."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, h, generator=g).to(torch.bfloat16).float()
    w = torch.randn(e, h, generator=g) * 0.2
    b = torch.randn(e, generator=g)
    if ragged:
        b[1], b[2] = 6.0, 5.0
        b[-2:] = -1e4
    return x, w, b


def _oracle(x, topk_ids, topk_weights, w1, b1, w2, b2):
    """fp32 MoE, with the activation rounded to bf16 as GEMM1 stores it. x must be bf16-exact.
    Returns (out (M, H), act per pair (P, I))."""
    m, top_k = topk_ids.shape
    xb = x.float()
    from minivllm.ops.reference import swiglu

    act = torch.empty(m * top_k, w1.shape[1] // 2)
    out = torch.zeros(m, w2.shape[1])
    for t in range(m):
        for j in range(top_k):
            e = int(topk_ids[t, j])
            a = _to_bf16(swiglu(xb[t] @ w1[e].T + b1[e].float(), LIMIT, ALPHA))
            act[t * top_k + j] = a
            out[t] += topk_weights[t, j] * (a @ w2[e].T + b2[e].float())
    return out, act


def _routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, hidden: int = 32):
    """A Routing built by torch (to test the GEMMs on routings chosen by the test)."""
    from minivllm.kernels.moe_routing import Routing

    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    return Routing(topk_ids.int(), topk_weights.float(), offsets, torch.sort(flat, stable=True).indices.int(),
                   torch.zeros(topk_ids.shape[0], hidden, dtype=torch.bfloat16))


def _assert_counters_rearmed():
    from minivllm.kernels import moe_routing

    for buf in moe_routing._COUNTERS.values():
        assert int(buf.abs().sum()) == 0, "a kernel left its ticket counter armed (breaks the next launch)"


# ----------------------------------------------------------------------------------------------
# Cases (run in the interpreter child)

@pytest.mark.parametrize("m,e,top_k,h,ragged,split_h", [
    (1, 8, 4, 64, False, None), (3, 8, 4, 96, True, None), (3, 8, 2, 96, False, 1), (64, 8, 4, 64, True, 3),
    (40, 128, 4, 64, True, 2),  # decode with 128 experts: split router, separate sort
    (300, 8, 4, 64, True, None), (300, 6, 3, 64, False, 2),  # prefill, also with split tickets per block
])
def check_route(m, e, top_k, h, ragged, split_h):
    from minivllm.kernels.moe_routing import permute_k, route
    from minivllm.ops.reference import route as ref_route

    x, w, b = _router(m, e, h, seed=m + e, ragged=ragged)
    r = route(x, w, b, top_k, split_h=split_h)
    assert torch.equal(r.x_perm, permute_k(x).to(torch.bfloat16))
    ref_weights, ref_ids = ref_route(x, w, b, top_k)
    assert torch.equal(r.topk_ids.long(), ref_ids)
    torch.testing.assert_close(r.topk_weights, ref_weights, rtol=1e-5, atol=1e-6)
    flat = ref_ids.flatten()
    counts = torch.bincount(flat, minlength=e)
    assert torch.equal(r.expert_offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(r.sorted_pairs.long(), torch.sort(flat, stable=True).indices)
    if ragged:
        assert counts[-2:].sum() == 0 and counts.max() > 1
    _assert_counters_rearmed()


@pytest.mark.parametrize("p,e,skew", [(1, 4, False), (700, 32, True), (1500, 128, False), (513, 8, True)])
def check_sort_by_expert(p, e, skew):
    from minivllm.kernels.moe_routing import sort_by_expert

    g = torch.Generator().manual_seed(p)
    ids = torch.randint(0, e, (p,), generator=g)
    if skew:
        ids[: p // 2] = 3  # one expert far beyond a chunk, others empty
        ids[ids == 1] = 0
    offsets, sorted_pairs = sort_by_expert(ids.int().view(-1, 1), e)
    counts = torch.bincount(ids, minlength=e)
    assert torch.equal(offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(sorted_pairs.long(), torch.sort(ids, stable=True).indices)


@pytest.mark.parametrize("m,ragged", [(1, False), (3, True), (64, True), (300, True)])
def check_gate_up(m, ragged):
    from minivllm.kernels import moe_gemm
    from minivllm.kernels.moe_routing import permute_k, route
    from minivllm.model.mxfp4 import dequantize_mxfp4

    e, h, i, top_k = 8, 96, 64, 4  # K = 96 exercises a ragged last K block
    x, w, b = _router(m, e, h, seed=10 + m, ragged=ragged)
    g = torch.Generator().manual_seed(m)
    w1b, w1s = _random_mxfp4(e, 2 * i, h, g)
    b1 = torch.randn(e, 2 * i, generator=g)
    r = route(x, w, b, top_k)
    cfg = moe_gemm.GemmConfig(16, 64, 64) if m > 64 else None  # small tiles: several per expert
    act = moe_gemm.gate_up(r, w1b.view(e, 2 * i, h // 2), w1s, b1, LIMIT, ALPHA, config=cfg)
    w1 = dequantize_mxfp4(w1b, w1s)
    _, ref_act = _oracle(x, r.topk_ids, r.topk_weights, w1, b1, torch.zeros(e, 1, i), torch.zeros(e, 1))
    # fp32 sums in another order, then one rounding to bf16: equal up to one bf16 step. The kernel
    # stores the activation in its K order (an involution).
    torch.testing.assert_close(permute_k(act).float(), ref_act[r.sorted_pairs.long()], rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("m,split_k,unfused", [(1, 1, False), (1, 2, False), (3, 4, False), (64, 1, False),
                                               (64, 1, True), (300, 1, True)])
def check_down(m, split_k, unfused):
    from minivllm.kernels import moe_gemm
    from minivllm.kernels.moe_routing import permute_k, route
    from minivllm.model.mxfp4 import dequantize_mxfp4

    e, h, i, top_k = 8, 64, 96, 4  # K = 96: one full 64-block and a ragged tail
    x, w, b = _router(m, e, h, seed=20 + m, ragged=True)
    r = route(x, w, b, top_k)
    g = torch.Generator().manual_seed(m)
    act = torch.randn(m * top_k, i, generator=g).to(torch.bfloat16)
    w2b, w2s = _random_mxfp4(e, h, i, g)
    b2 = torch.randn(e, h, generator=g)
    if unfused:  # the prefill path (tile walk over ragged segments + separate reduction) at small M
        cfg = moe_gemm.GemmConfig(block_m=16, block_n=64, block_k=64)
    else:
        cfg = moe_gemm.pick_config(m, h, i, top_k, e, gate_up=False)
        cfg = moe_gemm.GemmConfig(cfg.block_m, 64, 64, split_k=split_k)
    out = moe_gemm.down(permute_k(act), r, w2b.view(e, h, i // 2), w2s, b2, torch.float32, config=cfg)
    w2 = dequantize_mxfp4(w2b, w2s)
    ref = torch.zeros(m, h)
    for row, pair in enumerate(r.sorted_pairs.tolist()):
        t, j = divmod(pair, top_k)
        ex = int(r.topk_ids[t, j])
        ref[t] += r.topk_weights[t, j] * (act[row].float() @ w2[ex].T + b2[ex])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_counters_rearmed()


@pytest.mark.parametrize("fused", [True, False])
def check_all_fp4_codes_and_extreme_scales(fused):
    """Identity activations read the dequantized weight back through the down GEMM: every byte
    value (all 16 codes in both nibbles) and scales 2^-20 .. 2^20 must come out exactly."""
    from minivllm.kernels import moe_gemm
    from minivllm.kernels.moe_routing import permute_k
    from minivllm.model.mxfp4 import FP4_VALUES, dequantize_mxfp4

    e, n, k = 3, 64, 64  # tokens = k, all routed to expert 1; experts 0 and 2 get none
    byte = torch.arange(256, dtype=torch.uint8)
    blocks = byte[torch.randperm(256, generator=torch.Generator().manual_seed(0))].repeat(e * n * k // 2 // 256)
    blocks = blocks.view(e, n, k // 32, 16)
    scales = (107 + torch.arange(e * n * k // 32) % 41).to(torch.uint8).view(e, n, k // 32)  # 2^-20 .. 2^20
    topk_ids = torch.ones(k, 1, dtype=torch.int32)
    r = _routing(topk_ids, torch.ones(k, 1), e)
    cfg = moe_gemm.GemmConfig(64, 64, 64, num_warps=4) if fused else moe_gemm.GemmConfig(16, 64, 64, num_warps=4)
    out = moe_gemm.down(permute_k(torch.eye(k, dtype=torch.bfloat16)), r, blocks.view(e, n, k // 2), scales,
                        torch.zeros(e, n), torch.float32, config=cfg)
    w = dequantize_mxfp4(blocks, scales)[1]  # (n, k)
    assert torch.equal(out, w.T)
    assert set(w.abs().unique().tolist()) >= {abs(v) * 2.0**s for v in FP4_VALUES[:8] for s in (-20, 20)}
    _assert_counters_rearmed()


@pytest.mark.parametrize("m", [1, 3, 64, 300])
def check_moe_matches_reference(m):
    from minivllm.ops import moe_triton, reference
    from minivllm.model.mxfp4 import dequantize_mxfp4

    e, h, i, top_k = 8, 64, 64, 4
    experts = _experts(e, h, i, seed=m)
    x, w, b = _router(m, e, h, seed=30 + m, ragged=m > 1)
    out = moe_triton.moe(x, w, b, experts, top_k, LIMIT, ALPHA)
    assert out.shape == x.shape and out.dtype == x.dtype
    weights, ids = reference.route(x, w, b, top_k)
    w1 = dequantize_mxfp4(experts.gate_up_proj_blocks, experts.gate_up_proj_scales)
    w2 = dequantize_mxfp4(experts.down_proj_blocks, experts.down_proj_scales)
    exact, _ = _oracle(x, ids, weights, w1, experts.gate_up_proj_bias, w2, experts.down_proj_bias)
    torch.testing.assert_close(out, exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
    ref = reference.moe(x, w, b, experts, top_k, LIMIT, ALPHA)  # fp32 throughout: bf16-level agreement
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=2e-2 * ref.abs().max().item())
    assert torch.equal(out, moe_triton.moe(x, w, b, experts, top_k, LIMIT, ALPHA)), "not deterministic"
    _assert_counters_rearmed()


def check_moe_falls_back_only_on_compile_failures(monkeypatch):
    import triton

    from minivllm.ops import moe_triton, reference

    assert moe_triton._compile_failure(RuntimeError("PassManager::run failed"))
    assert moe_triton._compile_failure(triton.CompilationError("x.py", None, "bad"))
    assert not moe_triton._compile_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    experts = _experts(4, 64, 64, seed=0)
    x, w, b = _router(3, 4, 64, seed=0, ragged=False)

    def fail(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(moe_triton, "_moe", fail)
    monkeypatch.setattr(moe_triton, "_broken", None)
    assert torch.equal(moe_triton.moe(x, w, b, experts, 2, LIMIT, ALPHA), reference.moe(x, w, b, experts, 2, LIMIT, ALPHA))
    assert "PassManager" in moe_triton._broken


def check_moe_empty_batch():
    from minivllm.ops import moe_triton

    experts = _experts(4, 64, 64, seed=0)
    x, w, b = _router(0, 4, 64, seed=0, ragged=False)
    assert moe_triton.moe(x, w, b, experts, 2, LIMIT, ALPHA).shape == (0, 64)


# ----------------------------------------------------------------------------------------------
# SM90 compile check (child process without the interpreter)

def _stack_bytes(cubin: bytes) -> int | None:
    """Per-thread stack (register spills) of a cubin, from cuobjdump (shipped with Triton)."""
    import shutil
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return max((int(v) for v in __import__("re").findall(r"STACK:(\d+)", usage)), default=None)


def compile_all_sm90() -> list[str]:
    """Run the real wrappers at gpt-oss-20b shapes with every kernel launch intercepted, and compile
    each launch for sm_90a with Triton's compiler. Returns one line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minivllm.kernels import moe_gemm, moe_routing

    kernels = [moe_routing._router_kernel, moe_routing._histogram_kernel, moe_routing._scatter_kernel,
               moe_gemm._moe_gemm_kernel, moe_gemm._sum_slots_kernel]
    launches = []
    for k in kernels:
        k.run = (lambda kernel: lambda *args, grid, warmup, **kw: launches.append((kernel, args, kw)))(k)

    e, h, i, top_k = 32, 2880, 2880, 4
    w1 = torch.empty(e, 2 * i, h // 2, dtype=torch.uint8)
    s1 = torch.empty(e, 2 * i, h // 32, dtype=torch.uint8)
    w2 = torch.empty(e, h, i // 2, dtype=torch.uint8)
    s2 = torch.empty(e, h, i // 32, dtype=torch.uint8)
    b1, b2 = torch.empty(e, 2 * i, dtype=torch.bfloat16), torch.empty(e, h, dtype=torch.bfloat16)
    rw, rb = torch.empty(e, h, dtype=torch.bfloat16), torch.empty(e, dtype=torch.bfloat16)
    for m in (1, 8, 64, 4096):
        x = torch.empty(m, h, dtype=torch.bfloat16)
        r = moe_routing.route(x, rw, rb, top_k)
        act = moe_gemm.gate_up(r, w1, s1, b1, LIMIT, ALPHA)
        moe_gemm.down(act, r, w2, s2, b2, torch.bfloat16)
    moe_routing.route(torch.empty(64, h, dtype=torch.bfloat16), torch.empty(128, h, dtype=torch.bfloat16),
                      torch.empty(128, dtype=torch.bfloat16), top_k)  # gpt-oss-120b: 128 experts

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
             torch.int32: "i32", torch.int64: "i64"}
    seen, report = set(), []
    for kernel, args, kw in launches:
        sig, consts, attrs = {}, {}, {}
        values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kw.items() if k in kernel.arg_names}
        for idx, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
            v = values[name]
            if param.is_constexpr:
                sig[name], consts[name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[name], attrs[(idx,)] = "*" + names[v.dtype], [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(idx,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32"
        options = {"num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3)}
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 128), options=options)
        ptx = compiled.asm["ptx"]
        assert compiled.metadata.shared <= 227 * 1024, f"{kernel.fn.__name__}: {compiled.metadata.shared} B of shared memory"
        if kernel is moe_gemm._moe_gemm_kernel:
            assert "wgmma.mma_async" in ptx, "the MoE GEMM must use Hopper wgmma"
            assert "cp.async" in ptx, "the weight stream must be pipelined (cp.async)"
        stack = _stack_bytes(compiled.asm["cubin"])
        assert stack in (0, None), f"{kernel.fn.__name__} {consts}: spills {stack} bytes to local memory"
        tiles = {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GATE_UP") if k in consts}
        report.append(f"{kernel.fn.__name__} {tiles} warps={options['num_warps']} shared={compiled.metadata.shared}")
    return report


# ----------------------------------------------------------------------------------------------
# Wiring: the child runs the cases; the parent runs the child and reports.

CASES = {name: fn for name, fn in dict(globals()).items() if name.startswith("check_")}

if INTERPRETED:
    for _name, _fn in CASES.items():
        globals()["test_" + _name[len("check_"):]] = _fn
else:
    def _child_env(interpret: bool) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        return env

    @pytest.fixture(scope="module")
    def children(tmp_path_factory):
        """Both child processes, started together (they are independent and mostly single-threaded)."""
        xml = tmp_path_factory.mktemp("interp") / "results.xml"
        interp = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE,
                                   f"--junitxml={xml}", "-o", "junit_family=xunit1"],
                                  env=_child_env(True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        compile_ = subprocess.Popen([sys.executable, HERE, "--compile-sm90"], env=_child_env(False),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        yield {"interp": (interp, xml), "compile": compile_}
        for proc in (interp, compile_):
            if proc.poll() is None:
                proc.kill()

    @pytest.fixture(scope="module")
    def interpreter_results(children):
        proc, xml = children["interp"]
        log, _ = proc.communicate(timeout=900)
        results = {}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                failure = case.find("failure")
                if failure is None:
                    failure = case.find("error")
                skipped = case.find("skipped")
                results[case.get("name")] = ("failed", failure.text or failure.get("message")) if failure is not None \
                    else ("skipped", skipped.get("message")) if skipped is not None else ("passed", "")
        return results, log[-8000:]

    def _case_ids():
        ids = []
        for name, fn in CASES.items():
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            if not marks:
                ids.append("test_" + name[len("check_"):])
                continue
            argnames, argvalues = marks[0].args
            for values in argvalues:
                values = values if isinstance(values, tuple) else (values,)
                ids.append(f"test_{name[len('check_'):]}[{'-'.join(str(v) for v in values)}]")
        return ids

    @pytest.mark.parametrize("case", _case_ids())
    def test_interpreted(case, interpreter_results):
        results, log = interpreter_results
        assert case in results, f"the interpreter run did not report {case}:\n{log}"
        outcome, detail = results[case]
        if outcome == "skipped":
            pytest.skip(detail)
        assert outcome == "passed", detail

    def test_compiles_for_sm90(children):
        proc = children["compile"]
        log, _ = proc.communicate(timeout=600)
        if proc.returncode == 3:
            pytest.skip(log.strip().splitlines()[-1])
        assert proc.returncode == 0, log[-8000:]


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"this Triton cannot compile ahead of time: {exc}")
        sys.exit(3)
    for line in compile_all_sm90():
        print(line)
