"""MXFP4 MoE on the GPU at gpt-oss-20b shapes (hidden 2880, 32 experts, top-4, random packed weights).

    python benchmarks/bench_moe_gpu.py                 # decode GB/s at M=1,8,64 vs copy bandwidth; prefill TFLOP/s
    python benchmarks/bench_moe_gpu.py --sweep 1 64    # also try other decode tile configs at M=1, 64
    python benchmarks/bench_moe_gpu.py --sweep-prefill # and prefill tile configs at M=4096
    python benchmarks/bench_moe_gpu.py --profile       # per-kernel times of one batch-1 MoE
    python benchmarks/bench_moe_gpu.py --reference     # also time the torch reference

Decode is a weight stream: the figure of merit is the bytes of the experts actually routed to
(packed nibbles + scales + biases of every distinct expert, plus the router) per second, against the
device-to-device copy bandwidth (read + write) measured in the same run. Several layers with
distinct weights run back to back inside one CUDA graph, as in a decode step, so the 50 MB L2 cannot
hold a layer's experts between iterations. Prefill reports TFLOP/s of the two expert GEMMs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

E, H, I, TOP_K = 32, 2880, 2880, 4
LIMIT, ALPHA = 7.0, 1.702


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call of fn, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), iters=20)
    del src, dst
    return 2 * nbytes / t


def random_experts(seed: int):
    """gpt-oss-20b-shaped Experts with random packed weights, scales like a checkpoint's (2^-9..2^-4)."""
    from minivllm.config import GptOssConfig
    from minivllm.model.gpt_oss import Experts

    cfg = GptOssConfig(vocab_size=16, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=64, num_local_experts=E, num_experts_per_tok=TOP_K,
                       layer_types=["full_attention"], quant_method="mxfp4")
    experts = Experts(cfg, torch.bfloat16).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in (experts.gate_up_proj_blocks, experts.down_proj_blocks):
            p.copy_(torch.randint(0, 256, p.shape, dtype=torch.uint8, device="cuda", generator=g))
        for p in (experts.gate_up_proj_scales, experts.down_proj_scales):
            p.copy_(torch.randint(118, 124, p.shape, dtype=torch.uint8, device="cuda", generator=g))
        experts.gate_up_proj_bias.normal_(std=0.5, generator=g)
        experts.down_proj_bias.normal_(std=0.5, generator=g)
    return experts


