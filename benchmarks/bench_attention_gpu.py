"""Paged attention microbenchmark at gpt-oss shapes (64 q heads, 8 kv heads, head_dim 64, bf16,
16-token pages): FA3 (when importable) vs our Triton kernels vs torch SDPA, in one run.

    python benchmarks/bench_attention_gpu.py            # on a CUDA GPU (~1-2 min)
    python benchmarks/bench_attention_gpu.py --tune     # also sweep the Triton kernel configs
    python benchmarks/bench_attention_gpu.py --tiny     # toy sizes on CPU (Triton interpreter): CI smoke run

Decode is memory-bound: reported as GB/s of K/V actually read (window layers read <= 128 keys)
against the measured device copy bandwidth (read + write bytes of a 1 GiB copy); goal >= 70 %.
Decode is timed inside a CUDA graph (as the engine runs it), cycling through enough separate
copies of the cache that the working set exceeds L2. Prefill is reported in TFLOP/s of the
causal (or windowed) attention actually computed, 4 * heads * head_dim flops per (query, key).
The FA3 and Triton timings include the sink handling; SDPA has no sinks and reads contiguous,
unpaged K/V (full attention only): a reference point, not a drop-in.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import time

import torch

HQ, HKV, D, PAGE = 64, 8, 64, 16


def _timer(device: torch.device):
    """ms per call of a list of closures run back to back (each on its own data)."""

    def cpu(fns, reps=1):  # the interpreter: no warm-up worth having
        start = time.perf_counter()
        for _ in range(reps):
            for f in fns:
                f()
        return (time.perf_counter() - start) * 1e3 / (reps * len(fns))

    def cuda_graph(fns, reps=5):
        for f in fns:  # compile, settle allocations
            f()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(fns))
        return statistics.median(times)

    return cpu if device.type == "cpu" else cuda_graph


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = _timer(device)([lambda: dst.copy_(src)] * 4)
    return 2 * nbytes / (ms * 1e-3) / 1e9


class PagedCase:
    """`copies` independent batches of `batch` sequences of `ctx` tokens (last one the query), each
    with its own randomly placed pages in one shared pool."""

    def __init__(self, batch, ctx, q_len, copies, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        pages_per_seq = -(-ctx // PAGE)
        num_pages = copies * batch * pages_per_seq + 1
        self.k_cache = torch.randn(num_pages, PAGE, HKV, D, dtype=dtype, device=device)
        self.v_cache = torch.randn_like(self.k_cache)
        perm = torch.randperm(num_pages, generator=g)[: copies * batch * pages_per_seq]
        self.block_tables = perm.view(copies, batch, pages_per_seq).to(torch.int32).to(device)
        self.q = torch.randn(copies, batch * q_len, HQ, D, dtype=dtype, device=device) * 0.5
        self.sinks = (torch.randn(HQ) * 2).to(dtype).to(device)
        self.context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
        self.batch, self.ctx, self.q_len, self.copies = batch, ctx, q_len, copies

    def context(self, i):
        from minivllm.ops import AttentionContext

        return AttentionContext(
            slot_mapping=torch.zeros(0, dtype=torch.long), query_start_loc=[0], context_lens=[self.ctx],
            block_tables=self.block_tables[i], block_size=PAGE, query_start_loc_t=self.query_start_loc,
            context_lens_t=self.context_lens, max_query_len=self.q_len)


def decode_impls(case: PagedCase, window: int, scale: float, triton_config: dict):
    """name -> list of closures (one per copy); each computes the batch's decode attention."""
    from minivllm.kernels.attention_decode import paged_decode

    from minivllm.ops import attention_sm90

    impls = {}
    if attention_sm90.flash_attn_with_kvcache is not None and case.q.dtype == torch.bfloat16:
        impls["fa3"] = [
            (lambda i=i: attention_sm90._fa3_attention(case.q[i], case.k_cache, case.v_cache, case.context(i),
                                                       case.query_start_loc, case.context_lens, case.sinks,
                                                       window, scale))
            for i in range(case.copies)]
    impls["triton"] = [
        (lambda i=i: paged_decode(case.q[i], case.k_cache, case.v_cache, case.block_tables[i], case.context_lens,
                                  case.sinks, scale, window, **triton_config))
        for i in range(case.copies)]
    if not window and case.q.is_cuda:
        # Contiguous K/V per copy, (B, Hkv, L, D): SDPA's own layout, no paging, no sinks.
        k = [case.k_cache[case.block_tables[i].long()].flatten(1, 2)[:, : case.ctx].transpose(1, 2).contiguous()
             for i in range(case.copies)]
        v = [case.v_cache[case.block_tables[i].long()].flatten(1, 2)[:, : case.ctx].transpose(1, 2).contiguous()
             for i in range(case.copies)]
        q = case.q.view(case.copies, case.batch, HQ, 1, D)
        impls["sdpa"] = [
            (lambda i=i: torch.nn.functional.scaled_dot_product_attention(q[i], k[i], v[i], scale=scale,
                                                                          enable_gqa=True))
            for i in range(case.copies)]
    return impls


