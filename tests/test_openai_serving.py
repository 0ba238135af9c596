"""The OpenAI layer end to end with a scripted engine (fixed harmony outputs), through the real
`openai` SDK over ASGI: reasoning, content, tool calls, tool_choice, multi-turn rendering,
logprobs, n, Responses API events, errors, and aborting on close. No model runs here."""

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import openai_harmony as oh
import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from minivllm.openai import OpenAIError, OpenAIServing
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput
from minivllm.server.app import create_app
from minivllm.tokenizer import Tokenizer

RETURN, CALL, END = 200002, 200012, 200007
MODEL = "scripted"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


class ScriptedEngine:
    """AsyncEngine's interface, replaying fixed output tokens (one per step, per choice)."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer()
        self.engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=201088), max_model_len=4096,
                                      stats=lambda: {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0})
        self.is_running = True
        self.scripts: list[list[int]] = [[]]
        self.prompts: list[list[int]] = []
        self.aborted: list[str] = []
        self.fail_after: int | None = None

    async def generate(self, prompt, params, request_id, priority=0):
        ids = prompt["prompt_token_ids"]
        self.prompts.append(ids)
        scripts = [self.scripts[i % len(self.scripts)] for i in range(params.n)]
        stops = set(params.stop_token_ids)
        done = [False] * params.n
        reasons = [None] * params.n
        counts = [0] * params.n
        step = 0
        try:
            while not all(done):
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("engine step failed: boom")
                outs = []
                for i, script in enumerate(scripts):
                    if done[i]:  # like the engine: a finished choice is reported again, unchanged
                        outs.append(CompletionOutput(i, "", [], finish_reason=reasons[i]))
                        continue
                    token = script[step]
                    counts[i] += 1
                    reason = ("stop" if token in stops or step == len(script) - 1
                              else "length" if counts[i] >= params.max_tokens else None)
                    done[i], reasons[i] = reason is not None, reason
                    lps = None
                    if params.logprobs is not None:
                        lps = [{token: Logprob(-0.25, 1, self.tokenizer.decode([token], False)),
                                7: Logprob(-2.0, 2, "(")}]
                    outs.append(CompletionOutput(i, self.tokenizer.decode([token], params.skip_special_tokens),
                                                 [token], logprobs=lps, finish_reason=reason))
                step += 1
                yield RequestOutput(request_id, None, ids, outs, all(done), num_cached_tokens=16)
                await asyncio.sleep(0)
        finally:
            if not all(done):
                self.aborted.append(request_id)


@pytest.fixture(scope="module")
def engine():
    return ScriptedEngine()


@pytest.fixture(scope="module")
def enc(engine):
    return engine.tokenizer.harmony


def say(enc, text, channel, recipient=None, last=END, first=False):
    m = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient).with_content_type("<|constrain|>json")
    tokens = enc.render(m)[:-1] + [last]
    return tokens[2:] if first else tokens  # the prompt already ends with <|start|>assistant


def reasoning_then_answer(enc):
    return say(enc, "User asks weather.", "analysis", first=True) + say(enc, "It is sunny.", "final", last=RETURN)


def reasoning_then_call(enc):
    return (say(enc, "Need the tool.", "analysis", first=True)
            + say(enc, '{"city": "Paris"}', "commentary", "functions.get_weather", last=CALL))


def run(engine, scenario, **serving_kwargs):
    """Run `scenario(client, serving)` against a fresh app over ASGI."""
    serving = OpenAIServing(engine, MODEL, max_model_len=4096, **serving_kwargs)

    async def main():
        app = create_app(engine, serving)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        async with http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            return await scenario(client, serving)

    return asyncio.run(main())


def test_chat_reasoning_and_content(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(client, _):
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
        body = raw.http_response.json()
        ChatCompletion.model_validate(body)  # strictly the SDK's schema
        choice = body["choices"][0]
        assert choice["message"]["content"] == "It is sunny."
        assert choice["message"]["reasoning_content"] == "User asks weather."
        assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["completion_tokens"] == len(engine.scripts[0])
        assert usage["prompt_tokens"] == len(engine.prompts[-1]) and usage["prompt_tokens_details"]["cached_tokens"] == 16
        assert usage["completion_tokens_details"]["reasoning_tokens"] == len(enc.encode("User asks weather."))

        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                      stream_options={"include_usage": True})
        content, reasoning, finish, usage = "", "", None, None
        async for chunk in stream:
            ChatCompletionChunk.model_validate(chunk.model_dump())
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                content += c.delta.content or ""
                reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
                finish = c.finish_reason or finish
        assert (content, reasoning, finish) == ("It is sunny.", "User asks weather.", "stop")
        assert usage.completion_tokens == len(engine.scripts[0])

    run(engine, scenario)


def test_chat_tool_call_stream_and_non_stream(engine, enc):
    engine.scripts = [reasoning_then_call(enc)]

    async def scenario(client, _):
        resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
            "function", "get_weather", {"city": "Paris"})
        assert call.id.startswith("call_")
        assert "namespace functions" in engine.tokenizer.decode(engine.prompts[-1], False)

        stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, stream=True)
        calls, finish, content = {}, None, ""
        async for chunk in stream:
            for c in chunk.choices:
                content += c.delta.content or ""
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                    entry["id"] = d.id or entry["id"]
                    entry["name"] = (d.function.name if d.function else None) or entry["name"]
                    entry["arguments"] += (d.function.arguments or "") if d.function else ""
        assert finish == "tool_calls" and content == ""
        assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}

    run(engine, scenario)


def test_tool_choice(engine, enc):
    async def scenario(client, _):
        decode = lambda ids: engine.tokenizer.decode(ids, False)
        engine.scripts = [enc.encode('{"tz": "CET"}') + [CALL]]
        resp = await client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert decode(engine.prompts[-1]).endswith(
            "<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>")
        call = resp.choices[0].message.tool_calls[0]
        assert (call.function.name, call.function.arguments, resp.choices[0].finish_reason) == (
            "get_time", '{"tz": "CET"}', "tool_calls")

        engine.scripts = [enc.encode(".get_weather <|constrain|>json<|message|>{}", allowed_special="all") + [CALL]]
        resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required")
        assert resp.choices[0].message.tool_calls[0].function.name == "get_weather"

        engine.scripts = [reasoning_then_answer(enc)]
        resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none")
        assert "namespace functions" not in decode(engine.prompts[-1])
        assert resp.choices[0].message.content == "It is sunny."

        with pytest.raises(openai.BadRequestError, match="needs a non-empty 'tools'"):
            await client.chat.completions.create(model=MODEL, messages=USER, tool_choice="required")
        with pytest.raises(openai.BadRequestError, match="'nope', which is not in 'tools'"):
            await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                                 tool_choice={"type": "function", "function": {"name": "nope"}})

    run(engine, scenario)


def test_multi_turn_tool_history_renders_to_harmony(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]
    history = USER + [
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]

    async def scenario(client, _):
        resp = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                                    reasoning_effort="high")
        assert resp.choices[0].message.content == "It is sunny."
        prompt = engine.tokenizer.decode(engine.prompts[-1], False)
        assert "Reasoning: high" in prompt
        assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
                '{"city": "Paris"}<|call|>') in prompt
        assert prompt.endswith('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
                               '{"sky": "sunny"}<|end|><|start|>assistant')

    run(engine, scenario)


def test_response_format_goes_to_the_prompt(engine, enc):
    engine.scripts = [say(enc, '{"a": 1}', "final", last=RETURN, first=True)]

    async def scenario(client, _):
        decode = lambda ids: engine.tokenizer.decode(ids, False)
        await client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
        assert "Respond with a single JSON object only." in decode(engine.prompts[-1])
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        await client.chat.completions.create(model=MODEL, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
        assert f"## thing\n\n{json.dumps(schema)}" in decode(engine.prompts[-1])
        with pytest.raises(openai.BadRequestError, match="response_format"):
            await client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_schema"})

    run(engine, scenario)


def test_chat_logprobs_cover_content_tokens_only(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(client, _):
        resp = await client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=2)
        lps = resp.choices[0].logprobs.content
        assert "".join(lp.token for lp in lps) == "It is sunny."
        assert all(lp.logprob == -0.25 and len(lp.top_logprobs) == 2 for lp in lps)
        assert bytes(lps[0].bytes).decode() == lps[0].token
        stream = await client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, stream=True)
        tokens = []
        async for chunk in stream:
            for c in chunk.choices:
                if c.logprobs and c.logprobs.content:
                    tokens += [lp.token for lp in c.logprobs.content]
                    assert all(lp.top_logprobs == [] for lp in c.logprobs.content)  # top_logprobs=0
        assert "".join(tokens) == "It is sunny."

    run(engine, scenario)


def test_n_choices_are_parsed_separately(engine, enc):
    engine.scripts = [reasoning_then_answer(enc), reasoning_then_call(enc)]

    async def scenario(client, _):
        resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, n=2)
        a, b = resp.choices
        assert (a.index, a.message.content, a.finish_reason) == (0, "It is sunny.", "stop")
        assert (b.index, b.message.tool_calls[0].function.name, b.finish_reason) == (1, "get_weather", "tool_calls")
        assert resp.usage.completion_tokens == len(engine.scripts[0]) + len(engine.scripts[1])
        stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, n=2, stream=True)
        finish = {}
        async for chunk in stream:
            assert len(chunk.choices) == 1
            c = chunk.choices[0]
            if c.finish_reason:
                finish.setdefault(c.index, []).append(c.finish_reason)
        assert finish == {0: ["stop"], 1: ["tool_calls"]}  # once each, though the engine repeats them
        stream = await client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=50, stream=True)
        finish, text = {}, {}
        async for chunk in stream:
            for c in chunk.choices:
                text[c.index] = text.get(c.index, "") + c.text
                if c.finish_reason:
                    finish.setdefault(c.index, []).append(c.finish_reason)
        assert finish == {0: ["stop"], 1: ["stop"], 2: ["stop"], 3: ["stop"]}
        assert text[0] == text[2] == engine.tokenizer.decode(engine.scripts[0])

    run(engine, scenario)


def test_max_tokens_cuts_the_answer(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]
    n_reasoning = len(say(enc, "User asks weather.", "analysis", first=True))

    async def scenario(client, _):
        resp = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=n_reasoning + 6)
        choice = resp.choices[0]
        assert choice.finish_reason == "length"
        assert choice.message.content and "It is sunny.".startswith(choice.message.content)

    run(engine, scenario)


def test_responses_api(engine, enc):
    engine.scripts = [reasoning_then_call(enc)]
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]

    async def scenario(client, _):
        raw = await client.responses.with_raw_response.create(model=MODEL, input="Weather in Paris?", tools=tools,
                                                              instructions="Be brief.")
        body = raw.http_response.json()
        resp = Response.model_validate(body)
        assert resp.status == "completed" and [o.type for o in resp.output] == ["reasoning", "function_call"]
        assert resp.output[0].content[0].text == "Need the tool."
        call = resp.output[1]
        assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
        assert resp.usage.output_tokens == len(engine.scripts[0])
        assert "Be brief." in engine.tokenizer.decode(engine.prompts[-1], False)

        # the SDK's own stream accumulator checks event order, indexes and item identity
        async with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=tools) as stream:
            types = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
        assert "response.reasoning_text.delta" in types and "response.function_call_arguments.done" in types
        assert [o.type for o in final.output] == ["reasoning", "function_call"]
        assert final.output[1].arguments == call.arguments

        # a tool result sent back renders as harmony; the answer is output_text
        engine.scripts = [reasoning_then_answer(enc)]
        resp = await client.responses.create(model=MODEL, tools=tools, input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_9", "output": '{"sky": "sunny"}'}])
        assert resp.output_text == "It is sunny."
        assert ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}<|end|>'
                in engine.tokenizer.decode(engine.prompts[-1], False))

        state = ResponseStreamState(input_tools=tools, text_format=openai.omit)
        stream = await client.responses.create(model=MODEL, input="hi", max_output_tokens=5, stream=True)
        events = [event async for event in stream]
        for event in events:
            state.handle_event(event)
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.incomplete_details.reason == "max_output_tokens"
        assert [e.sequence_number for e in events] == list(range(len(events)))

        with pytest.raises(openai.BadRequestError, match="Previous response with id .resp_1. not found"):
            await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")

    run(engine, scenario)


def test_errors(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(client, serving):
        with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist"):
            await client.chat.completions.create(model="gpt-4", messages=USER)
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model=MODEL, messages=USER, temperature=3, top_p=0)
        assert e.value.body["message"] == ("temperature: Input should be less than or equal to 2; "
                                           "top_p: Input should be greater than 0")
        assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\]: invalid role 'robot'"):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="messages: field required"):
            await client.post("/chat/completions", body={"model": MODEL}, cast_to=dict)
        with pytest.raises(openai.NotFoundError, match="Unknown route"):
            await client.post("/embeddings", body={"input": "x"}, cast_to=dict)
        with pytest.raises(openai.BadRequestError, match="stream_options is only allowed"):
            await client.chat.completions.create(model=MODEL, messages=USER, stream_options={"include_usage": True})

        # dispatch itself: routes with or without prefixes, OpenAIError for the worker
        for route in ("/v1/models", "/models", "/openai/v1/models", "v1/models/"):
            assert (await serving.dispatch(route, None))["data"][0]["id"] == MODEL
        with pytest.raises(OpenAIError) as err:
            await serving.dispatch("/v1/completions", {"prompt": "hi", "n": 0})
        assert err.value.status_code == 400 and err.value.to_dict()["error"]["param"] == "n"
        with pytest.raises(OpenAIError) as err:
            await serving.dispatch("/v1/chat/completions", {"messages": USER, "tools": [{"type": "web_search"}]})
        assert err.value.message == "tools[0].type: Input should be 'function'; tools[0].function: field required"
        with pytest.raises(OpenAIError, match="needs a JSON object"):
            await serving.dispatch("/v1/chat/completions", None)

    run(engine, scenario)


def test_error_mid_stream_is_an_error_event(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]
    engine.fail_after = 3

    async def scenario(client, _):
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        with pytest.raises(openai.APIError, match="boom"):
            async for _ in stream:
                pass

    try:
        run(engine, scenario)
    finally:
        engine.fail_after = None


def test_closing_a_stream_aborts_the_request(engine, enc):
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(_, serving):
        engine.aborted.clear()
        chunks = await serving.dispatch("/v1/chat/completions", {"messages": USER, "stream": True})
        for _ in range(3):
            await chunks.__anext__()
        await chunks.aclose()
        assert len(engine.aborted) == 1
        # several prompts at once: closing the merged stream aborts every one
        chunks = await serving.dispatch("/v1/completions", {"prompt": ["a", "b", "c"], "stream": True,
                                                            "max_tokens": 20})
        await chunks.__anext__()
        await chunks.aclose()
        assert len(engine.aborted) == 4

    run(engine, scenario)
