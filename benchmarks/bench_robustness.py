"""Poisoned requests among healthy streams, against a real server on 127.0.0.1.

Per class of bad input: requests sent, status codes seen, 5xx count (must be 0); the healthy
streams running beside them must all finish with finish_reason "length". Then /health latency
while one long prompt is prefilled (the event loop must never stall).

    python benchmarks/bench_robustness.py [--per-class 50] [--long-prompt 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import threading
import time

import httpx
import uvicorn

from minivllm import AsyncEngine, EngineArgs
from minivllm.openai import OpenAIServing
from minivllm.server.app import create_app
from minivllm.worker import WorkerConfig, make_handler

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


def poison_classes(rng: random.Random) -> dict[str, callable]:
    """Each class: a function giving (route, raw body) for one bad request."""
    def dumps(body):
        return json.dumps(body)

    return {
        "int64 overflow (top_k, seed, min_tokens)": lambda: ("/v1/completions", dumps(
            {**COMPLETION, rng.choice(["top_k", "seed", "min_tokens"]): rng.choice([2**63, 2**64, -(2**70)])})),
        "non-finite floats": lambda: ("/v1/chat/completions",
                                      dumps(CHAT)[:-1] + f', "{rng.choice(["temperature", "top_p"])}": NaN}}'),
        "lone surrogates": lambda: (rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/responses"]),
                                    '{"prompt": "a\\ud800", "messages": [{"role": "user", "content": "\\udfff"}], '
                                    '"input": "\\ud83d", "max_tokens": 2}'),
        "deeply nested JSON": lambda: ("/v1/chat/completions", '{"messages": ' + "[" * 20000 + "]" * 20000 + "}"),
        "out-of-vocab ids": lambda: ("/v1/completions", dumps(
            {**COMPLETION, "prompt": [1, rng.randrange(201088, 10**12)]})),
        "bad logit_bias": lambda: ("/v1/completions", dumps({**COMPLETION, "logit_bias": {"x": 1, "999999": 5}})),
        "invalid JSON": lambda: ("/v1/completions", '{"prompt": "hi", "max_tokens": '),
        "RunPod job with bad params": lambda: ("/runsync", dumps(
            {"input": {"prompt": "hi", "sampling_params": {"top_k": 2**63, "seed": 2**64}}})),
    }


def start_server(max_model_len: int):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=None, max_model_len=max_model_len,
                                                     kv_cache_space_gib=2.0))
    serving = OpenAIServing(engine, "tiny", max_model_len=max_model_len)
    handler = make_handler(engine, serving, WorkerConfig(stream_flush_ms=0))
    app = create_app(engine, serving, runpod_handler=handler)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while True:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return url, engine
        except httpx.TransportError:
            pass
        time.sleep(0.1)


async def poisoned_among_streams(url: str, per_class: int) -> None:
    rng = random.Random(0)
    classes = poison_classes(rng)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def healthy(i: int) -> str | None:
            body = {"prompt": f"tale {i}", "max_tokens": 64, "ignore_eos": True, "stream": True}
            finish = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
            return finish

        streams = [asyncio.create_task(healthy(i)) for i in range(8)]
        codes: dict[str, collections.Counter] = {name: collections.Counter() for name in classes}
        for name, make in classes.items():
            for _ in range(per_class):
                route, body = make()
                r = await client.post(route, content=body, headers={"content-type": "application/json"})
                status = r.status_code
                if route == "/runsync":
                    status = f"job {r.json().get('status')}"
                codes[name][status] += 1
        finishes = await asyncio.gather(*streams)
    print(f"{'class':45s} {'sent':>5s} {'5xx':>4s}  statuses")
    total = fivexx = 0
    for name, counter in codes.items():
        bad = sum(n for code, n in counter.items() if isinstance(code, int) and code >= 500)
        total, fivexx = total + sum(counter.values()), fivexx + bad
        print(f"{name:45s} {sum(counter.values()):5d} {bad:4d}  {dict(counter)}")
    print(f"total {total} poisoned requests, {fivexx} 5xx; the 8 healthy streams finished: {finishes}")


async def health_during_long_prompt(url: str, tokens: int) -> None:
    rng = random.Random(1)
    ids = [rng.randrange(1000, 190000) for _ in range(tokens)]
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        async def stream_gaps() -> list[float]:
            """A stream running beside the prefill: the gaps between its tokens."""
            body = {"prompt": "beside", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            arrivals = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())
                    if request.done():
                        break
            return [b - a for a, b in zip(arrivals, arrivals[1:])]

        start = time.perf_counter()
        request = asyncio.create_task(client.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}))
        beside = asyncio.create_task(stream_gaps())
        latencies = []
        while not request.done():
            t = time.perf_counter()
            await client.get("/health")
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)
        response = await request
        gaps = sorted(await beside)
    latencies.sort()
    print(f"{tokens}-token prompt: status {response.status_code} in {time.perf_counter() - start:.1f} s; "
          f"/health polled {len(latencies)} times, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")
    if gaps:
        print(f"a stream beside it: {len(gaps) + 1} tokens during the prefill, inter-token p50 "
              f"{gaps[len(gaps) // 2] * 1000:.0f} ms, max {gaps[-1] * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--long-prompt", type=int, default=100_000, help="tokens (0: skip)")
    args = ap.parse_args()
    url, engine = start_server(max(args.long_prompt + 16, 4096))
    asyncio.run(poisoned_among_streams(url, args.per_class))
    if args.long_prompt:
        asyncio.run(health_during_long_prompt(url, args.long_prompt))
    engine.shutdown()


if __name__ == "__main__":
    main()