def prefill_impls(case: PagedCase, window: int, scale: float, triton_config: dict):
    from minivllm.kernels.attention_prefill import paged_prefill

    from minivllm.ops import attention_sm90

    impls = {}
    if attention_sm90.flash_attn_with_kvcache is not None and case.q.dtype == torch.bfloat16:
        impls["fa3"] = [lambda: attention_sm90._fa3_attention(
            case.q[0], case.k_cache, case.v_cache, case.context(0), case.query_start_loc, case.context_lens,
            case.sinks, window, scale)]
    impls["triton"] = [lambda: paged_prefill(case.q[0], case.k_cache, case.v_cache, case.block_tables[0],
                                             case.query_start_loc, case.context_lens, case.sinks, scale, window,
                                             **triton_config)]
    if not window and case.q.is_cuda and case.q_len == case.ctx:
        k = case.k_cache[case.block_tables[0].long()].flatten(1, 2)[:, : case.ctx].transpose(1, 2).contiguous()
        v = case.v_cache[case.block_tables[0].long()].flatten(1, 2)[:, : case.ctx].transpose(1, 2).contiguous()
        q = case.q[0].view(case.batch, case.q_len, HQ, D).transpose(1, 2)
        impls["sdpa"] = [lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                                  enable_gqa=True)]
    return impls


def visible_pairs(q_len: int, ctx: int, window: int) -> int:
    """(query, key) pairs a causal (windowed) attention computes for one sequence."""
    first = ctx - q_len
    return sum(min(p + 1, window) if window else p + 1 for p in range(first, ctx))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().reshape(-1) - b.float().reshape(-1)).abs().max().item()


def run_decode(cases, device, dtype, copy_gbs, timer, results, triton_config=None):
    print(f"\nDecode (one query per sequence; GB/s of K/V read; copy bandwidth {copy_gbs:.0f} GB/s)")
    print(f"{'batch':>6} {'ctx':>7} {'window':>6} {'impl':>7} {'us':>9} {'GB/s':>8} {'% copy':>7} {'max|diff|':>10}")
    for batch, ctx, window in cases:
        keys = min(ctx, window) if window else ctx
        kv_bytes = batch * keys * HKV * D * 2 * torch.finfo(dtype).bits // 8
        copies = 1 if device.type == "cpu" else max(1, min(64, math.ceil(2 * 1024**3 / kv_bytes)))
        case = PagedCase(batch, ctx, 1, copies, dtype, device)
        impls = decode_impls(case, window, D**-0.5, triton_config or {})
        first = None
        for name, fns in impls.items():
            out = fns[0]()
            diff = "" if first is None else f"{max_diff(out, first):.1e}"
            first = out if first is None else first
            ms = timer(fns)
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            print(f"{batch:>6} {ctx:>7} {window:>6} {name:>7} {ms * 1e3:>9.1f} {gbs:>8.0f} {100 * gbs / copy_gbs:>6.0f}% {diff:>10}")
            results.append(dict(kind="decode", batch=batch, ctx=ctx, window=window, impl=name, us=ms * 1e3,
                                gb_s=gbs, pct_copy=100 * gbs / copy_gbs))
        del case, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_prefill(cases, device, dtype, timer, results, triton_config=None):
    print("\nPrefill (TFLOP/s of the causal / windowed attention computed)")
    print(f"{'batch':>6} {'q_len':>7} {'ctx':>7} {'window':>6} {'impl':>7} {'ms':>9} {'TFLOP/s':>8} {'max|diff|':>10}")
    for batch, q_len, ctx, window in cases:
        case = PagedCase(batch, ctx, q_len, 1, dtype, device)
        flops = 4 * HQ * D * batch * visible_pairs(q_len, ctx, window)
        impls = prefill_impls(case, window, D**-0.5, triton_config or {})
        first = None
        for name, fns in impls.items():
            out = fns[0]()
            if name == "sdpa":
                out = out.transpose(1, 2)
            diff = "" if first is None else f"{max_diff(out, first):.1e}"
            first = out if first is None else first
            ms = timer(fns)
            tflops = flops / (ms * 1e-3) / 1e12
            print(f"{batch:>6} {q_len:>7} {ctx:>7} {window:>6} {name:>7} {ms:>9.3f} {tflops:>8.1f} {diff:>10}")
            results.append(dict(kind="prefill", batch=batch, q_len=q_len, ctx=ctx, window=window, impl=name, ms=ms,
                                tflop_s=tflops))
        del case, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()


