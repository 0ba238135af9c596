"""Serving limits: MAX_WAITING_REQUESTS sheds load with 503 + Retry-After, and nothing is lost."""

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minivllm import AsyncEngine, EngineArgs
from minivllm.openai import OpenAIServing
from minivllm.server.app import create_app

from conftest import serve_in_thread

MAX_WAITING = 4


@pytest.fixture(scope="module")
def url():
    # Two sequences at a time, so a burst really queues.
    engine = AsyncEngine.from_engine_args(EngineArgs(model=None, max_num_seqs=2, num_kv_blocks=64, max_model_len=256))
    serving = OpenAIServing(engine, "tiny", max_model_len=256)
    with serve_in_thread(create_app(engine, serving, max_waiting_requests=MAX_WAITING)) as url:
        while httpx.get(url + "/ready").status_code != 200:
            time.sleep(0.05)
        yield url
    engine.shutdown()


def test_past_max_waiting_requests_new_requests_get_503_with_retry_after(url):
    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = {"prompt": "hello", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(20)])

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(served) == 20 and refused and len(served) >= MAX_WAITING
    for r in refused:
        assert r.headers["Retry-After"] == "1"
        assert "at capacity" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in served)  # none lost or cut
    body = {"prompt": "hello", "max_tokens": 3, "stream": True}
    assert "data: [DONE]" in httpx.post(url + "/v1/completions", json=body, timeout=60).text
    bad = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 0})
    assert bad.status_code == 400  # a refused request frees its admission too
    metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    assert metrics["minivllm:num_requests_queued"].samples[0].value == 0
