"""Host overhead of one engine step: schedule + prepare inputs + sample + bookkeeping.

    python benchmarks/bench_host_overhead.py --num-seqs 256 --steps 200

It runs FINAL_ONLY outputs, then DELTA outputs (--output-kind picks one), each on a fresh engine.

The model is replaced by one that does no work (zero hidden states, zero logits over a small
vocab), so what is timed is the engine's own Python and tensor bookkeeping. Goal: <= 0.5 ms/step.
The steps are timed whole first, then again with a timer around each phase (the median ms of each;
the timers add a little). Torch runs on one thread: the stub's tensors are tiny, and a second
intra-op thread only adds wake-up latency (milliseconds per op on a busy shared machine).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from minivllm import LLM, RequestOutputKind, SamplingParams


class NoWorkModel(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, positions, ctx, kv_cache):
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden):
        return torch.zeros(hidden.shape[0], self.vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=1024, help="width of the stub logits")
    ap.add_argument("--output-kind", choices=["both", "final_only", "delta"], default="both",
                    help="final_only: as LLM.generate runs, outputs only for finished requests; delta: an output "
                         "per request every step, as the server and the worker consume them; both: one after the other")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for kind in ["final_only", "delta"] if args.output_kind == "both" else [args.output_kind]:
        run(kind, args.num_seqs, args.steps, args.vocab)


def run(kind: str, num_seqs: int, steps: int, vocab: int) -> None:
    max_model_len = 64 + 2 * steps + 64  # the prompt, both timed runs, warm-up
    llm = LLM(None, max_num_seqs=num_seqs, num_kv_blocks=num_seqs * (max_model_len // 16 + 1),
              max_model_len=max_model_len)
    engine = llm.engine
    engine.runner.model = NoWorkModel(vocab)
    params = SamplingParams(temperature=0, max_tokens=2 * steps + 10, ignore_eos=True,
                            output_kind=RequestOutputKind[kind.upper()])
    for i in range(num_seqs):
        engine.add_request(str(i), {"prompt_token_ids": [1000 + i] * 64}, params)
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the prefills
    assert len(engine.scheduler.running) == num_seqs
    for _ in range(5):
        engine.step()
    timings = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        timings.append(time.perf_counter() - start)
    timings.sort()
    ms = [t * 1e3 for t in timings]
    print(f"{num_seqs} running sequences, {steps} decode steps, no-work model (vocab {vocab}), {kind} outputs")
    print(f"per step: median {ms[len(ms) // 2]:.3f} ms, p10 {ms[len(ms) // 10]:.3f} ms, p90 {ms[9 * len(ms) // 10]:.3f} ms")
    print(f"per sequence: {ms[len(ms) // 2] / num_seqs * 1e3:.2f} us")
    phases = _time_phases(engine)
    for _ in range(steps):
        engine.step()
    for name, values in phases.items():
        values.sort()
        print(f"  {name:<12} median {values[len(values) // 2] * 1e3:.3f} ms")


def _time_phases(engine) -> dict[str, list[float]]:
    """Wrap each phase of a step in a timer (instance attributes shadow the methods)."""
    phases: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name].append(time.perf_counter() - start)
        return wrapper

    runner, model = engine.runner, engine.runner.model
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    runner.prepare = timed("prepare", runner.prepare)
    model.forward = timed("model", model.forward)
    model.compute_logits = timed("logits", model.compute_logits)
    engine.sampler = timed("sample", engine.sampler)
    engine._postprocess = timed("postprocess", engine._postprocess)
    return phases


if __name__ == "__main__":
    main()
