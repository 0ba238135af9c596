"""Long prompts on the embedded default server (`minivllm serve`, a real subprocess): bounded
memory (peak RSS read from /proc), a responsive event loop, and neighbours that keep streaming."""

import asyncio
import os
import random
import signal
import subprocess
import time

import httpx
import pytest

from conftest import free_port, minivllm_command, wait_until_up

RSS_BUDGET_KB = 1.5 * 1024 * 1024  # 1.5 GB of growth above the warmed-up server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = minivllm_command()
    env = {**os.environ, "LOCAL_MODEL_ARGS_PATH": str(tmp_path_factory.mktemp("cfg") / "absent.json")}
    # The embedded default as a user starts it (max_model_len 131072), nothing tuned for the test.
    proc = subprocess.Popen(cmd + ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(proc, url + "/ready", timeout=120)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> int:
    """Restart the process's VmHWM at its current RSS; returns that RSS in kB."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return status_kb(pid, "VmRSS")


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 190_000) for _ in range(n)]


def test_echo_logprobs_on_a_32k_prompt_in_bounded_memory(server):
    url, pid = server
    ids = random_ids(32_000, seed=1)
    base = reset_peak_rss(pid)
    r = httpx.post(url + "/v1/completions", timeout=900,
                   json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 32_001  # every prompt token, then the one generated
    assert logprobs["token_logprobs"][0] is None and all(v is not None for v in logprobs["token_logprobs"][1:])
    growth = status_kb(pid, "VmHWM") - base
    assert growth < RSS_BUDGET_KB, f"peak RSS grew {growth / 1024:.0f} MB"


def test_100k_prompt_with_health_and_streams_beside_it(server):
    url, pid = server
    ids = random_ids(100_000, seed=2)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
            async def stream(i: int) -> tuple[str, list[float]]:
                body = {"prompt": f"story {i}", "max_tokens": 24, "ignore_eos": True, "stream": True}
                finish, arrivals = None, []
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.perf_counter())
                            finish = httpx.Response(200, content=line[6:]).json()["choices"][0]["finish_reason"] \
                                or finish
                return finish, arrivals

            long = asyncio.create_task(client.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}))
            await asyncio.sleep(1.0)  # the long prefill is under way
            streams = [asyncio.create_task(stream(i)) for i in range(4)]
            health = []
            while not long.done():
                t = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                health.append(time.perf_counter() - t)
                await asyncio.sleep(0.1)
            return await long, await asyncio.gather(*streams), health

    base = reset_peak_rss(pid)
    response, streams, health = asyncio.run(main())
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 100_000
    assert [finish for finish, _ in streams] == ["length"] * 4  # the short streams finished normally
    assert max(health) < 0.25, f"/health took {max(health) * 1000:.0f} ms during the prefill"
    growth = status_kb(pid, "VmHWM") - base
    assert growth < RSS_BUDGET_KB, f"peak RSS grew {growth / 1024:.0f} MB"


def test_long_prefill_chunks_shrink_beside_running_streams():
    """A long prompt's chunks shrink as its context grows while others run, so each step's
    attention work (and every stream's inter-token gap) stays bounded; alone it takes full chunks."""
    from minivllm import SamplingParams
    from minivllm.config import EngineArgs
    from minivllm.engine.llm_engine import LLMEngine
    from minivllm.engine.scheduler import LONG_CONTEXT

    budget = 2048
    engine = LLMEngine(EngineArgs(model=None, max_model_len=16_384, max_num_batched_tokens=budget))
    engine.add_request("stream", "hello", SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    engine.add_request("long", {"prompt_token_ids": random_ids(14_000, seed=3)}, SamplingParams(max_tokens=1))
    chunks, stream_tokens = [], 0
    while "long" in engine.requests:
        long_seq = engine.requests["long"].seqs[0]
        before = long_seq.num_computed_tokens
        stream_tokens_before = len(engine.requests["stream"].seqs[0].token_ids)
        engine.step()
        if long_seq.num_computed_tokens > before:
            chunks.append((before, long_seq.num_computed_tokens - before))
        stream_tokens += len(engine.requests["stream"].seqs[0].token_ids) - stream_tokens_before
    assert chunks[0][1] == budget - 1  # early chunks: the whole budget but the stream's decode token
    for computed, size in chunks:
        assert size <= max(16, budget * LONG_CONTEXT // (computed + budget))
    assert chunks[-1][1] < budget  # late chunks shrank
    assert stream_tokens >= len(chunks)  # the stream got a token in every step of the prefill
