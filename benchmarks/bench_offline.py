"""Offline throughput, side by side: our LLM.generate vs transformers' generate, same model, same prompts.

    python benchmarks/bench_offline.py                 # embedded tiny model, 64 prompts, greedy
    python benchmarks/bench_offline.py --model PATH --num-prompts 64 --max-tokens 64

Both sides run fp32 on CPU (bf16 on GPU) with greedy decoding and EOS ignored, so both produce
exactly num_prompts * max_tokens tokens. Transformers gets one left-padded batch of all prompts.
"""

from __future__ import annotations

import argparse
import time

import torch


def make_prompts(n: int, seed: int, min_len: int, max_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 199_000, (length,), generator=g).tolist() for length in lengths]


def run_ours(model: str | None, prompts, max_tokens: int) -> tuple[float, int]:
    from minivllm import LLM, SamplingParams

    llm = LLM(model, max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_hf(path: str, prompts, max_tokens: int) -> tuple[float, int]:
    from transformers import GptOssForCausalLM, Mxfp4Config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if device == "cpu" else {}
    model = GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **kwargs).to(device).eval()
    width = max(len(p) for p in prompts)
    pad = 199999
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], **dict(gen, max_new_tokens=2, min_new_tokens=2))
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **gen)
    elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from minivllm.model.loader import resolve_model_path

    path = resolve_model_path(args.model)
    prompts = make_prompts(args.num_prompts, args.seed, args.min_len, args.max_len)
    ours_s, ours_tokens = run_ours(path, prompts, args.max_tokens)
    hf_s, hf_tokens = run_hf(path, prompts, args.max_tokens)
    print(f"{'engine':<14}{'seconds':>10}{'out tokens':>12}{'tok/s':>10}")
    print(f"{'minivllm':<14}{ours_s:>10.2f}{ours_tokens:>12}{ours_tokens / ours_s:>10.1f}")
    print(f"{'transformers':<14}{hf_s:>10.2f}{hf_tokens:>12}{hf_tokens / hf_s:>10.1f}")
    print(f"speed-up: {(ours_tokens / ours_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    main()
