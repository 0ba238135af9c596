"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) over a real server on 127.0.0.1,
driven by the real `anthropic` SDK: text, system prompts, multi-turn, streaming (Anthropic's event
sequence), thinking blocks from the analysis channel, tool_use / tool_result round trips, stop
reasons, count_tokens, and Anthropic-shaped errors.

The tiny model is random: where the output must be real harmony (reasoning, an answer, a tool
call), `server.script` replaces the engine's output with fixed tokens for the next request (the
technique of test_responses_api.py). `server.prompts` records every prompt.
"""

import asyncio
import json

import anthropic
import httpx
import pytest
from test_openai_serving import RETURN, reasoning_then_answer, reasoning_then_call, say
from test_responses_api import prompt_text, recording_server

from minivllm.anthropic import AnthropicError, error_body, is_anthropic_route
from minivllm.openai import OpenAIError

MODEL = "tiny-test"
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0}  # sampling fields by extra_body: recent SDKs dropped them from create()


@pytest.fixture(scope="module")
def server(engine):
    with recording_server(engine) as state:
        yield state


@pytest.fixture(scope="module")
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def enc(engine):
    return engine.tokenizer.harmony


def test_create_text(server, client, enc):
    server.script.append(say(enc, "Hello there.", "final", last=RETURN, first=True))
    msg = client.messages.create(model=MODEL, max_tokens=50, messages=HI)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL and msg.id.startswith("msg_")
    assert [b.model_dump(exclude_none=True) for b in msg.content] == [{"type": "text", "text": "Hello there."}]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == len(server.prompts[-1])
    assert msg.usage.output_tokens == len(say(enc, "Hello there.", "final", last=RETURN, first=True))
    assert prompt_text(server).endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")

    real = client.messages.create(model=MODEL, max_tokens=4, messages=HI,
                                  extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20})
    assert real.stop_reason in ("end_turn", "max_tokens") and 1 <= real.usage.output_tokens <= 4


def test_system_prompt(server, client):
    client.messages.create(model=MODEL, max_tokens=1, messages=HI, system="Be brief.")
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in prompt_text(server)
    client.messages.create(model=MODEL, max_tokens=1, messages=HI,
                           system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}])
    assert "# Instructions\n\nBe brief.\n\nBe kind.<|end|>" in prompt_text(server)


def test_multi_turn(server, client, enc):
    client.messages.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]}])
    assert prompt_text(server).endswith(
        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
        "<|start|>user<|message|>How are you?<|end|><|start|>assistant")
    # a conversation ending with an assistant turn is continued (prefill)
    server.script.append(enc.encode(" 42.", disallowed_special=()) + [RETURN])
    msg = client.messages.create(model=MODEL, max_tokens=10, messages=[
        {"role": "user", "content": "Answer?"}, {"role": "assistant", "content": "The answer is"}])
    assert prompt_text(server).endswith("<|start|>assistant<|channel|>final<|message|>The answer is")
    assert [b.model_dump(exclude_none=True) for b in msg.content] == [{"type": "text", "text": " 42."}]
    assert msg.stop_reason == "end_turn"


def test_thinking_blocks(server, client, enc):
    server.script.append(reasoning_then_answer(enc))
    msg = client.messages.create(model=MODEL, max_tokens=100, messages=HI)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "User asks weather." and msg.content[0].signature
    assert msg.content[1].text == "It is sunny." and msg.stop_reason == "end_turn"

    # thinking in an input assistant turn is rendered back as reasoning (before its tool call)
    client.messages.create(model=MODEL, max_tokens=1, tools=TOOLS, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Need the tool.", "signature": "x"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}]}])
    assert ("<|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>"
            "<|start|>assistant to=functions.get_weather") in prompt_text(server)


def events_of(stream) -> list:
    return [e for e in stream if e.type in ("message_start", "content_block_start", "content_block_delta",
                                            "content_block_stop", "message_delta", "message_stop")]


def test_stream_text(server, client, enc):
    script = say(enc, "Hello there, friend.", "final", last=RETURN, first=True)
    server.script.append(script)
    with client.messages.stream(model=MODEL, max_tokens=50, messages=HI) as stream:
        events = events_of(stream)
        final = stream.get_final_message()
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"] and types[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    assert events[0].message.content == [] and events[0].message.usage.input_tokens == len(server.prompts[-1])
    assert "".join(e.delta.text for e in events[2:-3]) == "Hello there, friend."
    assert all(e.delta.type == "text_delta" and e.index == 0 for e in events[2:-3])
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == len(script)
    assert final.content[0].text == "Hello there, friend." and final.stop_reason == "end_turn"

    # the wire: every SSE event names its type (`event:` line), as Anthropic's SDK requires
    server.script.append(script)
    with httpx.stream("POST", server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 50, "messages": HI,
                                                                  "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = [(i, line) for i, line in enumerate(lines) if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(data) >= 6
    for i, line in data:
        assert lines[i - 1] == f"event: {json.loads(line[len('data: '):])['type']}"


def test_stream_tool_call(server, client, enc):
    server.script.append(reasoning_then_call(enc))
    with client.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Weather?"}],
                                tools=TOOLS) as stream:
        events = events_of(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [(e.index, e.content_block.type) for e in starts] == [(0, "thinking"), (1, "tool_use")]
    assert starts[1].content_block.name == "get_weather" and starts[1].content_block.input == {}
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == "Need the tool."
    assert [d.type for d in deltas].count("signature_delta") == 1
    assert "".join(d.partial_json for d in deltas if d.type == "input_json_delta") == '{"city": "Paris"}'
    assert events[-2].delta.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[1].input == {"city": "Paris"} and final.content[1].id == starts[1].content_block.id
    assert final.content[0].signature and final.stop_reason == "tool_use"


def test_tool_round_trip(server, client, enc):
    server.script.append(reasoning_then_call(enc))
    first = client.messages.create(model=MODEL, max_tokens=100, tools=TOOLS,
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.type for b in first.content] == ["thinking", "tool_use"] and first.stop_reason == "tool_use"
    call = first.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}

    server.script.append(say(enc, "Sunny in Paris.", "final", last=RETURN, first=True))
    second = client.messages.create(model=MODEL, max_tokens=100, tools=TOOLS, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": '{"sky": "sunny"}'}]}]}])
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
            '{"sky": "sunny"}<|end|><|start|>assistant') in prompt_text(server)
    assert "get_weather = (_: {" in prompt_text(server)  # the tool is declared in the developer message
    assert second.content[0].text == "Sunny in Paris." and second.stop_reason == "end_turn"


def test_tool_choice(server, client):
    named = {"type": "tool", "name": "get_weather"}
    msg = client.messages.create(model=MODEL, max_tokens=3, tools=TOOLS, tool_choice=named, messages=HI)
    assert msg.content[0].type == "tool_use" and msg.content[0].name == "get_weather"
    assert prompt_text(server).endswith("<|start|>assistant<|channel|>commentary to=functions.get_weather "
                                        "<|constrain|>json<|message|>")
    client.messages.create(model=MODEL, max_tokens=1, tools=TOOLS, tool_choice={"type": "any"}, messages=HI)
    assert prompt_text(server).endswith("<|start|>assistant<|channel|>commentary to=functions")
    client.messages.create(model=MODEL, max_tokens=1, tools=TOOLS, tool_choice={"type": "none"}, messages=HI)
    assert "get_weather" not in prompt_text(server)
    with pytest.raises(anthropic.BadRequestError, match="not in 'tools'"):
        client.messages.create(model=MODEL, max_tokens=1, tools=TOOLS, tool_choice={"type": "tool", "name": "nope"},
                               messages=HI)


def test_stop_sequences(server, client):
    # the real engine (greedy), inside an answer (prefill: the random model writes no harmony
    # headers of its own): stop on a piece of what it wrote without a stop sequence
    convo = HI + [{"role": "assistant", "content": "Sure:"}]
    free = client.messages.create(model=MODEL, max_tokens=24, messages=convo, extra_body=GREEDY)
    text = "".join(b.text for b in free.content)
    assert len(text) >= 8, free
    stop = text[4:8]
    msg = client.messages.create(model=MODEL, max_tokens=24, messages=convo, extra_body=GREEDY, stop_sequences=[stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.usage.output_tokens < free.usage.output_tokens
    got = "".join(b.text for b in msg.content)
    assert text.startswith(got) and stop not in got and len(got) <= 4
    with client.messages.stream(model=MODEL, max_tokens=24, messages=convo, extra_body=GREEDY,
                                stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in streamed.content) == got


def test_max_tokens(server, client, enc):
    server.script.append(say(enc, "A long answer that goes on and on.", "final", last=RETURN, first=True))
    msg = client.messages.create(model=MODEL, max_tokens=5, messages=HI)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 5
    server.script.append(say(enc, "A long answer that goes on and on.", "final", last=RETURN, first=True))
    with client.messages.stream(model=MODEL, max_tokens=5, messages=HI) as stream:
        assert stream.get_final_message().stop_reason == "max_tokens"


def test_count_tokens(server, client):
    for kwargs in ({"messages": HI}, {"messages": HI, "system": "Be brief.", "tools": TOOLS},
                   {"messages": HI, "tools": TOOLS, "tool_choice": {"type": "any"}}):
        count = client.messages.count_tokens(model=MODEL, **kwargs)
        n = len(server.prompts)
        msg = client.messages.create(model=MODEL, max_tokens=1, **kwargs)
        assert count.input_tokens == len(server.prompts[-1]) == msg.usage.input_tokens
        assert len(server.prompts) == n + 1  # counting runs nothing
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=HI)


def check_error(err, status: int, kind: str, message: str) -> None:
    assert err.status_code == status
    assert err.body["type"] == "error" and set(err.body) == {"type", "error"}
    assert err.body["error"]["type"] == kind and message in err.body["error"]["message"], err.body


def test_bad_requests(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=5, messages=HI, extra_body={"temperature": 1.5})
    check_error(e.value, 400, "invalid_request_error", "temperature: Input should be less than or equal to 1")
    with pytest.raises(anthropic.BadRequestError) as e:  # the prompt plus max_tokens exceed the context
        client.messages.create(model=MODEL, max_tokens=5000, messages=HI)
    check_error(e.value, 400, "invalid_request_error", "maximum context length is 1024 tokens")
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    check_error(e.value, 400, "invalid_request_error", "image")
    for body, message in (({"model": MODEL, "messages": HI}, "max_tokens: field required"),
                          ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages: "),
                          ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
                           "messages[0].role")):
        r = httpx.post(server.url + "/v1/messages", json=body)
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and message in r.json()["error"]["message"]


def test_unknown_model(server, client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nope", max_tokens=5, messages=HI)
    check_error(e.value, 404, "not_found_error", "The model `claude-nope` does not exist")
    with pytest.raises(anthropic.NotFoundError):
        with client.messages.stream(model="claude-nope", max_tokens=5, messages=HI) as stream:
            stream.get_final_message()


def test_error_mid_stream(server, client):
    server.script.append(RuntimeError("the step failed"))
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model=MODEL, max_tokens=5, messages=HI) as stream:
            stream.get_final_message()
    assert e.value.body == {"type": "error", "error": {"type": "api_error",
                                                        "message": "Internal server error: RuntimeError"}}


def test_dispatch_errors(server):
    """Other doors (RunPod jobs) reach the same code through dispatch and get the same error body."""
    with pytest.raises(AnthropicError) as e:
        asyncio.run(server.serving.dispatch("/v1/messages", {"model": MODEL, "messages": HI}))
    assert isinstance(e.value, OpenAIError) and e.value.status_code == 400
    assert e.value.to_dict() == {"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": "max_tokens: field required"}}
    with pytest.raises(AnthropicError, match="needs a JSON object"):
        asyncio.run(server.serving.dispatch("/messages/count_tokens", None))
    assert is_anthropic_route("/v1/messages") and is_anthropic_route("/openai/v1/messages/count_tokens/")
    assert not is_anthropic_route("/v1/chat/completions")
    assert error_body(OpenAIError("busy", 503)) == {"type": "error", "error": {"type": "overloaded_error",
                                                                                "message": "busy"}}
