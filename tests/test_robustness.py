"""One bad request never hurts another: edge validation, per-request failure inside a shared step,
malformed input as clear 400s / FAILED jobs, and the RunPod emulation's concurrency limit."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from conftest import finished_outputs
from minivllm import SamplingParams
from minivllm.openai import OpenAIServing
from minivllm.sampling_params import RequestOutputKind
from minivllm.server.app import create_app
from minivllm.worker import WorkerConfig, make_handler

from conftest import serve_in_thread

MODEL = "tiny-robust"
CONCURRENCY = 2


class ConcurrencyProbe:
    """Wraps the job handler to record how many jobs ran at once."""

    def __init__(self, handler):
        self.handler, self.running, self.peak = handler, 0, 0

    async def __call__(self, job):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            async for output in self.handler(job):
                yield output
        finally:
            self.running -= 1


@pytest.fixture(scope="module")
def server(engine):
    serving = OpenAIServing(engine, MODEL, max_model_len=engine.engine.max_model_len)
    probe = ConcurrencyProbe(make_handler(engine, serving, WorkerConfig(stream_flush_ms=0)))
    app = create_app(engine, serving, runpod_handler=probe, runpod_max_concurrency=CONCURRENCY)
    with serve_in_thread(app) as url:
        while httpx.get(url + "/ready").status_code != 200:
            time.sleep(0.05)
        yield url, probe


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


def free_blocks(engine) -> int:
    return engine.engine.block_manager.num_free_blocks


def is_openai_error(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error["message"]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

OUT_OF_RANGE = [
    ({"top_k": 2**63}, "top_k", "less than or equal to 9223372036854775807"),
    ({"seed": 2**64}, "seed", "less than or equal to 9223372036854775807"),
    ({"seed": -(2**63) - 1}, "seed", "greater than or equal to -9223372036854775808"),
    ({"min_tokens": 2**70}, "min_tokens", "less than or equal to"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids", "less than or equal to"),
    ({"stop_token_ids": [300000]}, "stop_token_ids", "token id 300000 is out of vocabulary"),
    ({"n": 10**30}, "n", "limit of 128 (set by MAX_N)"),
]


@pytest.mark.parametrize("route,base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
@pytest.mark.parametrize("extra,param,bound", OUT_OF_RANGE)
def test_out_of_range_values_are_400s_naming_the_bound(http, route, base, extra, param, bound):
    message = is_openai_error(http.post(route, json={**base, **extra}))
    assert param in message and bound in message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400s(http, literal):
    body = json.dumps(CHAT)[:-1] + f', "temperature": {literal}}}'
    assert "temperature" in is_openai_error(http.post("/v1/chat/completions", content=body))


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", '{"prompt": "a\\udfff b", "max_tokens": 2, "echo": true}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stop": "\\udc00"}'),
    ("/v1/responses", '{"input": "hi", "instructions": "\\ud83d", "max_output_tokens": 2}'),
])
def test_lone_surrogates_are_400s_naming_the_field(http, route, body):
    assert "unpaired surrogate" in is_openai_error(http.post(route, content=body))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
def test_deeply_nested_json_is_a_400(http, route):
    body = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert "nested too deeply" in is_openai_error(http.post(route, content=body))


def test_runpod_jobs_with_bad_input_fail_with_a_message(http):
    jobs = [
        ({"prompt": "hi", "sampling_params": {"top_k": 2**63}}, "top_k"),
        ({"prompt": "hi", "sampling_params": {"seed": 2**64}}, "seed"),
        ({"prompt": "\ud800"}, "unpaired surrogate"),
        ({"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "seed": 2**64}}, "seed"),
    ]
    for job_input, expected in jobs:
        body = json.dumps({"input": job_input})  # json escapes the surrogate as \ud800
        r = http.post("/runsync", content=body)
        assert r.status_code == 200 and r.json()["status"] == "FAILED", r.text
        assert expected in r.json()["error"]
    deep = '{"input": {"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    r = http.post("/runsync", content=deep)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]


def test_fastapi_query_errors_use_the_routes_error_shape(http):
    r = http.post("/runsync?wait=abc", json={"input": {"prompt": "hi"}})
    assert r.status_code == 400 and "wait" in r.json()["error"]


def test_runpod_emulation_honours_max_concurrency(server, http):
    url, probe = server
    probe.peak = 0
    job = {"input": {"prompt": "hi", "sampling_params": {"max_tokens": 40, "ignore_eos": True}}}
    ids = [http.post("/run", json=job).json()["id"] for _ in range(8)]
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = [http.get(f"/status/{i}").json()["status"] for i in ids]
        seen.update(statuses)
        if all(s == "COMPLETED" for s in statuses):
            break
        time.sleep(0.01)
    assert statuses == ["COMPLETED"] * len(ids)
    assert "IN_QUEUE" in seen and probe.peak == CONCURRENCY  # the rest waited their turn


# ---- one failing request inside a shared engine step -----------------------------------------

def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          output_kind=RequestOutputKind.FINAL_ONLY)


async def _collect(engine, prompt, params, request_id):
    final = None
    async for out in engine.generate(prompt, params, request_id):
        final = out
    return final.outputs[0].token_ids


def _run_neighbours_with(engine, poisoned_params, poisoned_id: str):
    """8 greedy streams plus one poisoned request, all in the same steps; returns (results, error)."""
    prompts = [f"story number {i} begins" for i in range(8)]

    async def main():
        tasks = [asyncio.create_task(_collect(engine, p, greedy(24), f"ok-{i}-{poisoned_id}"))
                 for i, p in enumerate(prompts)]
        bad = asyncio.create_task(_collect(engine, "poison", poisoned_params, poisoned_id))
        results = await asyncio.gather(*tasks)
        with pytest.raises(RuntimeError) as failure:
            await bad
        return results, str(failure.value)

    async def alone():
        return [await _collect(engine, p, greedy(24), f"solo-{i}-{poisoned_id}") for i, p in enumerate(prompts)]

    expected = asyncio.run(alone())
    results, error = asyncio.run(main())
    assert results == expected  # the neighbours ran to the end, with the tokens they get alone
    return error


def test_a_request_that_fails_in_the_sampler_fails_alone(engine):
    before = free_blocks(engine)
    params = SamplingParams(temperature=1.0, max_tokens=24)
    params.temperature = "hot"  # past every check: the sampler's batched call raises on it
    error = _run_neighbours_with(engine, params, "poison-sampler")
    assert "request failed" in error
    assert free_blocks(engine) == before and not engine.engine.has_unfinished_requests()


def test_a_request_that_fails_in_the_model_fails_alone(engine, monkeypatch):
    runner = engine.engine.runner
    execute = runner.execute

    def failing_execute(batch, prompt_rows=None):
        if any(seq.request.request_id == "poison-model" for seq, _ in batch):
            raise RuntimeError("simulated kernel failure")
        return execute(batch, prompt_rows)

    monkeypatch.setattr(runner, "execute", failing_execute)
    before = free_blocks(engine)
    error = _run_neighbours_with(engine, greedy(24), "poison-model")
    assert "simulated kernel failure" in error
    assert free_blocks(engine) == before and not engine.engine.has_unfinished_requests()


def test_eight_streams_survive_every_kind_of_poisoned_request(server, engine):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    poisons = [
        ("/v1/completions", json.dumps({**COMPLETION, "top_k": 2**63})),
        ("/v1/completions", json.dumps({**COMPLETION, "seed": 2**64})),
        ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'),
        ("/v1/chat/completions", '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        ("/v1/completions", json.dumps({**COMPLETION, "prompt": [1, 2, 10**9]})),
        ("/v1/completions", json.dumps({**COMPLETION, "stop_token_ids": [10**9]})),
        ("/v1/chat/completions", "{not json"),
        ("/runsync", json.dumps({"input": {"prompt": "hi", "sampling_params": {"top_k": 2**63}}})),
    ]
    results: dict[int, str] = {}

    def stream(i: int) -> None:
        chunks = client.completions.create(model=MODEL, prompt=f"tale {i}", max_tokens=30, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        for chunk in chunks:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        results[i] = finish

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=url, timeout=60) as http:
        for route, body in poisons:
            r = http.post(route, content=body)
            assert r.status_code < 500, r.text
    for t in threads:
        t.join(120)
    assert results == {i: "length" for i in range(8)}


def test_a_failed_request_never_leaves_a_neighbour_reading_unwritten_kv():
    """P fails in the model; B has the same prompt and was admitted in the same step, attaching the
    prefix blocks P was to write: B must be recomputed, not run on K/V nobody wrote."""
    from minivllm.config import EngineArgs
    from minivllm.engine.llm_engine import LLMEngine

    prompt = {"prompt_token_ids": [(i * 37) % 1000 + 5 for i in range(200)]}

    def run(engine) -> dict:
        return {rid: out.outputs[0].token_ids for rid, out in finished_outputs(engine).items()}

    alone = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=1024))
    alone.add_request("B", prompt, greedy(16))
    expected = run(alone)["B"]

    engine = LLMEngine(EngineArgs(model=None, num_kv_blocks=256, max_model_len=1024))
    execute = engine.runner.execute

    def failing_execute(batch, prompt_rows=None):
        if any(seq.request.request_id == "P" for seq, _ in batch):
            raise RuntimeError("simulated kernel failure")
        return execute(batch, prompt_rows)

    engine.runner.execute = failing_execute
    engine.add_request("P", prompt, greedy(16))
    engine.add_request("B", prompt, greedy(16))
    got = run(engine)
    assert [rid for rid, _ in engine.take_failed()] == ["P"]
    assert got["B"] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


class PanicLike(BaseException):
    """What a Rust panic raises (pyo3's PanicException is not an Exception)."""


def test_a_base_exception_in_a_step_fails_its_requests_not_the_engine(engine, monkeypatch):
    step = engine.engine.step

    def panicking_step():
        monkeypatch.setattr(engine.engine, "step", step)  # once
        raise PanicLike("rust panic")

    monkeypatch.setattr(engine.engine, "step", panicking_step)
    with pytest.raises(RuntimeError, match="rust panic"):
        asyncio.run(_collect(engine, "boom", greedy(4), "panic-1"))
    assert engine.is_running
    assert len(asyncio.run(_collect(engine, "after", greedy(4), "panic-2"))) == 4


def test_shutdown_while_a_prompt_is_tokenized_fails_the_request_at_once():
    from minivllm import AsyncEngine, EngineArgs
    from minivllm.engine.async_engine import EngineDeadError

    engine = AsyncEngine.from_engine_args(EngineArgs(model=None, num_kv_blocks=64, max_model_len=256))
    make_request = engine.engine.make_request

    def make_then_shut_down(*args):
        request = make_request(*args)
        engine.shutdown()  # the engine stops while the caller awaits this thread
        return request

    engine.engine.make_request = make_then_shut_down

    async def main():
        await asyncio.wait_for(_collect(engine, "late", greedy(2), "late-1"), 10)

    with pytest.raises(EngineDeadError):
        asyncio.run(main())


def test_a_runpod_cancel_landing_with_an_output_is_never_lost(monkeypatch):
    """The cancel and the job's next output arrive in the same loop pass: the job must still stop."""
    import minivllm.worker.handler_core as handler_core
    from minivllm.worker import WorkerConfig

    state = {"task": None, "produced": 0, "closed": False}

    class Native:
        def __init__(self, *args):
            pass

        async def generate(self, job, request_id):
            loop = asyncio.get_running_loop()
            try:
                for i in range(5):
                    await asyncio.sleep(0.02)
                    if i == 1:
                        loop.call_soon(state["task"].cancel)
                    state["produced"] += 1
                    yield {"i": i}
            finally:
                state["closed"] = True

    monkeypatch.setattr(handler_core, "NativeEngine", Native)
    handler = handler_core.make_handler(None, None, WorkerConfig())

    async def main():
        got = []

        async def run():
            async for out in handler({"id": "j", "input": {"prompt": "hi"}}):
                got.append(out)

        state["task"] = task = asyncio.create_task(run())
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert len(asyncio.run(main())) < 5 and state["closed"]


def test_a_request_failing_alone_in_its_step_leaves_the_waiting_ones_alone(engine, monkeypatch):
    """A long prefill alone in a step fails: only it fails; requests queued behind it still run."""
    execute = engine.engine.runner.execute

    def failing_execute(batch, prompt_rows=None):
        if any(seq.request.request_id == "alone-poison" for seq, _ in batch):
            raise RuntimeError("simulated kernel failure")
        return execute(batch, prompt_rows)

    monkeypatch.setattr(engine.engine.runner, "execute", failing_execute)

    async def main():
        poison = asyncio.create_task(_collect(engine, "x " * 300, greedy(4), "alone-poison"))
        await asyncio.sleep(0)
        others = [asyncio.create_task(_collect(engine, f"next {i}", greedy(4), f"alone-{i}")) for i in range(3)]
        with pytest.raises(RuntimeError, match="simulated kernel failure"):
            await poison
        return await asyncio.gather(*others)

    assert [len(tokens) for tokens in asyncio.run(main())] == [4, 4, 4]
