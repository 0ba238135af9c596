"""The whole engine against HF transformers, one command, no download.

    python benchmarks/bench_gpu.py                  # gpt-oss-20b-shaped random weights on the GPU
    python benchmarks/bench_gpu.py --tiny           # the same code path on CPU in seconds (CI runs it)
    python benchmarks/bench_gpu.py --profile        # also a torch-profiler summary of batch-1 decode steps

It writes random gpt-oss-20b-shaped weights (MXFP4 experts, bf16 rest) into a local folder once,
loads them through our engine and through transformers' GptOssForCausalLM, and reports side by
side: decode tokens/s at batch 1, 16, 64 (prompt 128, 128 new tokens, EOS ignored), TTFT of a
2k-token prompt, and for our engine a burst of ShareGPT-like requests (total output tokens/s, p50/p95
TTFT and inter-token latency). Prints a table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time

import torch

from minivllm.model.tiny import cache_dir, hf_config, write_tiny_checkpoint

GPT_OSS_20B = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                   num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072)


def write_random_20b(path: str, device: str) -> str:
    """Random gpt-oss-20b-shaped checkpoint, one shard per layer, made on `device` (fast on a GPU)."""
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    from safetensors.torch import save_file

    cfg = hf_config(True, **GPT_OSS_20B)
    os.makedirs(path, exist_ok=True)
    g = torch.Generator(device).manual_seed(0)
    h, v, e, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"], cfg["intermediate_size"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(torch.bfloat16)

    def packed(*shape):  # random nibbles; scales put weights at ~0.02 like a trained model
        return torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8)

    weight_map = {}

    def save(name: str, tensors: dict) -> None:
        save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, os.path.join(path, name))
        weight_map.update(dict.fromkeys(tensors, name))

    save("embed.safetensors", {"model.embed_tokens.weight": randn(v, h, std=1.0), "lm_head.weight": randn(v, h),
                               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "self_attn.sinks": randn(hq, std=1.0), p + "mlp.router.weight": randn(e, h),
             p + "mlp.router.bias": randn(e), p + "self_attn.o_proj.weight": randn(h, hq * d),
             p + "self_attn.o_proj.bias": randn(h)}
        for name, out in (("q_proj", hq * d), ("k_proj", hkv * d), ("v_proj", hkv * d)):
            t[p + f"self_attn.{name}.weight"], t[p + f"self_attn.{name}.bias"] = randn(out, h), randn(out)
        for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            t[p + f"mlp.experts.{name}_blocks"] = packed(e, rows, cols // 32, 16)
            t[p + f"mlp.experts.{name}_scales"] = torch.full((e, rows, cols // 32), 120, dtype=torch.uint8)
            t[p + f"mlp.experts.{name}_bias"] = randn(e, rows)
        save(f"layer-{n:02d}.safetensors", t)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [200002, 199999, 200012]}, f)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def sharegpt_like_lengths(n: int, seed: int, in_mean: float, out_mean: float) -> list[tuple[int, int]]:
    """Log-normal input/output lengths with ShareGPT-like means (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.9
    ins = torch.exp(torch.randn(n, generator=g) * sigma + math.log(in_mean) - sigma**2 / 2)
    outs = torch.exp(torch.randn(n, generator=g) * sigma + math.log(out_mean) - sigma**2 / 2)
    return [(max(4, int(a)), max(1, int(b))) for a, b in zip(ins.clamp(max=4 * in_mean), outs.clamp(max=4 * out_mean))]


def random_prompt(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 199_000, (n,), generator=g).tolist()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- our engine ---------------------------------------------------------------------------------
def bench_ours(path: str, s: dict, profile: bool) -> dict:
    from minivllm import LLM, SamplingParams
    from minivllm.sampling_params import RequestOutputKind

    llm = LLM(path, max_model_len=s["max_model_len"], **s["engine_args"])
    g = torch.Generator().manual_seed(0)
    results: dict = {"decode_tok_s": {}}
    llm.generate([{"prompt_token_ids": random_prompt(g, 16)}], SamplingParams(max_tokens=4), use_tqdm=False)
    for bs in s["batch_sizes"]:
        prompts = [{"prompt_token_ids": random_prompt(g, s["prompt_len"])} for _ in range(bs)]
        params = SamplingParams(temperature=0, max_tokens=s["new_tokens"], ignore_eos=True)
        sync()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        results["decode_tok_s"][bs] = bs * s["new_tokens"] / (time.perf_counter() - start)
    results["async_scheduling"] = async_on_off(llm, g, s)
    long_prompt = {"prompt_token_ids": random_prompt(g, s["ttft_len"])}
    sync()
    start = time.perf_counter()
    llm.generate([long_prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    sync()
    results["ttft_long_ms"] = (time.perf_counter() - start) * 1e3

    engine = llm.engine
    lengths = sharegpt_like_lengths(s["burst"], 1, s["burst_in"], s["burst_out"])
    first, last, gaps = {}, {}, []
    start = time.perf_counter()
    for k, (n_in, n_out) in enumerate(lengths):
        engine.add_request(f"burst-{k}", {"prompt_token_ids": random_prompt(g, n_in)},
                           SamplingParams(max_tokens=n_out, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
    total = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            total += len(out.outputs[0].token_ids)
            if out.request_id not in first:
                first[out.request_id] = now - start
            else:
                gaps.append(now - last[out.request_id])
            last[out.request_id] = now
    elapsed = time.perf_counter() - start
    results["burst"] = {"requests": len(lengths), "output_tokens": total, "tok_s": total / elapsed,
                        "ttft_p50_ms": percentile(list(first.values()), 0.5) * 1e3,
                        "ttft_p95_ms": percentile(list(first.values()), 0.95) * 1e3,
                        "itl_p50_ms": percentile(gaps, 0.5) * 1e3, "itl_p95_ms": percentile(gaps, 0.95) * 1e3}
    if profile:
        results["profile"] = profile_decode(llm, s)
    engine.shutdown()  # tp > 1: stops the worker ranks
    del llm, engine
    return results


def async_on_off(llm, g: torch.Generator, s: dict) -> dict:
    """Decode tok/s at the smallest and largest batch with async scheduling as configured and then
    toggled, on the same loaded engine (the host's share of a step is what overlap hides)."""
    from minivllm import SamplingParams

    engine = llm.engine
    configured = engine.async_scheduling
    out = {}
    for bs in sorted({min(s["batch_sizes"]), max(s["batch_sizes"])}):
        prompts = [{"prompt_token_ids": random_prompt(g, s["prompt_len"])} for _ in range(bs)]
        params = SamplingParams(temperature=0, max_tokens=s["new_tokens"], ignore_eos=True)
        for mode in (configured, not configured):
            engine.async_scheduling, engine._in_flight = mode, None
            sync()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            sync()
            out.setdefault(bs, {})["on" if mode else "off"] = bs * s["new_tokens"] / (time.perf_counter() - start)
    engine.async_scheduling, engine._in_flight = configured, None
    print("async scheduling decode tok/s:", out)
    return out


def profile_decode(llm, s: dict) -> dict:
    """Where one batch-1 decode step's time goes: per-op device/CPU time and the host share."""
    from torch.profiler import ProfilerActivity, profile

    from minivllm import SamplingParams

    engine = llm.engine
    engine.add_request("profile", {"prompt_token_ids": list(range(1000, 1000 + s["prompt_len"]))},
                       SamplingParams(max_tokens=10_000, ignore_eos=True))
    for _ in range(3):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps = 10
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = (time.perf_counter() - start) / steps
    engine.abort_request("profile")
    events = prof.key_averages()
    use_cuda = torch.cuda.is_available()
    device_us = sum(e.self_device_time_total for e in events) / steps if use_cuda else 0.0
    top = sorted(events, key=lambda e: e.self_device_time_total if use_cuda else e.self_cpu_time_total, reverse=True)
    table = events.table(sort_by="self_cuda_time_total" if use_cuda else "self_cpu_time_total", row_limit=15)
    print(table)
    return {"step_ms": wall * 1e3, "device_busy_ms": device_us / 1e3,
            "host_gap_ms": wall * 1e3 - device_us / 1e3 if use_cuda else None,
            "top_ops": [{"name": e.key, "calls_per_step": e.count / steps,
                         "self_us_per_step": (e.self_device_time_total if use_cuda else e.self_cpu_time_total) / steps}
                        for e in top[:15]]}


# ---- transformers -------------------------------------------------------------------------------
def bench_hf(path: str, s: dict, attn: str) -> dict:
    from transformers import GptOssForCausalLM, Mxfp4Config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                              quantization_config=Mxfp4Config(dequantize=True)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    results: dict = {"decode_tok_s": {}, "attn_implementation": attn}

    def generate(prompts: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(prompts, device=device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=199999)
        sync()
        return time.perf_counter() - start

    generate([random_prompt(g, 16)], 2)
    for bs in s["batch_sizes"]:
        elapsed = generate([random_prompt(g, s["prompt_len"]) for _ in range(bs)], s["new_tokens"])
        results["decode_tok_s"][bs] = bs * s["new_tokens"] / elapsed
    results["ttft_long_ms"] = generate([random_prompt(g, s["ttft_len"])], 1) * 1e3
    del model
    return results


SETTINGS = {
    "full": dict(batch_sizes=[1, 16, 64], prompt_len=128, new_tokens=128, ttft_len=2048, burst=1000, burst_in=220,
                 burst_out=200, max_model_len=4096, engine_args={}),
    "tiny": dict(batch_sizes=[1, 4], prompt_len=16, new_tokens=8, ttft_len=256, burst=12, burst_in=24, burst_out=8,
                 max_model_len=512, engine_args=dict(num_kv_blocks=256)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="embedded tiny model on CPU, small sizes")
    ap.add_argument("--model", help="use this checkpoint folder instead of random weights")
    ap.add_argument("--out", default="bench_results/bench_gpu.json")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-attn", default="eager", help="transformers attn_implementation (eager, flex_attention...)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="our engine's ranks (GPUs)")
    args = ap.parse_args()
    s = SETTINGS["tiny" if args.tiny else "full"]
    s = dict(s, tensor_parallel_size=args.tensor_parallel_size,
             engine_args=dict(s["engine_args"], tensor_parallel_size=args.tensor_parallel_size))
    if args.model:
        path = args.model
    elif args.tiny:
        path = write_tiny_checkpoint(os.path.join(cache_dir(), "models", "bench-tiny"), seed=0)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA GPU for the 20b-shaped run; use --tiny on CPU")
        path = write_random_20b(os.path.join(cache_dir(), "models", "random-gpt-oss-20b"), "cuda")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "model": path, "settings": {k: v for k, v in s.items() if k != "engine_args"}}
    if not args.skip_hf:  # first, so its memory is gone before our KV cache sizes itself
        report["transformers"] = bench_hf(path, s, args.hf_attn)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["minivllm"] = bench_ours(path, s, args.profile)
    print_table(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    ours, hf = report["minivllm"], report.get("transformers")
    print(f"\n{report['device']}  model={report['model']}")
    print(f"{'metric':<28}{'minivllm':>14}{'transformers':>14}{'ratio':>8}")

    def row(name, a, b, higher_is_better=True):
        ratio = (a / b if higher_is_better else b / a) if b else float("nan")
        print(f"{name:<28}{a:>14.1f}{(b if b is not None else float('nan')):>14.1f}{ratio:>8.2f}")

    for bs, v in ours["decode_tok_s"].items():
        row(f"decode tok/s, batch {bs}", v, hf["decode_tok_s"][bs] if hf else None)
    row("TTFT long prompt (ms)", ours["ttft_long_ms"], hf["ttft_long_ms"] if hf else None, higher_is_better=False)
    b = ours["burst"]
    print(f"burst of {b['requests']}: {b['tok_s']:.1f} output tok/s, TTFT p50 {b['ttft_p50_ms']:.1f} ms "
          f"p95 {b['ttft_p95_ms']:.1f} ms, ITL p50 {b['itl_p50_ms']:.2f} ms p95 {b['itl_p95_ms']:.2f} ms")


if __name__ == "__main__":
    main()
