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


# ---- one limit table for every door ------------------------------------------------------------

LIMITS = dict(max_n=2, max_logprobs=3, max_prompt_bytes=3000, max_stop_sequences=2, max_tools=1)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT_BASE = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION_BASE = {"prompt": "hi", "max_tokens": 2}

# (route, body, the limit's variable named in the error)
OPENAI_CASES = [
    ("/v1/chat/completions", {**CHAT_BASE, "n": 3}, "MAX_N"),
    ("/v1/completions", {**COMPLETION_BASE, "n": 3}, "MAX_N"),
    ("/v1/chat/completions", {**CHAT_BASE, "logprobs": True, "top_logprobs": 4}, "MAX_LOGPROBS"),
    ("/v1/completions", {**COMPLETION_BASE, "logprobs": 4}, "MAX_LOGPROBS"),
    ("/v1/completions", {**COMPLETION_BASE, "prompt_logprobs": 4}, "MAX_LOGPROBS"),
    ("/v1/chat/completions", {**CHAT_BASE, "stop": ["a", "b", "c"]}, "MAX_STOP_SEQUENCES"),
    ("/v1/completions", {**COMPLETION_BASE, "stop": ["a", "b", "c"]}, "MAX_STOP_SEQUENCES"),
    ("/v1/chat/completions", {**CHAT_BASE, "tools": [TOOL, TOOL]}, "MAX_TOOLS"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2,
                       "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "g"}]}, "MAX_TOOLS"),
    ("/v1/completions", {**COMPLETION_BASE, "max_tokens": 10**6}, "maximum context length"),
]


@pytest.fixture(scope="module")
def limited(engine):
    from minivllm.limits import RequestLimits
    from minivllm.worker import WorkerConfig, make_handler

    serving = OpenAIServing(engine, "tiny", max_model_len=engine.engine.max_model_len,
                            limits=RequestLimits(**LIMITS))
    return serving, make_handler(engine, serving, WorkerConfig(**LIMITS))


def run_job(handler, job_input: dict) -> list:
    async def main():
        return [out async for out in handler({"id": "limits", "input": job_input})]
    return asyncio.run(main())


@pytest.mark.parametrize("route,body,limit", OPENAI_CASES)
def test_limits_on_openai_routes_and_openai_jobs(limited, route, body, limit):
    from minivllm.openai.errors import OpenAIError

    serving, handler = limited
    with pytest.raises(OpenAIError) as e:
        asyncio.run(serving.dispatch(route, body))
    assert e.value.status_code == 400 and limit in e.value.message
    out, = run_job(handler, {"openai_route": route, "openai_input": body})  # the same body as a RunPod job
    assert limit in out["error"]["message"]


@pytest.mark.parametrize("sampling_params,limit", [
    ({"n": 3}, "MAX_N"),
    ({"logprobs": 4}, "MAX_LOGPROBS"),
    ({"prompt_logprobs": 4}, "MAX_LOGPROBS"),
    ({"stop": ["a", "b", "c"]}, "MAX_STOP_SEQUENCES"),
    ({"max_tokens": 10**6}, "max_model_len"),
])
def test_limits_on_native_jobs(limited, sampling_params, limit):
    out, = run_job(limited[1], {"prompt": "hi", "sampling_params": sampling_params})
    assert limit in out["error"] and "sampling_params." in out["error"]


def test_job_input_size_limit(limited):
    out, = run_job(limited[1], {"prompt": "word " * 1000})
    assert "MAX_PROMPT_BYTES" in out["error"]
    out, = run_job(limited[1], {"prompt": "hi", "sampling_params": {"n": 2, "max_tokens": 2}})
    assert "error" not in out  # at the limits is fine


def test_request_body_size_limit_over_http(limited):
    serving, _ = limited
    with serve_in_thread(create_app(serving.engine, serving)) as url:
        big = {"prompt": "word " * 1000, "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=big)
        assert r.status_code == 413 and "MAX_PROMPT_BYTES" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_api_key_as_bearer_or_x_api_key(engine):
    serving = OpenAIServing(engine, "tiny", max_model_len=engine.engine.max_model_len)
    with serve_in_thread(create_app(engine, serving, api_key="s3cret")) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
