"""The Responses API's state over a real server on 127.0.0.1, driven by the real `openai` SDK: the
response store (GET /v1/responses/{id}), previous_response_id, background runs and cancel, the
stream's event order, and function calls round-tripping into the next prompt.

The tiny model is random, so its outputs are gibberish: most tests check shapes, statuses and ids;
where the output must be real harmony (reasoning, an answer, a tool call), `server.script` replaces
the engine's output with fixed tokens for the next request. `server.prompts` records every prompt.
"""

import asyncio
import contextlib
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import serve_in_thread
from openai.lib.streaming.responses._responses import ResponseStreamState
from test_openai_serving import reasoning_then_answer, reasoning_then_call, say

from minivllm.openai import OpenAIError, OpenAIServing
from minivllm.openai.response_store import ResponseStore, StoredResponse
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.server.app import create_app

MODEL = "tiny-test"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
GET_WEATHER = {"type": "function", "name": "get_weather"}
LONG = {"max_output_tokens": 900, "extra_body": {"min_tokens": 900}}  # runs for seconds unless cancelled


@contextlib.contextmanager
def recording_server(engine, **serving_kwargs):
    """A real server whose chat path records every prompt (`state.prompts`) and, while
    `state.script` holds token lists, answers with them instead of the random model."""
    serving = OpenAIServing(engine, MODEL, max_model_len=engine.engine.max_model_len, **serving_kwargs)
    state = SimpleNamespace(engine=engine, serving=serving, prompts=[], script=[])
    generate = serving.chat.generate

    def recording(prompt_ids, params, request_id):
        state.prompts.append(prompt_ids)
        if state.script:
            return _scripted(state.script.pop(0), prompt_ids, params, request_id)
        return generate(prompt_ids, params, request_id)

    serving.chat.generate = recording
    with serve_in_thread(create_app(engine, serving)) as url:
        state.url = url
        yield state


@pytest.fixture(scope="module")
def server(engine):
    with recording_server(engine, max_stored_responses=100) as state:
        yield state


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def _scripted(tokens, prompt_ids, params, request_id):
    """The engine's DELTA stream, one fixed token per step; <|return|> / <|call|> stop it. An
    exception instead of tokens: the engine fails the request after one step."""
    if isinstance(tokens, Exception):
        yield RequestOutput(request_id, None, prompt_ids, [CompletionOutput(0, "", [13])], False)
        raise tokens
    for i, token in enumerate(tokens[:params.max_tokens]):
        stop = token in params.stop_token_ids
        reason = "stop" if stop else "length" if i + 1 == params.max_tokens else None
        out = CompletionOutput(0, "", [token], finish_reason=reason, stop_reason=token if stop else None)
        yield RequestOutput(request_id, None, prompt_ids, [out], reason is not None)
        await asyncio.sleep(0)
        if reason:
            return


def prompt_text(server, index=-1) -> str:
    return server.engine.tokenizer.decode(server.prompts[index], False)


def wait_idle(engine, timeout=10.0) -> bool:
    """True once the engine holds no request and every KV block is free again."""
    llm = engine.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not llm.requests and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks:
            return True
        time.sleep(0.02)
    return False