def router(m: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, H, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(E, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    b = (torch.randn(E, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    return x, w, b


def make_layers(n: int):
    return [(random_experts(seed=i),) + router(1, seed=i)[1:] for i in range(n)]


def expert_bytes(experts) -> int:
    """Bytes of ONE expert: packed blocks, scales and biases of both projections."""
    per = 0
    for name in ("gate_up_proj", "down_proj"):
        for suffix in ("blocks", "scales", "bias"):
            t = getattr(experts, f"{name}_{suffix}")
            per += t[0].numel() * t.element_size()
    return per


def check(layers) -> None:
    """The kernels against an fp32 oracle on the same routing (bf16 activation, as GEMM1 stores it)."""
    from minivllm.kernels.moe_routing import route
    from minivllm.model.mxfp4 import dequantize_mxfp4
    from minivllm.ops import moe_triton, reference

    experts, w, b = layers[0]
    for m in (1, 8, 64, 300):
        x = router(m, seed=4321 + m)[0]
        out = moe_triton.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA).float()
        r = route(x, w, b, TOP_K)
        exact = torch.zeros_like(out)
        ids = r.topk_ids.long()
        for e in ids.unique().tolist():
            tokens, slots = (ids == e).nonzero(as_tuple=True)
            w1 = dequantize_mxfp4(experts.gate_up_proj_blocks[e], experts.gate_up_proj_scales[e])
            w2 = dequantize_mxfp4(experts.down_proj_blocks[e], experts.down_proj_scales[e])
            h = x[tokens].float() @ w1.T + experts.gate_up_proj_bias[e].float()
            a = reference.swiglu(h, LIMIT, ALPHA).to(torch.bfloat16).float()
            y = a @ w2.T + experts.down_proj_bias[e].float()
            exact.index_add_(0, tokens, y * r.topk_weights[tokens, slots, None])
        err = ((out - exact).abs().max() / exact.abs().max()).item()
        if moe_triton._broken or err > 2e-2:
            sys.exit(f"M={m}: the Triton MoE is wrong (max error {err:.3g} of max |out|; {moe_triton._broken})")
        print(f"check M={m}: max error {err:.2e} of max |out|")


def run_layers(moe, layers, x):
    for experts, w, b in layers:
        moe(x, w, b, experts, TOP_K, LIMIT, ALPHA)


def bench_decode(moe, layers, m: int, iters: int) -> tuple[float, float, float]:
    """(seconds per layer under a CUDA graph, eager seconds per layer, bytes per layer)."""
    from minivllm.ops import reference

    x = router(m, seed=1234 + m)[0]
    run_layers(moe, layers, x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_layers(moe, layers, x)
    t_graph = cuda_time(graph.replay, iters) / len(layers)
    t_eager = cuda_time(lambda: run_layers(moe, layers, x), max(3, iters // 4)) / len(layers)
    nbytes = 0
    for experts, w, b in layers:
        _, ids = reference.route(x, w, b, TOP_K)
        nbytes += ids.unique().numel() * expert_bytes(experts) + w.numel() * w.element_size()
    return t_graph, t_eager, nbytes / len(layers)


def _candidates(which: str, m: int):
    from minivllm.kernels.moe_gemm import GemmConfig

    if m > 64:  # prefill
        for bm, bn, bk, warps, stages in ((128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 8, 4),
                                          (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (64, 256, 64, 8, 4)):
            yield GemmConfig(bm, bn, bk, 1, warps, stages)
        return
    block_m = max(16, 1 << (m - 1).bit_length())
    splits = (1, 2, 4) if which == "down" and m <= 4 else (1,)
    for (block_n, warps), block_k, stages, split_k in itertools.product(((64, 4), (128, 8)), (128, 256), (3, 4), splits):
        yield GemmConfig(block_m, block_n, block_k, split_k, warps, stages)


def sweep(layers, m: int, sms: int) -> None:
    """Time each candidate tile config of both GEMMs over all layers; print the best three."""
    import triton

    from minivllm.kernels import moe_gemm, moe_routing
    from minivllm.ops import moe_triton

    xs = [router(m, seed=5 + i)[0] for i in range(len(layers))]
    routes = [moe_routing.route(x, w, b, TOP_K) for x, (_, w, b) in zip(xs, layers)]
    packed = [moe_triton.packed_weights(ex) for ex, _, _ in layers]
    act = torch.randn(m * TOP_K, I, device="cuda").to(torch.bfloat16)
    for which in ("gate_up", "down"):
        n, k = (2 * I, H) if which == "gate_up" else (H, I)
        default = moe_gemm.pick_config(m, n, k, TOP_K, E, which == "gate_up", sms)
        timed = []
        for cfg in sorted({default, *_candidates(which, m)}, key=str):
            def run(cfg=cfg):
                for r, (ex, _, _), (w1, s1, w2, s2) in zip(routes, layers, packed):
                    if which == "gate_up":
                        moe_gemm.gate_up(r, w1, s1, ex.gate_up_proj_bias, LIMIT, ALPHA, cfg)
                    else:
                        moe_gemm.down(act, r, w2, s2, ex.down_proj_bias, torch.bfloat16, cfg)
            try:
                timed.append((cuda_time(run, 10) / len(layers), cfg))
            except (triton.CompilationError, triton.OutOfResources, RuntimeError) as e:
                print(f"  M={m} {which} {cfg}: {type(e).__name__}")
        timed.sort(key=lambda tc: tc[0])
        t_default = next(t for t, cfg in timed if cfg == default)
        print(f"sweep M={m} {which}: default {t_default * 1e6:.1f} us/layer {default}")
        for t, cfg in timed[:3]:
            print(f"    {t * 1e6:7.1f} us  {cfg}")


def profile(layers) -> None:
    """Per-kernel GPU time of a batch-1 MoE (router+sort, gate_up, down+sum), averaged over layers."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from minivllm.ops import moe_triton

    x = router(1, seed=77)[0]
    run_layers(moe_triton.moe, layers, x)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run_layers(moe_triton.moe, layers, x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="distinct weight sets per graph (defeats the L2)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", type=int, nargs="*", metavar="M", help="search decode tile configs at these M")
    ap.add_argument("--sweep-prefill", action="store_true", help="search prefill tile configs (M=4096)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times at batch 1")
    ap.add_argument("--reference", action="store_true", help="also time the torch reference")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe_gpu.py needs a CUDA GPU (none visible); the CPU tests are tests/test_kernels_moe.py")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: it would run the kernels in the CPU interpreter")

    import triton

    from minivllm.ops import moe_triton, reference

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")

    layers = make_layers(args.layers)
    check(layers)
    print(f"gpt-oss-20b MoE: hidden {H}, {E} experts, top-{TOP_K}; {expert_bytes(layers[0][0]) / 1e6:.2f} MB per expert; "
          f"{args.layers} layers per graph")
    print(f"{'M':>5} {'us/layer':>9} {'eager us':>9} {'MB read':>8} {'GB/s':>7} {'% copy':>7}")
    for m in (1, 8, 64):
        t, t_eager, nbytes = bench_decode(moe_triton.moe, layers, m, args.iters)
        if moe_triton._broken:
            sys.exit(f"the Triton kernels did not compile, numbers would be the reference's: {moe_triton._broken}")
        print(f"{m:>5} {t * 1e6:>9.1f} {t_eager * 1e6:>9.1f} {nbytes / 1e6:>8.1f} {nbytes / t / 1e9:>7.0f} "
              f"{100 * nbytes / t / copy_bw:>6.1f}%")
        if args.reference:
            t_ref, _, _ = bench_decode(reference.moe, layers[:2], m, 5)
            print(f"      reference: {t_ref * 1e6:.0f} us/layer ({t_ref / t:.1f}x slower)")

    m = 4096
    experts, w, b = layers[0]
    x = router(m, seed=99)[0]
    t = cuda_time(lambda: moe_triton.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA), args.iters)
    flops = 2 * m * TOP_K * (H * 2 * I + I * H)
    print(f"prefill M={m}: {t * 1e3:.2f} ms, {flops / t / 1e12:.0f} TFLOP/s (expert GEMMs)")
    if args.reference:
        t_ref = cuda_time(lambda: reference.moe(x, w, b, experts, TOP_K, LIMIT, ALPHA), 3)
        print(f"      reference: {t_ref * 1e3:.2f} ms ({t_ref / t:.1f}x slower)")

    if args.profile:
        profile(layers)
    for m in args.sweep or ():
        sweep(layers, m, props.multi_processor_count)
    if args.sweep_prefill:
        sweep(layers[:2], 4096, props.multi_processor_count)


if __name__ == "__main__":
    main()
