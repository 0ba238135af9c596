"""src/handler.py under runpod's own SDK: its local API server (--rp_serve_api) and our
--test_input runner, as subprocesses on the embedded tiny model (no network needed)."""

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until_up

pytest.importorskip("runpod")

REPO = Path(__file__).resolve().parents[1]
HANDLER = str(REPO / "src" / "handler.py")


def worker_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(NUM_KV_BLOCKS="256", MAX_MODEL_LEN="1024", STREAM_FLUSH_MS="0",
               LOCAL_MODEL_ARGS_PATH="/nonexistent/local_model_args.json", **extra)
    return env


@pytest.fixture(scope="module")
def rp_api():
    port = free_port()
    proc = subprocess.Popen([sys.executable, HANDLER, "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                             "--rp_api_port", str(port)], env=worker_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, base + "/", timeout=90)
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def runsync(client, job_input: dict) -> list:
    body = client.post("/runsync", json={"input": job_input}).json()
    assert body["status"] == "COMPLETED", body
    return body["output"]


def test_rp_serve_api_native_non_stream(rp_api):
    out, = runsync(rp_api, {"prompt": "The capital of France is", "sampling_params": {"max_tokens": 6, "ignore_eos": True}})
    assert out["usage"]["output"] == 6 and len(out["choices"][0]["tokens"]) == 1


def test_rp_serve_api_native_stream_batches_grow(rp_api):
    outs = runsync(rp_api, {"prompt": "Hello", "stream": True, "sampling_params": {"max_tokens": 40, "ignore_eos": True}})
    assert [out["usage"]["output"] for out in outs] == [1, 4, 13, 40]  # batches of 1, 3, 9, 27 (cut at 40)


def test_rp_serve_api_openai_chat_and_models(rp_api):
    models, = runsync(rp_api, {"openai_route": "/v1/models"})
    assert models["data"][0]["id"] == "tiny-gpt-oss"
    body = {"model": "tiny-gpt-oss", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    out, = runsync(rp_api, {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] == 6
    outs = runsync(rp_api, {"openai_route": "/v1/chat/completions",
                            "openai_input": {**body, "stream": True, "stream_options": {"include_usage": True}}})
    assert all(isinstance(o, str) for o in outs) and outs[-1].endswith("data: [DONE]\n\n")
    events = [e[len("data: "):] for o in outs for e in o.split("\n\n") if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 6


def test_rp_serve_api_route_jobs_as_worker_vllm_v2_24_sends_them(rp_api):
    models, = runsync(rp_api, {"route": "/v1/models"})  # no body: GET
    assert models["data"][0]["id"] == "tiny-gpt-oss"
    body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}  # no model: the served one
    out, = runsync(rp_api, {"route": "/v1/completions", "body": body})
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 5
    outs = runsync(rp_api, {"route": "/v1/chat/completions", "method": "POST",
                            "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}})
    assert all(isinstance(o, str) for o in outs) and outs[-1].endswith("data: [DONE]\n\n")
    # runpod's local server reports a generator's error output as output (the platform fails the job)
    wrong_method = rp_api.post("/runsync", json={"input": {"route": "/v1/completions", "method": "GET"}}).json()
    assert "GET is not allowed on /v1/completions: use POST" in json.dumps(wrong_method), wrong_method
    unknown = rp_api.post("/runsync", json={"input": {"route": "/v1/nope", "body": {}}}).json()
    assert "Unknown route '/v1/nope'" in json.dumps(unknown), unknown


def test_test_input_runs_the_job_and_prints_every_batch():
    job = {"input": {"prompt": "Hello", "stream": True, "sampling_params": {"max_tokens": 4, "ignore_eos": True}}}
    proc = subprocess.run([sys.executable, HANDLER, "--test_input", json.dumps(job)], env=worker_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    batches = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [b["usage"]["output"] for b in batches] == [1, 4]



def test_test_input_exit_status_follows_the_job():
    from minivllm.worker import WorkerConfig, make_handler, run_test_job

    class NoEngine:  # a malformed job never reaches the engine
        is_running = False

    handler = make_handler(NoEngine(), None, WorkerConfig())
    out = io.StringIO()
    ok = asyncio.run(run_test_job(handler, {"input": {"prompt": "Hello", "sampling_params": {"max_tokens": "four"}}}, out))
    assert not ok  # handler.py exits 1
    assert json.loads(out.getvalue()) == {"error": 'sampling_params.max_tokens must be an integer, got "four"'}


def test_runpod_job_scaler_aggregates_fails_and_stops_jobs(monkeypatch):
    """runpod's production loop (JobScaler + handle_job) with only its HTTP calls replaced:
    outputs aggregate, an error output fails the job with a JSON error, a stop signal cancels
    the job's task and the engine request is aborted."""
    from runpod.serverless.modules import rp_job, rp_scale

    from minivllm import AsyncEngine, EngineArgs
    from minivllm.openai import OpenAIServing
    from minivllm.worker import WorkerConfig, make_concurrency_modifier, make_handler

    engine = AsyncEngine.from_engine_args(EngineArgs(model=None, num_kv_blocks=256, max_model_len=1024))
    start_free = engine.engine.block_manager.num_free_blocks
    config = WorkerConfig(stream_flush_ms=0)
    handler = make_handler(engine, OpenAIServing(engine, "tiny-gpt-oss", max_model_len=1024), config)
    streamed, results = [], {}

    async def stream_result(session, job_data, job):
        streamed.append((job["id"], job_data))

    async def send_result(session, job_data, job, is_stream=False):
        results[job["id"]] = job_data

    monkeypatch.setattr(rp_job, "stream_result", stream_result)
    monkeypatch.setattr(rp_job, "send_result", send_result)
    queue = [
        {"id": "ok", "input": {"prompt": "Hi", "stream": True, "sampling_params": {"max_tokens": 4, "ignore_eos": True}}},
        {"id": "bad", "input": {"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "model": "nope"}}},
        {"id": "long", "input": {"prompt": "Hi", "stream": True, "sampling_params": {"max_tokens": 900, "ignore_eos": True}}},
    ]

    async def jobs_fetcher(session, count):
        taken, queue[:] = queue[:count], queue[count:]
        if not taken:
            await asyncio.sleep(0.05)
        return taken

    async def stop_signals_fetcher(session):
        await asyncio.sleep(0.05)
        return ["long"] if any(job_id == "long" for job_id, _ in streamed) else []

    scaler = rp_scale.JobScaler({"handler": handler, "concurrency_modifier": make_concurrency_modifier(config),
                                 "return_aggregate_stream": True, "jobs_fetcher": jobs_fetcher,
                                 "stop_signals_fetcher": stop_signals_fetcher, "jobs_fetcher_timeout": 5})

    async def main():
        run = asyncio.create_task(scaler.run())
        deadline = time.monotonic() + 30
        while not ({"ok", "bad"} <= set(results) and "long" not in scaler.jobs_tasks):
            assert time.monotonic() < deadline, (results, streamed)
            await asyncio.sleep(0.05)
        scaler.kill_worker()
        await asyncio.wait_for(run, 10)

    try:
        asyncio.run(main())
        assert results["ok"] == {"output": [data["output"] for job_id, data in streamed if job_id == "ok"]}
        assert [out["usage"]["output"] for out in results["ok"]["output"]] == [1, 4]
        assert set(results["bad"]) == {"error"}
        assert json.loads(results["bad"]["error"])["code"] == "model_not_found"
        assert "long" not in results  # stopped: runpod sends no result for a cancelled task
        assert engine.engine.block_manager.num_free_blocks == start_free
        assert not engine.engine.has_unfinished_requests()
    finally:
        engine.shutdown()
