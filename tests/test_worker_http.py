"""The RunPod endpoint emulation (/run /runsync /stream /status /cancel) over HTTP, on a real
uvicorn server and the real engine."""

import json
import time

import httpx
import pytest
from fastapi import FastAPI, Request

from minivllm.openai import OpenAIServing
from minivllm.server.runpod_api import RunPodJobs, build_runpod_router
from minivllm.worker import WorkerConfig, make_handler

from conftest import serve_in_thread


@pytest.fixture(scope="module")
def client(engine):
    serving = OpenAIServing(engine, "tiny-gpt-oss", max_model_len=1024)
    handler = make_handler(engine, serving, WorkerConfig(stream_flush_ms=0))
    app = FastAPI()
    app.include_router(build_runpod_router(RunPodJobs(handler, max_concurrency=2)))
    app.state.webhooks = []

    @app.post("/hook")
    async def hook(request: Request):
        app.state.webhooks.append(await request.json())
        return {}

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.app = app
        yield client


def free_blocks(engine) -> int:
    return engine.engine.block_manager.num_free_blocks


def wait_for_status(client, job_id, statuses, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/status/{job_id}").json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def test_runsync_native_non_stream(client):
    r = client.post("/runsync", json={"input": {"prompt": "Hello", "sampling_params": {"max_tokens": 5, "ignore_eos": True}}})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "COMPLETED" and body["id"]
    assert body["delayTime"] >= 0 and body["executionTime"] >= 0
    out, = body["output"]  # the aggregated stream: one item for a non-stream job
    assert out["usage"]["output"] == 5 and out["choices"][0]["finish_reason"] == "length"


def test_runsync_native_stream_aggregates_every_batch(client):
    job = {"prompt": "Hello", "stream": True, "sampling_params": {"max_tokens": 13, "ignore_eos": True}}
    body = client.post("/runsync", json={"input": job}).json()
    assert body["status"] == "COMPLETED"
    assert [out["usage"]["output"] for out in body["output"]] == [1, 4, 13]


def test_runsync_openai_routes(client):
    body = client.post("/runsync", json={"input": {"openai_route": "/v1/models"}}).json()
    assert body["status"] == "COMPLETED" and body["output"][0]["data"][0]["id"] == "tiny-gpt-oss"
    job = {"openai_route": "/v1/chat/completions",
           "openai_input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}}
    body = client.post("/runsync", json={"input": job}).json()
    assert body["status"] == "COMPLETED" and body["output"][-1].endswith("data: [DONE]\n\n")


def test_errors_fail_the_job_with_a_readable_error(client):
    body = client.post("/runsync", json={"input": {"prompt": "hi", "sampling_params": {"bogus": 1}}}).json()
    assert body["status"] == "FAILED" and "output" not in body
    assert body["error"].startswith("unknown sampling_params key 'bogus'")
    body = client.post("/runsync", json={"input": {"openai_route": "/v1/nope"}}).json()
    assert body["status"] == "FAILED" and json.loads(body["error"])["code"] == "unknown_url"
    assert client.post("/runsync", json={"prompt": "no input key"}).status_code == 400
    assert client.post("/run", content=b"not json").status_code == 400
    r = client.get("/status/does-not-exist")
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_run_then_stream_is_incremental_then_status(client):
    job = {"prompt": "Hello", "stream": True, "sampling_params": {"max_tokens": 40, "ignore_eos": True}}
    r = client.post("/run", json={"input": job})
    assert r.json()["status"] == "IN_QUEUE"
    job_id = r.json()["id"]
    polls, seen = 0, []
    while True:
        body = client.post(f"/stream/{job_id}").json()
        polls += 1
        assert body["id"] == job_id and body["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        seen.extend(item["output"] for item in body["stream"])
        if body["status"] == "COMPLETED":
            break
    assert polls > 1  # it streamed while running
    assert [out["usage"]["output"] for out in seen] == [1, 4, 13, 40]  # each batch exactly once
    assert client.get(f"/stream/{job_id}").json() == {"id": job_id, "status": "COMPLETED", "stream": []}
    status = client.get(f"/status/{job_id}").json()
    assert status["status"] == "COMPLETED" and status["output"] == seen


def test_cancel_stops_the_job_and_frees_kv_blocks(client, engine):
    before = free_blocks(engine)
    job = {"prompt": "Hello", "stream": True, "sampling_params": {"max_tokens": 900, "ignore_eos": True}}
    job_id = client.post("/run", json={"input": job}).json()["id"]
    body = client.get(f"/stream/{job_id}").json()  # long-polls until the first batch
    assert body["status"] == "IN_PROGRESS" and body["stream"]
    assert free_blocks(engine) < before
    assert client.post(f"/cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert free_blocks(engine) == before
    assert client.get(f"/status/{job_id}").json()["status"] == "CANCELLED"


def test_jobs_beyond_max_concurrency_wait_in_queue(client, engine):
    long_job = {"prompt": "Hello", "stream": True, "sampling_params": {"max_tokens": 900, "ignore_eos": True}}
    ids = [client.post("/run", json={"input": long_job}).json()["id"] for _ in range(3)]
    statuses = [wait_for_status(client, i, ("IN_PROGRESS",))["status"] for i in ids[:2]]
    assert statuses == ["IN_PROGRESS", "IN_PROGRESS"]
    assert client.get(f"/status/{ids[2]}").json()["status"] == "IN_QUEUE"
    client.post(f"/cancel/{ids[0]}")
    assert wait_for_status(client, ids[2], ("IN_PROGRESS",))["status"] == "IN_PROGRESS"
    for i in ids:
        client.post(f"/cancel/{i}")
    assert not engine.engine.has_unfinished_requests()


def test_webhook_gets_the_final_status(client):
    base = str(client.base_url)
    job_id = client.post("/run", json={"input": {"prompt": "Hi", "sampling_params": {"max_tokens": 2}},
                                       "webhook": base + "/hook"}).json()["id"]
    assert wait_for_status(client, job_id, ("COMPLETED",))["status"] == "COMPLETED"
    deadline = time.monotonic() + 10
    while not client.app.state.webhooks and time.monotonic() < deadline:
        time.sleep(0.02)
    hook, = client.app.state.webhooks
    assert hook["id"] == job_id and hook["status"] == "COMPLETED" and hook["output"][0]["usage"]["output"] <= 2


def test_route_jobs_through_the_emulation(client):
    r = client.post("/runsync", json={"input": {"route": "/v1/completions", "body": {
        "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "stream": True}}})
    outs = r.json()["output"]
    assert r.json()["status"] == "COMPLETED" and "".join(outs).endswith("data: [DONE]\n\n")
    events = [json.loads(e[6:]) for o in outs for e in o.split("\n\n") if e.startswith("data: {")]
    assert sum(len(e["choices"][0]["text"]) > 0 or e["choices"][0]["finish_reason"] is not None
               for e in events) >= 1
    r = client.post("/runsync", json={"input": {"route": "/v1/models", "prompt": "x"}})
    assert r.json()["status"] == "FAILED" and "mixes native and route keys" in r.json()["error"]
    r = client.post("/runsync", json={"input": {"route": "/v1/chat/completions", "method": "GET"}})
    assert r.json()["status"] == "FAILED" and "GET is not allowed on /v1/chat/completions" in r.json()["error"]
    r = client.post("/runsync", json={"input": {"route": "/v1/models"}})
    assert r.json()["status"] == "COMPLETED" and r.json()["output"][0]["object"] == "list"
