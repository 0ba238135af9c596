"""Fill the image's caches so a cold start does no first-time work.

    python builder/warmup.py              # in the Dockerfile, after the (optional) model download
    python builder/warmup.py --require-gpu  # on a GPU machine: fail instead of skipping the kernels

1. Always: unpack the offline o200k_base vocabulary into MINIVLLM_CACHE (no GPU needed).
2. When a CUDA device is visible: start the engine with the worker's own configuration (so a baked
   /local_model_args.json is honoured), which compiles the decode kernels while capturing CUDA
   graphs, then run prompts of several lengths through prefill and decode. Triton writes every
   compiled kernel to TRITON_CACHE_DIR, which the image keeps.

A plain `docker build` sees no GPU, so step 2 is skipped there (with a message) and the kernels
compile on the first start instead; point TRITON_CACHE_DIR at a network volume to pay that once
per volume rather than once per worker.
"""

from __future__ import annotations

import argparse
import sys
import time

# Prefill lengths that cross the kernels' block sizes and the 128-token sliding window.
PROMPT_LENGTHS = (1, 7, 33, 130, 600)


def warm_tokenizer() -> str:
    from minivllm.tokenizer import ensure_tiktoken_files

    return ensure_tiktoken_files()


def warm_kernels(max_tokens: int) -> dict:
    from minivllm import LLM, SamplingParams
    from minivllm.worker.config import WorkerConfig

    config = WorkerConfig.load()
    start = time.perf_counter()
    llm = LLM(**config.engine_args().model_dump())
    loaded = time.perf_counter() - start
    prompts = [{"prompt_token_ids": [1000 + (i * 7919) % 190_000 for i in range(n)]} for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # one batch: mixed prefill + decode
    llm.generate(prompts[:1], params, use_tqdm=False)  # batch-1 decode
    return {"model": config.served_model_id, "load_s": round(loaded, 1),
            "total_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--require-gpu", action="store_true", help="fail when no CUDA device is visible")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens to decode per warm-up prompt")
    args = p.parse_args(argv)

    print(f"warmup: o200k_base vocabulary in {warm_tokenizer()}", flush=True)
    import torch

    if not torch.cuda.is_available():
        if args.require_gpu:
            print("warmup: no CUDA device visible", file=sys.stderr)
            return 1
        print("warmup: no CUDA device visible; Triton kernels will compile on the first start", flush=True)
        return 0
    print(f"warmup: kernels compiled and cached: {warm_kernels(args.max_tokens)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