def wait_status(client, response_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (resp := client.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, f"{response_id} stayed {resp.status}"
        time.sleep(0.02)
    return resp


def check_events(events) -> None:
    """Sequence numbers, created/in_progress first, every item and part opened then closed in
    order, deltas only inside their open item, and one final response event naming its status."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    final = events[-1]
    assert final.type == f"response.{final.response.status}"
    assert final.response.status in ("completed", "incomplete")
    added, open_items, open_parts = [], {}, set()
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert e.output_index == len(added) and not open_items, "items open one at a time, in order"
            added.append(e.item.id)
            open_items[e.output_index] = e.item.id
            continue
        assert open_items.get(e.output_index) in (getattr(e, "item_id", None), getattr(e, "item", None)
                                                  and e.item.id), e.type
        part = (e.output_index, getattr(e, "content_index", None))
        if e.type == "response.content_part.added":
            assert part not in open_parts
            open_parts.add(part)
        elif e.type == "response.content_part.done":
            open_parts.remove(part)
        elif e.type == "response.output_item.done":
            assert not any(i == e.output_index for i, _ in open_parts), "parts close before their item"
            del open_items[e.output_index]
        elif e.type.startswith(("response.output_text.", "response.reasoning_text.")):
            assert part in open_parts, e.type
        else:
            assert e.type.startswith("response.function_call_arguments."), e.type
    assert not open_items and not open_parts
    assert [o.id for o in final.response.output] == added
    state = ResponseStreamState(input_tools=TOOLS, text_format=openai.omit)  # the SDK's own accumulator
    for event in events:
        state.handle_event(event)


def test_store_and_retrieve(server, client):
    resp = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert resp.store is True and resp.background is False
    got = client.responses.retrieve(resp.id)
    assert got.model_dump() == resp.model_dump()

    gone = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert gone.store is False
    for unknown in (gone.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.retrieve(unknown)
        assert e.value.body == {"message": f"Response with id '{unknown}' not found.",
                                "type": "invalid_request_error", "param": None, "code": None}
    raw = httpx.get(f"{server.url}/v1/responses/resp_unknown")
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_store_is_bounded(server, client):
    store = ResponseStore(max_responses=2, max_bytes=1000)
    for i in range(3):
        store.put(StoredResponse({"id": f"r{i}", "status": "completed"}))
    assert [store.get(f"r{i}") is not None for i in range(3)] == [False, True, True]
    store.put(StoredResponse({"id": "big", "status": "completed", "text": "x" * 950}))
    assert store.get("r1") is None and store.get("r2") is None and store.get("big") is not None
    assert store.nbytes == store.get("big").nbytes and len(store) == 1

    bound = server.serving.responses.store
    assert bound.max_responses == 100  # the OpenAIServing argument
    old = bound.max_responses
    bound.max_responses = len(bound) + 1
    try:
        first = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
        second = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
        assert client.responses.retrieve(second.id).id == second.id
        client.responses.retrieve(first.id)  # the newest two are kept ...
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):  # ... the oldest goes first
            client.responses.retrieve(first.id)
    finally:
        bound.max_responses = old


def test_delete(server, client):
    resp = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    client.responses.delete(resp.id)  # DELETE /v1/responses/{id}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):  # deleted once only
        client.responses.delete(resp.id)


def test_previous_response_id_continues_the_conversation(server, client):
    enc = server.engine.tokenizer.harmony
    server.script.append(reasoning_then_answer(enc))
    first = client.responses.create(model=MODEL, input="Weather in Paris?", instructions="Be brief.")
    assert [o.type for o in first.output] == ["reasoning", "message"] and first.output_text == "It is sunny."
    assert "Be brief." in prompt_text(server)

    second = client.responses.create(model=MODEL, input="And tomorrow?", previous_response_id=first.id,
                                     max_output_tokens=3)
    assert second.previous_response_id == first.id
    text = prompt_text(server)
    assert text.index("<|start|>user<|message|>Weather in Paris?<|end|>") < text.index(
        "<|start|>assistant<|channel|>final<|message|>It is sunny.<|end|>") < text.index(
        "<|start|>user<|message|>And tomorrow?<|end|><|start|>assistant")
    assert "Be brief." not in text  # instructions are not carried over (OpenAI's rule)
    assert second.usage.input_tokens == len(server.prompts[-1])

    # the same conversation sent as input items renders the same prompt
    client.responses.create(model=MODEL, max_output_tokens=1, input=[
        {"role": "user", "content": "Weather in Paris?"}, *[o.model_dump() for o in first.output],
        {"role": "user", "content": "And tomorrow?"}])
    assert server.prompts[-1] == server.prompts[-2]

    # a chain: the third turn sees the first two (the random model's output included)
    third = client.responses.create(model=MODEL, input="Thanks", previous_response_id=second.id, max_output_tokens=1)
    assert third.usage.input_tokens > second.usage.input_tokens
    assert prompt_text(server).count("<|start|>user<|message|>") == 3

    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_missing")
    assert e.value.body["code"] == "previous_response_not_found"
    assert e.value.body["param"] == "previous_response_id"
    assert e.value.body["message"] == "Previous response with id 'resp_missing' not found."


def test_function_calls_round_trip(server, client):
    enc = server.engine.tokenizer.harmony
    server.script.append(reasoning_then_call(enc))
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS)
    assert first.status == "completed" and [o.type for o in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}'
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}

    client.responses.create(model=MODEL, tools=TOOLS, previous_response_id=first.id, input=[result],
                            max_output_tokens=2)
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
            '{"sky": "sunny"}<|end|><|start|>assistant') in prompt_text(server)
    # stateless: the same items sent back by the client (as OpenAI's SDK examples do)
    client.responses.create(model=MODEL, tools=TOOLS, max_output_tokens=2, input=[
        {"role": "user", "content": "Weather in Paris?"}, *[o.model_dump() for o in first.output], result])
    assert server.prompts[-1] == server.prompts[-2]

    # the real model, forced to call (tool_choice), cut off mid-arguments: still renders back
    forced = client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, tool_choice=GET_WEATHER,
                                     max_output_tokens=6)
    assert forced.output[0].type == "function_call" and forced.output[0].name == "get_weather"
    client.responses.create(model=MODEL, tools=TOOLS, previous_response_id=forced.id, max_output_tokens=1, input=[
        {"type": "function_call_output", "call_id": forced.output[0].call_id, "output": "42"}])
    assert (f"<|message|>{forced.output[0].arguments}<|call|><|start|>functions.get_weather to=assistant"
            f"<|channel|>commentary<|message|>42<|end|>") in prompt_text(server)


def test_background(server, client):
    resp = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, background=True)
    assert resp.status == "queued" and resp.background is True and resp.output == []
    done = wait_status(client, resp.id, ("completed", "incomplete"))
    assert done.usage.output_tokens <= 4 and done.usage.input_tokens == len(server.prompts[-1])

    with pytest.raises(openai.BadRequestError, match="background mode needs store: true") as e:
        client.responses.create(model=MODEL, input="Hi", background=True, store=False)
    assert e.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        client.responses.cancel(client.responses.create(model=MODEL, input="Hi", max_output_tokens=1).id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    assert client.responses.cancel(resp.id).status == done.status  # an ended one: as it is

    server.script.append(OpenAIError("engine step failed: boom", 500))
    failed = wait_status(client, client.responses.create(model=MODEL, input="Hi", background=True).id,
                         ("failed",))
    assert failed.error.code == "server_error" and failed.error.message == "engine step failed: boom"


def test_cancel_background_frees_the_engine(server, client):
    resp = client.responses.create(model=MODEL, input="Write a long story", background=True, **LONG)
    wait_status(client, resp.id, ("in_progress",))
    with pytest.raises(openai.BadRequestError, match="still in progress"):
        client.responses.create(model=MODEL, input="more", previous_response_id=resp.id)
    cancelled = client.responses.cancel(resp.id)
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 900
    llm = server.engine.engine
    assert not llm.requests and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert client.responses.retrieve(resp.id).status == "cancelled"
    assert client.responses.cancel(resp.id).status == "cancelled"  # idempotent

    # a background run outlives its creator's stream: closing the stream does not stop it
    stream = client.responses.create(model=MODEL, input="Hi", background=True, stream=True, **LONG)
    first = next(iter(stream))
    stream.close()
    assert first.type == "response.created"
    assert wait_status(client, first.response.id, ("in_progress",)).status == "in_progress"
    assert client.responses.cancel(first.response.id).status == "cancelled"
    assert wait_idle(server.engine)


def test_stream_event_order(server, client):
    enc = server.engine.tokenizer.harmony
    server.script.append(reasoning_then_answer(enc))
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", stream=True))
    check_events(events)
    assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning", "message"]
    assert events[-1].response.output_text == "It is sunny."
    assert client.responses.retrieve(events[-1].response.id).model_dump() == events[-1].response.model_dump()

    server.script.append(reasoning_then_call(enc))
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS, stream=True))
    check_events(events)
    assert [o.type for o in events[-1].response.output] == ["reasoning", "function_call"]

    # cut off by max_output_tokens inside the answer: the open part and item still close
    n_reasoning = len(say(enc, "User asks weather.", "analysis", first=True))
    server.script.append(reasoning_then_answer(enc))
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", stream=True,
                                          max_output_tokens=n_reasoning + 6))
    check_events(events)
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[-1].status == "incomplete"

    # the real model: a forced call cut mid-arguments, and a plain answer (often no items at all)
    events = list(client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, tool_choice=GET_WEATHER,
                                          max_output_tokens=5, stream=True))
    check_events(events)
    assert events[-1].response.output[0].type == "function_call"
    check_events(list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=5, stream=True)))

    # background + stream: the same events, and the stored response is the final one
    server.script.append(reasoning_then_answer(enc))
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", stream=True, background=True))
    check_events(events)
    stored = client.responses.retrieve(events[-1].response.id)
    assert stored.status == "completed" and stored.output_text == "It is sunny." and stored.background is True
