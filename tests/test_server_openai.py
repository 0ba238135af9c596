"""The HTTP server on 127.0.0.1 with the embedded tiny model, driven by the real `openai` SDK.

The tiny model is random, so outputs are gibberish: these tests check shapes, usage numbers,
finish reasons, errors, health/readiness/metrics and aborts; harmony parsing itself is covered
deterministically by test_openai_harmony.py and test_openai_serving.py.
"""

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from prometheus_client.parser import text_string_to_metric_families

from minivllm.openai import OpenAIServing
from minivllm.server.app import create_app

MODEL = "tiny-test"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(engine):
    serving = OpenAIServing(engine, MODEL, max_model_len=engine.engine.max_model_len)
    app = create_app(engine, serving)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    ready = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and 200 not in ready:
        try:
            ready.append(httpx.get(url + "/ready", timeout=5).status_code)
        except httpx.TransportError:
            time.sleep(0.05)
    assert ready and ready[-1] == 200 and set(ready) <= {200, 503}, ready
    yield SimpleNamespace(url=url, engine=engine, app=app, serving=serving)
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def prompt_len(server, messages=MESSAGES) -> int:
    return len(server.engine.tokenizer.render_chat(messages))


def wait_idle(engine, timeout=10.0) -> bool:
    """True once the engine holds no request and every KV block is free again."""
    llm = engine.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not llm.requests and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks:
            return True
        time.sleep(0.02)
    return False


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_usage_matches_real_token_counts(server, client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                                           temperature=0)
    ChatCompletion.model_validate(raw.http_response.json())
    resp = raw.parse()
    n_prompt = prompt_len(server)
    assert resp.model == MODEL and resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.total_tokens == n_prompt + resp.usage.completion_tokens
    assert resp.choices[0].message.role == "assistant"
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 6
    # the same greedy generation as a completion of the rendered prompt ids: count its tokens
    ids = server.engine.tokenizer.render_chat(MESSAGES)
    comp = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    assert comp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == comp.usage.completion_tokens == len(comp.choices[0].logprobs.tokens)

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens)
    assert usage.prompt_tokens_details.cached_tokens == 48  # prefix cache: 3 full blocks of the same prompt
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == [
        resp.choices[0].finish_reason]
    assert len({c.id for c in chunks}) == 1


def test_chat_n2(server, client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=2, seed=3)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in resp.choices)
    assert resp.usage.prompt_tokens == prompt_len(server)
    assert 2 <= resp.usage.completion_tokens <= 8


