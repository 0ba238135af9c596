"""Several models behind one server: the models file, lazy loading, swaps under load, idle unload.

Two tiny checkpoints written with different seeds stand for two models; every request goes over
real HTTP to a uvicorn server running the real engine, and its greedy output is compared with the
same model served alone.
"""

import asyncio
import gc
import json
import subprocess
import time
import weakref

import httpx
import pytest

from conftest import minivllm_command, serve_in_thread

from minivllm.model_manager import ModelManager
from minivllm.model_registry import ModelsFile, ModelsFileError, load_models_file
from minivllm.openai.errors import OpenAIError
from minivllm.openai.serving import OpenAIServing
from minivllm.server.app import create_app

PROMPTS = [[11, 22, 33, 44, 55], [7, 8, 9], [1000, 2000, 3000, 4000]]
MAX_TOKENS = 6
ENGINE = {"num_kv_blocks": 96, "max_model_len": 128, "device": "cpu"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from minivllm.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("two-models")
    return {name: write_tiny_checkpoint(str(root / name), seed=seed) for name, seed in (("alpha", 3), ("beta", 4))}


@pytest.fixture(scope="module")
def expected(checkpoints):
    """Greedy text of each prompt, each model served alone."""
    from minivllm import LLM, SamplingParams

    out = {}
    for name, path in checkpoints.items():
        llm = LLM(path, **ENGINE)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        results = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        out[name] = [r.outputs[0].text for r in results]
        del llm
    assert out["alpha"] != out["beta"]  # else the test could not tell the models apart
    return out


def make_manager(checkpoints, **settings) -> ModelManager:
    models = [{"source": path, "served_name": name, **ENGINE} for name, path in checkpoints.items()]
    models_file = ModelsFile.model_validate({"models": models, "preload": False, **settings})

    def make_serving(engine, name, response_store):
        return OpenAIServing(engine, name, max_model_len=engine.engine.max_model_len, response_store=response_store)

    return ModelManager(models_file, make_serving)


async def complete(client: httpx.AsyncClient, model: str, prompt: int, stream: bool = False) -> str:
    body = {"model": model, "prompt": PROMPTS[prompt], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    return text


def states(client: httpx.Client) -> dict:
    return {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}


def test_alternating_requests_swap_models_and_show_it(checkpoints, expected):
    models = make_manager(checkpoints)
    with serve_in_thread(create_app(models=models)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/ready").status_code == 200  # started idle: ready, the first request loads
        assert states(client) == {"alpha": "unloaded", "beta": "unloaded"}
        card = client.get("/v1/models/beta").json()
        assert card["object"] == "model" and card["owned_by"] == "minivllm" and card["created"] > 0
        assert card["max_model_len"] == 128 and card["quantization"] == "mxfp4"
        missing = client.post("/v1/completions", json={"model": "gamma", "prompt": "hi", "max_tokens": 1})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

        async def alternate():
            async with httpx.AsyncClient(base_url=url, timeout=60) as aclient:
                for i, name in enumerate(["alpha", "beta", "alpha", "beta"]):
                    assert await complete(aclient, name, i % len(PROMPTS)) == expected[name][i % len(PROMPTS)]
                    assert states(client)[name] == "loaded"
                    assert states(client)[{"alpha": "beta", "beta": "alpha"}[name]] == "unloaded"

        asyncio.run(alternate())
        metrics = client.get("/metrics").text
        assert "minivllm:model_swaps_total 3.0" in metrics
        assert 'minivllm:model_state{model_name="beta",state="loaded"} 1.0' in metrics
        assert models.last_swap_seconds > 0


def test_twenty_concurrent_requests_across_a_swap_all_complete(checkpoints, expected):
    models = make_manager(checkpoints)
    with serve_in_thread(create_app(models=models)) as url:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                await complete(client, "alpha", 0)  # alpha loaded: the beta requests below force a swap
                asked = [("alpha" if i % 2 else "beta", i % len(PROMPTS), i % 3 == 0) for i in range(20)]
                health_latency: list[float] = []

                async def poll_health():
                    while True:
                        start = time.monotonic()
                        assert (await client.get("/health")).status_code == 200
                        health_latency.append(time.monotonic() - start)
                        await asyncio.sleep(0.05)

                poller = asyncio.create_task(poll_health())
                texts = await asyncio.gather(*(complete(client, m, p, s) for m, p, s in asked))
                poller.cancel()
                assert texts == [expected[m][p] for m, p, _ in asked]
                return max(health_latency)

        worst_health = asyncio.run(run())
        assert models.num_swaps >= 1
        assert worst_health < 2.0  # loads run in a thread: /health kept answering during the swaps


def test_a_swap_lets_running_requests_finish_then_aborts_past_the_drain_timeout(checkpoints):
    """A stream that the client keeps open past drain_timeout_s is aborted (finish_reason "abort"),
    and the request that wanted the other model is served."""
    models = make_manager(checkpoints, drain_timeout_s=0.5)
    with serve_in_thread(create_app(models=models)) as url:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                long = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                reasons = []
                async with client.stream("POST", "/v1/completions", json=long) as r:
                    lines = r.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: {"):
                            break  # alpha is generating: now ask for beta
                    other = asyncio.create_task(complete(client, "beta", 1))
                    async for line in lines:
                        if line.startswith("data: {"):
                            reasons.append(json.loads(line[6:])["choices"][0]["finish_reason"])
                return reasons, await other

        reasons, other_text = asyncio.run(run())
        assert reasons[-1] == "abort"  # the drain limit cut it, with a finish reason, not a broken stream
        assert other_text and models.models["beta"].state == "loaded"


def test_idle_unload_frees_the_model(checkpoints, expected):
    models = make_manager(checkpoints, idle_unload_s=0.5)
    with serve_in_thread(create_app(models=models)) as url, httpx.Client(base_url=url, timeout=60) as client:
        rss_idle = _rss_mib()
        asyncio.run(_one(url, "alpha"))
        engine = weakref.ref(models.models["alpha"].loaded.engine)
        llm_engine = weakref.ref(engine().engine)  # it holds the weights and the KV cache
        rss_loaded = _rss_mib()
        deadline = time.monotonic() + 10
        while states(client)["alpha"] != "unloaded":
            assert time.monotonic() < deadline, "alpha was never unloaded"
            time.sleep(0.1)
        gc.collect()
        assert engine() is None and llm_engine() is None  # the engine, its weights and KV are gone
        rss_unloaded = _rss_mib()
        print(f"RSS idle {rss_idle:.0f} MiB, loaded {rss_loaded:.0f} MiB, after idle unload {rss_unloaded:.0f} MiB")
        assert rss_unloaded < rss_loaded
        assert asyncio.run(_one(url, "alpha")) == expected["alpha"][0]  # and it loads again on demand


def test_a_model_that_fails_to_load_fails_its_requests_only(checkpoints, expected, tmp_path):
    models = make_manager({"alpha": checkpoints["alpha"], "broken": str(tmp_path / "missing")})
    with serve_in_thread(create_app(models=models)) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        assert "The model `broken` failed to load" in r.json()["error"]["message"]
        assert states(client) == {"alpha": "unloaded", "broken": "unloaded"}
        assert asyncio.run(_one(url, "alpha")) == expected["alpha"][0]


def test_a_runpod_native_job_picks_its_model(checkpoints, expected):
    from minivllm.worker import WorkerConfig, make_handler

    models = make_manager(checkpoints)
    handler = make_handler(None, None, WorkerConfig(stream_flush_ms=0), models=models)

    async def run(job_input):
        return [out async for out in handler({"id": "job", "input": job_input})]

    job = {"prompt": "x", "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}}
    (out,) = asyncio.run(run({**job, "model": "beta"}))
    assert models.models["beta"].state == "loaded" and models.models["alpha"].state == "unloaded"
    assert out["usage"]["output"] == MAX_TOKENS
    (error,) = asyncio.run(run({**job, "model": "gamma"}))
    assert "The model `gamma` does not exist" in error["error"]
    models.shutdown()


def test_bad_models_file_exits_with_one_line_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - served_name: a\n  - served_name: b\n    max_model_len: 0\n")
    result = subprocess.run([*minivllm_command(), "serve", "--models", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == ["minivllm serve: bad.yaml: models[1].max_model_len: Input should be greater than or equal to 1"]


@pytest.mark.parametrize("text,message", [
    ("models: []", "models: List should have at least 1 item"),
    ("models:\n  - source: a/b\n    max_num_seq: 4\n", "models[0].max_num_seq: Extra inputs are not permitted"),
    ("models:\n  - {}\n  - {}\n", "served name 'tiny-gpt-oss' is used twice"),
    ("models: [\n", "not valid YAML"),
    ("- a\n", "must be a mapping with a `models:` list"),
    ("models:\n  - {}\nmax_loaded_models: 0\n", "max_loaded_models: Input should be greater than or equal to 1"),
])
def test_models_file_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ModelsFileError) as e:
        load_models_file(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_models_route_lists_and_retrieves_without_loading():
    models_file = ModelsFile.model_validate({"preload": False, "models": [
        {"source": "openai/gpt-oss-20b", "max_model_len": 4096}, {"served_name": "tiny"}]})
    models = ModelManager(models_file, make_serving=None)
    listed = asyncio.run(models.dispatch("/v1/models", None, "GET"))
    assert [(m["id"], m["root"], m["state"]) for m in listed["data"]] == [
        ("openai/gpt-oss-20b", "openai/gpt-oss-20b", "unloaded"), ("tiny", "tiny", "unloaded")]
    card = asyncio.run(models.dispatch("/openai/v1/models/openai/gpt-oss-20b", None, "GET"))
    assert card["id"] == "openai/gpt-oss-20b" and card["max_model_len"] == 4096
    with pytest.raises(OpenAIError) as e:
        asyncio.run(models.dispatch("/v1/models/nope", None, "GET"))
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


def test_engine_flags_beside_the_file_are_defaults(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - source: /m/a\n    max_model_len: 64\n  - source: /m/b\n")
    models = load_models_file(str(path), {"max_model_len": 256, "device": "cpu"})
    assert [m.max_model_len for m in models.models] == [64, 256]
    assert [m.name for m in models.models] == ["/m/a", "/m/b"] and models.models[1].engine_args().device == "cpu"


async def _one(url: str, model: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await complete(client, model, 0)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
