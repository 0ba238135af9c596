"""Offline throughput, side by side: our LLM.generate vs transformers' generate, same model, same prompts.

    python benchmarks/bench_offline.py                 # embedded tiny model, the three workloads below
    python benchmarks/bench_offline.py --workloads readme --model PATH --num-prompts 64 --max-tokens 64

Workloads (greedy, EOS ignored, so each prompt yields exactly its max_tokens tokens):
  readme   num_prompts prompts of min-len..max-len tokens, max_tokens each
  mixed    the same prompts, max_tokens drawn per prompt in 8..256 (--mixed-range): continuous batching retires
           short requests early, while a static batch runs every row to the longest
  batch1   one prompt at a time (the first 4 prompts, max_tokens each)

Both sides run fp32 on CPU (bf16 on GPU), loaded side by side (for the 20b on a GPU, see
bench_gpu.py). Transformers gets one left-padded batch of all prompts and generates up to the
largest max_tokens; only each prompt's own max_tokens count as output.
"""

from __future__ import annotations

import argparse
import time

import torch

BATCH1_PROMPTS = 4


def make_prompts(n: int, seed: int, min_len: int, max_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 199_000, (length,), generator=g).tolist() for length in lengths]


def mixed_max_tokens(n: int, seed: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(seed + 1)).tolist()


class Ours:
    def __init__(self, path: str, deterministic: bool = False):
        from minivllm import LLM

        self.llm = LLM(path, max_model_len=1024, deterministic=deterministic)

    def run(self, prompts, max_tokens: list[int]) -> tuple[float, int]:
        from minivllm import SamplingParams

        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


class Transformers:
    def __init__(self, path: str):
        from transformers import GptOssForCausalLM, Mxfp4Config

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if self.device == "cpu" else {}
        self.model = GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                       **kwargs).to(self.device).eval()

    def run(self, prompts, max_tokens: list[int]) -> tuple[float, int]:
        width = max(len(p) for p in prompts)
        pad = 199999
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        longest = max(max_tokens)
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                      do_sample=False, pad_token_id=pad)
            elapsed = time.perf_counter() - start
        generated = out.shape[1] - width
        return elapsed, sum(min(m, generated) for m in max_tokens)


def run_workload(engine, prompts, max_tokens: list[int], one_at_a_time: bool) -> tuple[float, int]:
    if not one_at_a_time:
        return engine.run(prompts, max_tokens)
    seconds = tokens = 0
    for prompt, m in zip(prompts, max_tokens):
        s, t = engine.run([prompt], [m])
        seconds, tokens = seconds + s, tokens + t
    return seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--workloads", default="readme,mixed,batch1", help="comma-separated: readme, mixed, batch1")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--mixed-range", default="8,256", help="LOW,HIGH: the mixed workload's max_tokens range")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per workload and engine, the fastest kept "
                    "(on a busy shared machine, 3 steadies the ratios)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both engines")
    ap.add_argument("--deterministic", action="store_true",
                    help="also run minivllm in deterministic (batch-invariant) mode: what it costs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from minivllm.model.loader import resolve_model_path

    path = resolve_model_path(args.model)
    prompts = make_prompts(args.num_prompts, args.seed, args.min_len, args.max_len)
    workloads = {
        "readme": (prompts, [args.max_tokens] * len(prompts), False),
        "mixed": (prompts, mixed_max_tokens(len(prompts), args.seed, *map(int, args.mixed_range.split(","))), False),
        "batch1": (prompts[:BATCH1_PROMPTS], [args.max_tokens] * BATCH1_PROMPTS, True),
    }
    engines = {"minivllm": Ours(path), "transformers": Transformers(path)}
    if args.deterministic:
        engines["minivllm-det"] = Ours(path, deterministic=True)
    for engine in engines.values():  # warm-up: first calls allocate and pick kernels
        engine.run(prompts[:2], [2, 2])
    print(f"{'workload':<10}{'engine':<14}{'seconds':>10}{'out tokens':>12}{'tok/s':>10}")
    # The engines take turns on each workload, so that a change in the machine's load mid-run
    # skews the ratios less.
    for name in args.workloads.split(","):
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeat):
            for engine_name, engine in engines.items():
                seconds, tokens = run_workload(engine, *workloads[name])
                if engine_name not in best or seconds < best[engine_name][0]:
                    best[engine_name] = seconds, tokens
        for engine_name, (seconds, tokens) in best.items():
            print(f"{name:<10}{engine_name:<14}{seconds:>10.2f}{tokens:>12}{tokens / seconds:>10.1f}", flush=True)
        baseline = best["transformers"][1] / best["transformers"][0]
        for ours in [e for e in best if e.startswith("minivllm")]:
            ratio = best[ours][1] / best[ours][0] / baseline
            print(f"{name:<10}speed-up: {ratio:.2f}x" + ("" if ours == "minivllm" else f" ({ours})"), flush=True)


if __name__ == "__main__":
    main()