def test_completions(server, client):
    tok = server.engine.tokenizer
    one = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    Completion.model_validate(one.model_dump())
    assert one.object == "text_completion" and one.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert len(one.choices) == 1 and one.choices[0].finish_reason in ("length", "stop")

    many = client.completions.create(model=MODEL, prompt=["a b c", "hello"], max_tokens=3, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == len(tok.encode("a b c")) + len(tok.encode("hello"))

    ids = [[9906, 1917], [40, 1093, 3090]]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 5 and len(by_ids.choices) == 2
    again = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=3, temperature=0)
    assert again.choices[0].text == by_ids.choices[0].text  # greedy: same prompt, same text

    echo = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=4, echo=True, logprobs=2,
                                     temperature=0)
    c = echo.choices[0]
    n_prompt = len(tok.encode("Echo me"))
    assert c.text.startswith("Echo me")
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + echo.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing scores the first token
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])  # top-2 plus the actual token
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0

    stream = client.completions.create(model=MODEL, prompt="Stream me", max_tokens=5, logprobs=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    streamed_tokens = sum(len(ch.choices[0].logprobs.tokens) for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == streamed_tokens


def test_responses(server, client):
    resp = client.responses.create(model=MODEL, input="Hi", max_output_tokens=5)
    Response.model_validate(resp.model_dump())
    assert resp.status in ("completed", "incomplete") and resp.id.startswith("resp_")
    assert resp.usage.input_tokens == prompt_len(server, [{"role": "user", "content": "Hi"}])
    if resp.status == "incomplete":
        assert resp.usage.output_tokens == 5 and resp.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=5, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.usage.input_tokens == resp.usage.input_tokens


def test_bad_requests(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert e.value.status_code == 400
    assert e.value.body["message"] == "temperature: Input should be less than or equal to 2"
    with pytest.raises(openai.BadRequestError, match="n: Input should be greater than or equal to 1"):
        client.completions.create(model=MODEL, prompt="x", n=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    n = prompt_len(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2000)
    assert (f"maximum context length is 1024 tokens. However, you requested {n + 2000} tokens "
            f"({n} in the messages, 2000 in the completion)") in e.value.message
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        client.completions.create(model=MODEL, prompt=[1] * 1030, max_tokens=1)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/nope").json()["error"]["message"] == "Invalid URL (GET /nope)"


def test_openai_prefix(server):
    client = openai.OpenAI(base_url=server.url + "/openai/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert resp.usage.prompt_tokens == prompt_len(server)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def wait_busy(engine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not engine.engine.requests:
        time.sleep(0.01)
    return bool(engine.engine.requests)


def metric(server, name, **labels) -> float:
    value = server.app.state.metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})
    return value or 0.0


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "Tell me a long story", "max_tokens": 500}),
    # the random model's chat output never leaves the harmony header: only the role chunk comes
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 500}),
])
def test_stream_disconnect_aborts_and_frees_blocks(server, route, body):
    assert wait_idle(server.engine)
    tokens = metric(server, "minivllm:generation_tokens_total")
    aborts = metric(server, "minivllm:request_success_total", finished_reason="abort")
    with httpx.Client(timeout=30) as http, \
            http.stream("POST", server.url + route, json={"model": MODEL, "stream": True, **body}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        busy = wait_busy(server.engine)
        assert busy, f"the request never ran: {list(lines)[:4]}, engine error: {server.engine.last_error!r}"
    assert wait_idle(server.engine), "the aborted request still holds KV blocks"
    assert metric(server, "minivllm:request_success_total", finished_reason="abort") == aborts + 1
    assert metric(server, "minivllm:generation_tokens_total") - tokens < 500  # stopped early


def test_non_stream_disconnect_aborts(server):
    assert wait_idle(server.engine)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 500}
    aborts = metric(server, "minivllm:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_idle(server.engine)
    assert metric(server, "minivllm:request_success_total", finished_reason="abort") == aborts + 1


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("minivllm:num_requests_running", "minivllm:num_requests_waiting", "minivllm:kv_cache_usage_perc",
                 "minivllm:prompt_tokens", "minivllm:generation_tokens", "minivllm:time_to_first_token_seconds",
                 "minivllm:inter_token_latency_seconds", "minivllm:e2e_request_latency_seconds",
                 "minivllm:request_success", "minivllm:num_preemptions"):
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels.get("le")}
    assert value["minivllm:generation_tokens_total"] >= 3
    assert value["minivllm:time_to_first_token_seconds_count"] >= 1
    assert value["minivllm:num_requests_running"] == 0
    aborted = [s for s in families["minivllm:request_success"].samples if s.labels.get("finished_reason") == "abort"]
    assert aborted and aborted[0].value >= 1  # the disconnect tests


def test_ready_gates_on_warm_up_and_draining(server):
    """/ready is 503 before the warm-up request ran and while draining (in-process app, same engine)."""
    serving = OpenAIServing(server.engine, MODEL, max_model_len=1024)
    app = create_app(server.engine, serving)  # ASGITransport runs no lifespan: no warm-up yet

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/ready")).status_code == 503
            assert (await http.get("/health")).status_code == 200
            await app.state.server.warm_up()
            assert (await http.get("/ready")).status_code == 200
            app.state.server.draining = True
            r = await http.get("/ready")
            assert r.status_code == 503 and r.json() == {"status": "draining"}

    asyncio.run(main())


def test_api_key(server):
    serving = OpenAIServing(server.engine, MODEL, max_model_len=1024)
    app = create_app(server.engine, serving, api_key="sekret")

    async def main():
        transport = httpx.ASGITransport(app=app)
        http = httpx.AsyncClient(transport=transport)
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Invalid or missing API key"):
            await client.models.list()
        http = httpx.AsyncClient(transport=transport)
        good = openai.AsyncOpenAI(base_url="http://t/openai/v1", api_key="sekret", http_client=http, max_retries=0)
        assert [m.id async for m in good.models.list()] == [MODEL]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as plain:
            assert (await plain.get("/health")).status_code == 200
            assert (await plain.get("/metrics")).status_code == 200
            r = await plain.post("/v1/completions", json={"prompt": "x"})  # no Authorization header
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    asyncio.run(main())
