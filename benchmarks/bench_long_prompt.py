"""Long-prompt prefill on CPU (the pure-torch reference ops): time and peak RAM growth per prompt size.

    python benchmarks/bench_long_prompt.py                       # 1k, 8k, 32k, 100k tokens
    python benchmarks/bench_long_prompt.py --sizes 1k,8k,32k
    python benchmarks/bench_long_prompt.py --attention /tmp/reference_old.py   # another paged_attention

Each size runs in its own subprocess (a fresh process, so one size's peak does not hide the
next one's, and an out-of-memory kill takes down only that size). The child builds the engine
(embedded tiny model unless --model), warms it up with a short prompt, resets its peak RSS
(/proc/self/clear_refs, else it reports the peak since start), then runs one prompt of the given
length (--repeat times) with max_tokens=2 and reports:

  prefill_s    wall time of that generate() call: the whole prompt, chunked by
               max_num_batched_tokens, plus one decode step (the fastest of --repeat calls)
  peak_grow_mb peak RSS (VmHWM) during the call minus RSS before it: the per-step working memory
               (the KV pool is allocated up front at engine build, so it does not count)

--attention PATH loads `paged_attention` from that file and swaps it into the reference ops,
to compare against an older version, e.g. `git show HEAD~1:src/minivllm/ops/reference.py > old.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _parse_size(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1000) if s.endswith("k") else int(s)


def child(args) -> None:
    import torch

    from minivllm import LLM, SamplingParams

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.attention:
        import importlib.util

        import minivllm.ops as ops

        spec = importlib.util.spec_from_file_location("alt_reference", args.attention)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        # REFERENCE_OPS is a frozen dataclass built at import; swap its attention for the benchmark only.
        object.__setattr__(ops.REFERENCE_OPS, "attention", mod.paged_attention)
    n = args.size
    # KV pool: the tiny model needs 1 KiB per token (4 layers x K,V x 2 heads x 16 x fp32).
    llm = LLM(args.model, max_model_len=n + 16, max_num_batched_tokens=args.chunk,
              kv_cache_space_gib=args.kv_gib, enable_prefix_caching=False, device="cpu")
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    warm = torch.randint(0, 199_000, (64,), generator=g).tolist()
    llm.generate([{"prompt_token_ids": warm}], params, use_tqdm=False)
    prompt = torch.randint(0, 199_000, (n,), generator=g).tolist()
    rss0 = _status_kb("VmRSS")
    exact = _reset_peak()
    elapsed = float("inf")
    for _ in range(args.repeat):  # no prefix caching: every repeat prefills the whole prompt again
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        elapsed = min(elapsed, time.perf_counter() - start)
    peak = _status_kb("VmHWM")
    assert len(out[0].outputs[0].token_ids) == 2
    print(json.dumps(dict(size=n, prefill_s=elapsed, rss_before_mb=rss0 / 1024, peak_mb=peak / 1024,
                          peak_grow_mb=(peak - rss0) / 1024, exact_peak=exact, tokens=out[0].outputs[0].token_ids)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1k,8k,32k,100k", help="comma-separated prompt lengths (1k = 1000)")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens (prefill chunk size)")
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="kv_cache_space_gib (default: enough for the largest size, at least 1.0)")
    ap.add_argument("--attention", default=None, help="file whose paged_attention replaces the reference one")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=1, help="prefill each prompt this many times, report the fastest")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per size")
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.size is not None:
        child(args)
        return
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s.strip()]
    # ~1 KiB/token for the tiny model; a real checkpoint needs --kv-gib set by hand.
    kv_gib = args.kv_gib or max(1.0, round(max(sizes) * 1.25 * 1024 / 1024**3 + 0.05, 2))
    failed = 0
    print(f"{'tokens':>8}{'prefill s':>11}{'tok/s':>9}{'peak +MB':>10}{'rss MB':>9}")
    for n in sizes:
        cmd = [sys.executable, __file__, "--size", str(n), "--chunk", str(args.chunk), "--kv-gib", str(kv_gib),
               "--threads", str(args.threads), "--repeat", str(args.repeat)]
        if args.model:
            cmd += ["--model", args.model]
        if args.attention:
            cmd += ["--attention", os.path.abspath(args.attention)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{n:>8}  timed out after {args.timeout:.0f} s", flush=True)
            failed += 1
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            why = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
            print(f"{n:>8}  failed: {why} {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            failed += 1
            continue
        r = json.loads(lines[-1])
        print(f"{n:>8}{r['prefill_s']:>11.2f}{n / r['prefill_s']:>9.0f}{r['peak_grow_mb']:>10.0f}"
              f"{r['peak_mb']:>9.0f}{'' if r['exact_peak'] else '  (peak since start)'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