def tune(device, dtype, copy_gbs, timer, results):
    """Sweep the Triton kernels' launch configs on a few representative shapes; print the best."""

    def measure(run, key, config):
        rows = []
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                run(rows, config)
        except Exception as e:  # a config that does not fit (shared memory, registers) just loses
            print(f"    {config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            return 0.0
        return max((r[key] for r in rows if r["impl"] == "triton"), default=0.0)

    print("\nTuning the Triton decode kernel (GB/s, best per shape)")
    for batch, ctx in ((1, 32768), (8, 8192), (64, 4096)):
        def run(rows, config, case=(batch, ctx, 0)):
            run_decode([case], device, dtype, copy_gbs, timer, rows, config)

        configs = [dict(block_n=n, num_warps=w, num_stages=st) for n in (32, 64, 128) for w in (2, 4) for st in (2, 3, 4)]
        best = max(((measure(run, "gb_s", c), c) for c in configs), key=lambda t: t[0])
        if batch < 64:  # the split size only matters when there are splits
            chunks = [dict(best[1], min_chunk=m) for m in (128, 512, 1024)]
            best = max([best] + [(measure(run, "gb_s", c), c) for c in chunks], key=lambda t: t[0])
        print(f"  batch {batch:>3} ctx {ctx:>6}: {best[0]:.0f} GB/s ({100 * best[0] / copy_gbs:.0f}% copy) with {best[1]}")
        results.append(dict(kind="tune_decode", batch=batch, ctx=ctx, gb_s=best[0], config=best[1]))
    print("Tuning the Triton prefill kernel (TFLOP/s, 4k prompt)")
    def run(rows, config):
        run_prefill([(1, 4096, 4096, 0)], device, dtype, timer, rows, config)

    configs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
               for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    best = max(((measure(run, "tflop_s", c), c) for c in configs), key=lambda t: t[0])
    print(f"  {best[0]:.1f} TFLOP/s with {best[1]}")
    results.append(dict(kind="tune_prefill", tflop_s=best[0], config=best[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes on CPU under the Triton interpreter (CI)")
    ap.add_argument("--tune", action="store_true", help="also sweep Triton launch configs")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter's bf16 tl.dot is wrong
        decode_cases = [(1, 40, 0), (2, 40, 16)]
        prefill_cases = [(1, 16, 16, 0), (2, 8, 24, 8)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_attention_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                             "Use --tiny for the CPU smoke run; kernel correctness on CPU is "
                             "tests/test_kernels_attention.py.")
        device, dtype = torch.device("cuda"), torch.bfloat16
        decode_cases = [(1, 1024, 0), (1, 8192, 0), (1, 32768, 0), (8, 4096, 0), (8, 32768, 0), (32, 8192, 0),
                        (64, 4096, 0), (128, 2048, 0), (256, 1024, 0), (64, 4096, 128), (256, 4096, 128)]
        prefill_cases = [(1, 4096, 4096, 0), (1, 4096, 4096, 128), (1, 16384, 16384, 0), (8, 1024, 1024, 0),
                         (4, 512, 8192, 0)]  # the last: 512-token chunks continuing 7.7k cached tokens
    from minivllm.ops import attention_sm90

    timer = _timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; FA3: {'yes' if attention_sm90.flash_attn_with_kvcache is not None else 'not importable'}; "
          f"torch {torch.__version__}")
    copy_gbs = copy_bandwidth(device, 64 * 1024**2 if args.tiny else 1024**3)
    results: list[dict] = []
    run_decode(decode_cases, device, dtype, copy_gbs, timer, results)
    run_prefill(prefill_cases, device, dtype, timer, results)
    if args.tune and not args.tiny:
        tune(device, dtype, copy_gbs, timer, results)
    best = max((r for r in results if r["kind"] == "decode" and r["impl"] == "triton"), key=lambda r: r["gb_s"])
    print(f"\nTriton decode best: {best['gb_s']:.0f} GB/s = {best['pct_copy']:.0f}% of copy bandwidth "
          f"(batch {best['batch']}, ctx {best['ctx']}; goal >= 70%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, copy_gb_s=copy_gbs, results=results), f, indent=1)


if __name__ == "__main__":
    main()
