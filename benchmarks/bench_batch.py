"""A batch next to real-time traffic, in one run: does the batch hurt real-time latency, and how
fast does the batch go with and without real-time load?

    python benchmarks/bench_batch.py                      # embedded tiny model, 2,000-line batch
    python benchmarks/bench_batch.py --model PATH --lines 2000 --window-s 30 --max-in-flight 32

Phases, one server on 127.0.0.1 (the HTTP app with the Batch API mounted, SQLite store):
 1. idle: real-time chat requests one after another (a user) -> p50 / p95 latency;
 2. a batch of --lines chat lines is submitted; for --window-s seconds nothing else runs -> batch
    lines/s alone;
 3. for --window-s seconds real-time requests run again while the batch runs -> their p50 / p95,
    and the batch's lines/s under that load;
 4. the batch is cancelled (or finished with --finish).
Real-time requests use priority 0; batch lines the runner's low priority, once the serving layer
passes it on (the report says whether it does).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def realtime(client, model: str, max_tokens: int, *, count: int | None = None, seconds: float | None = None) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds if seconds else None
    i = 0
    while (count is None or i < count) and (deadline is None or time.monotonic() < deadline):
        start = time.perf_counter()
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Real-time {i}"}],
                                       max_tokens=max_tokens, extra_body={"ignore_eos": True})
        latencies.append(time.perf_counter() - start)
        i += 1
    return latencies


def batch_rate(client, batch_id: str, seconds: float, during=None) -> tuple[float, list[float]]:
    """Lines finished per second over `seconds` (while `during()` runs, if given)."""
    def done() -> int:
        counts = client.batches.retrieve(batch_id).request_counts
        return counts.completed + counts.failed

    start_n, start = done(), time.perf_counter()
    latencies = during() if during else (time.sleep(seconds) or [])
    return (done() - start_n) / (time.perf_counter() - start), latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--lines", type=int, default=2000, help="batch size (lines)")
    ap.add_argument("--batch-max-tokens", type=int, default=16)
    ap.add_argument("--realtime-max-tokens", type=int, default=16)
    ap.add_argument("--idle-requests", type=int, default=20, help="real-time requests measured while idle")
    ap.add_argument("--window-s", type=float, default=15.0, help="length of each measured phase")
    ap.add_argument("--max-in-flight", type=int, default=16, help="batch lines in the engine at once")
    ap.add_argument("--busy-in-flight", type=int, default=None,
                    help="batch lines in flight while real-time requests run (default max-in-flight // 8; "
                         "0: never yield)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--finish", action="store_true", help="let the batch finish instead of cancelling it")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import openai
    import uvicorn

    from minivllm import AsyncEngine, EngineArgs
    from minivllm.batches import runner as batch_runner
    from minivllm.batches.service import BatchService
    from minivllm.openai import OpenAIServing
    from minivllm.server.app import create_app

    engine = AsyncEngine.from_engine_args(EngineArgs(model=args.model, max_model_len=args.max_model_len))
    model = "bench"
    serving = OpenAIServing(engine, model, max_model_len=engine.engine.max_model_len)
    data_dir = tempfile.mkdtemp(prefix="bench-batch-")
    yield_to = (lambda: engine.num_streams) if args.busy_in_flight != 0 else None
    service = BatchService.create(serving.dispatch, data_dir=data_dir, max_in_flight=args.max_in_flight,
                                  engine_streams=yield_to, busy_in_flight=args.busy_in_flight or None)
    app = create_app(engine, serving, batches=service)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    results: dict = {"lines": args.lines, "max_in_flight": args.max_in_flight,
                     "busy_in_flight": None if yield_to is None else service.runner.busy_in_flight,
                     "priority_reaches_engine": batch_runner.request_priority is not None}
    try:
        realtime(client, model, args.realtime_max_tokens, count=2)  # warm-up
        idle = realtime(client, model, args.realtime_max_tokens, count=args.idle_requests)

        line = {"method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "max_tokens": args.batch_max_tokens, "ignore_eos": True}}
        data = "".join(json.dumps({**line, "custom_id": f"b{i}", "body": {
            **line["body"], "messages": [{"role": "user", "content": f"Batch line {i}"}]}}) + "\n"
            for i in range(args.lines)).encode()
        file = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
        submitted = time.perf_counter()
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        while client.batches.retrieve(batch.id).status == "validating":
            time.sleep(0.05)
        results["validate_s"] = time.perf_counter() - submitted
        time.sleep(1.0)  # let the runner fill its in-flight slots
        alone, _ = batch_rate(client, batch.id, args.window_s)
        loaded, busy = batch_rate(client, batch.id, args.window_s, during=lambda: realtime(
            client, model, args.realtime_max_tokens, seconds=args.window_s))
        results.update({
            "realtime_idle": {"n": len(idle), "p50_s": percentile(idle, 50), "p95_s": percentile(idle, 95),
                              "mean_s": statistics.fmean(idle)},
            "realtime_during_batch": {"n": len(busy), "p50_s": percentile(busy, 50), "p95_s": percentile(busy, 95),
                                      "mean_s": statistics.fmean(busy) if busy else float("nan")},
            "batch_lines_per_s_alone": alone, "batch_lines_per_s_with_realtime": loaded})
        if args.finish:
            while (b := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
                time.sleep(0.2)
            results["batch_total_s"] = time.perf_counter() - submitted
            results["batch_status"] = b.status
        else:
            client.batches.cancel(batch.id)
            while client.batches.retrieve(batch.id).status not in ("cancelled", "completed"):
                time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()

    idle_r, busy_r = results["realtime_idle"], results["realtime_during_batch"]
    print(f"batch: {args.lines} lines, {args.max_in_flight} in flight ({results['busy_in_flight']} beside real-time "
          f"requests), validated in {results['validate_s']:.2f} s; "
          f"priority reaches the engine: {results['priority_reaches_engine']}")
    print(f"{'real-time chat':<28}{'n':>5}{'p50 s':>10}{'p95 s':>10}")
    print(f"{'  idle':<28}{idle_r['n']:>5}{idle_r['p50_s']:>10.3f}{idle_r['p95_s']:>10.3f}")
    print(f"{'  while the batch runs':<28}{busy_r['n']:>5}{busy_r['p50_s']:>10.3f}{busy_r['p95_s']:>10.3f}")
    print(f"batch lines/s: alone {results['batch_lines_per_s_alone']:.2f}, "
          f"with real-time load {results['batch_lines_per_s_with_realtime']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
