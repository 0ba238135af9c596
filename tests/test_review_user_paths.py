"""What users of the OpenAI SDK, of curl and of worker-vllm's job schema hit: finish/stop reasons,
stop strings, null fields, forced usage, the SDK's stream helpers, RunPod OpenAI jobs.

Deterministic harmony output comes from a scripted engine (tests/test_openai_serving.py's), here
with the real engine's finishing rules, so stop_reason and stop strings behave as in LLMEngine.
"""

import asyncio
import json

import openai
import pytest

from minivllm.openai import OpenAIServing
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput
from minivllm.worker import WorkerConfig, make_handler
from test_openai_serving import (
    CALL,
    MODEL,
    RETURN,
    TOOLS,
    USER,
    ScriptedEngine,
    reasoning_then_answer,
    reasoning_then_call,
    run,
    say,
)

EOS = frozenset({RETURN, 199999, CALL})  # gpt-oss's generation_config eos_token_id


class EngineRulesEngine(ScriptedEngine):
    """Replays scripts, finishing as LLMEngine._append_text_and_check_stop does: an EOS token stops
    with stop_reason None unless it is also in stop_token_ids (then the token id); a stop string
    stops with the string as stop_reason and the text cut before it (after, if kept)."""

    async def generate(self, prompt, params, request_id, priority=0):
        ids = prompt["prompt_token_ids"]
        self.prompts.append(ids)
        scripts = [self.scripts[i % len(self.scripts)] for i in range(params.n)]
        texts = [""] * params.n
        reasons: list = [None] * params.n
        for step in range(max(map(len, scripts))):
            outs = []
            for i, script in enumerate(scripts):
                if reasons[i] is not None or step >= len(script):
                    outs.append(CompletionOutput(i, "", [], finish_reason=reasons[i] or "length"))
                    continue
                token, prev = script[step], len(texts[i])
                finish, stop_reason = None, None
                if token in EOS or token in params.stop_token_ids:
                    finish = "stop"
                    stop_reason = None if token in EOS and token not in params.stop_token_ids else token
                else:
                    texts[i] += self.tokenizer.decode([token], params.skip_special_tokens)
                    for stop in params.stop_strings:
                        at = texts[i].find(stop, max(0, prev - len(stop) + 1))
                        if at != -1:
                            end = at + len(stop) if params.include_stop_str_in_output else at
                            texts[i], finish, stop_reason = texts[i][:end], "stop", stop
                            break
                if finish is None and (step == len(script) - 1 or step + 1 >= params.max_tokens):
                    finish = "length"
                reasons[i] = finish
                lps = None if params.logprobs is None else [
                    {token: Logprob(-0.25, 1, self.tokenizer.decode([token], False))}]
                outs.append(CompletionOutput(i, texts[i][prev:], [token], logprobs=lps, finish_reason=finish,
                                             stop_reason=stop_reason))
            yield RequestOutput(request_id, None, ids, outs, all(r is not None for r in reasons),
                                num_cached_tokens=0)
            await asyncio.sleep(0)
            if all(r is not None for r in reasons):
                return


@pytest.fixture(scope="module")
def engine():
    return EngineRulesEngine()


@pytest.fixture(scope="module")
def enc(engine):
    return engine.tokenizer.harmony


async def stream_choices(stream) -> dict:
    """index -> {content, finish_reason, stop_reason} accumulated from a chat stream."""
    acc = {}
    async for chunk in stream:
        for c in chunk.choices:
            entry = acc.setdefault(c.index, {"content": "", "finish_reason": None, "stop_reason": None})
            entry["content"] += c.delta.content or ""
            if c.finish_reason:
                entry["finish_reason"] = c.finish_reason
                entry["stop_reason"] = (c.model_extra or {}).get("stop_reason")
    return acc


def test_return_token_finishes_with_stop_and_a_null_stop_reason(engine, enc):
    """vLLM reports EOS (<|return|>) as stop_reason null; the route added it to stop_token_ids,
    so the engine named it (200002) instead."""
    async def scenario(client, _):
        engine.scripts = [reasoning_then_answer(enc)]
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
        choice = raw.http_response.json()["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)
        assert choice["message"]["content"] == "It is sunny."
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        assert await stream_choices(stream) == {0: {"content": "It is sunny.", "finish_reason": "stop",
                                                    "stop_reason": None}}
        # asked for explicitly, a stop token is named, as in vLLM
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=USER, extra_body={"stop_token_ids": [RETURN]})
        assert raw.http_response.json()["choices"][0]["stop_reason"] == RETURN
        # a tool call ends in <|call|>: finish_reason tool_calls
        engine.scripts = [reasoning_then_call(enc)]
        resp = await client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
        assert resp.choices[0].finish_reason == "tool_calls"

    run(engine, scenario)


def test_chat_stop_string_is_left_out_of_the_content(engine, enc):
    """OpenAI: "The returned text will not contain the stop sequence". The engine cut its text,
    but the chat route parses token ids, so the stop string (and the rest of its token) leaked."""
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(client, _):
        resp = await client.chat.completions.create(model=MODEL, messages=USER, stop=["sun"])
        choice = resp.choices[0]
        assert (choice.message.content, choice.finish_reason) == ("It is ", "stop")
        assert choice.model_extra["stop_reason"] == "sun"
        assert choice.message.model_extra["reasoning_content"] == "User asks weather."
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stop="sun", stream=True)
        assert (await stream_choices(stream))[0] == {"content": "It is ", "finish_reason": "stop",
                                                     "stop_reason": "sun"}
        resp = await client.chat.completions.create(model=MODEL, messages=USER, stop=["sun"],
                                                    extra_body={"include_stop_str_in_output": True})
        assert resp.choices[0].message.content == "It is sun"
        resp = await client.responses.create(model=MODEL, input="Weather?", extra_body={"stop": ["sun"]})
        assert resp.output_text == "It is "

    run(engine, scenario)


def test_explicit_null_n_means_one_choice(engine, enc):
    """OpenAI documents n as "integer or null"; a client that sends every field sent a 400 back."""
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(_, serving):
        chat = await serving.dispatch("/v1/chat/completions", {"messages": USER, "n": None})
        assert len(chat["choices"]) == 1 and chat["choices"][0]["message"]["content"] == "It is sunny."
        completion = await serving.dispatch("/v1/completions", {"prompt": "hi", "n": None, "max_tokens": 2})
        assert len(completion["choices"]) == 1
        response = await serving.dispatch("/v1/responses", {"input": "hi", "n": None})
        assert response["status"] == "completed"

    run(engine, scenario)


def test_force_include_usage_covers_completions_streams(engine, enc):
    """ENABLE_FORCE_INCLUDE_USAGE (vLLM's --enable-force-include-usage) applies to every stream;
    completions streams ignored it."""
    engine.scripts = [reasoning_then_answer(enc)]

    async def scenario(client, _):
        chunks = [c async for c in await client.completions.create(model=MODEL, prompt="hi", max_tokens=4,
                                                                      stream=True)]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
        assert all(c.usage is None for c in chunks[:-1])
        chunks = [c async for c in await client.chat.completions.create(model=MODEL, messages=USER, stream=True)]
        assert chunks[-1].usage.completion_tokens == len(engine.scripts[0])

    run(engine, scenario, force_include_usage=True)


def test_sdk_stream_helper_accumulates_tools_n2_logprobs_and_usage(engine, enc):
    """`client.chat.completions.stream` validates every delta (tool-call index/id/name first, then
    arguments) and builds the final completion from them."""
    engine.scripts = [reasoning_then_answer(enc), reasoning_then_call(enc)]

    async def scenario(client, _):
        async with client.chat.completions.stream(model=MODEL, messages=USER, tools=TOOLS, n=2, logprobs=True,
                                                  top_logprobs=1, stream_options={"include_usage": True}) as s:
            async for _ in s:
                pass
            final = await s.get_final_completion()
        a, b = final.choices
        assert (a.message.content, a.finish_reason) == ("It is sunny.", "stop")
        assert "".join(lp.token for lp in a.logprobs.content) == "It is sunny."
        call = b.message.tool_calls[0]
        assert (b.finish_reason, call.function.name, json.loads(call.function.arguments)) == (
            "tool_calls", "get_weather", {"city": "Paris"})
        assert final.usage.completion_tokens == len(engine.scripts[0]) + len(engine.scripts[1])

    run(engine, scenario)


def test_runpod_openai_jobs(engine, enc):
    """worker-vllm's OpenAI job shapes: /v1/models without openai_input, a stop-string chat,
    errors whose str() (what RunPod stores) is the JSON error object, never a Python repr."""
    engine.scripts = [reasoning_then_answer(enc)]
    serving = OpenAIServing(engine, MODEL, max_model_len=4096)
    handler = make_handler(engine, serving, WorkerConfig())

    def job(job_input):
        async def main():
            return [out async for out in handler({"id": "j", "input": job_input})]
        return asyncio.run(main())

    models, = job({"openai_route": "/v1/models"})
    assert models["data"][0]["id"] == MODEL
    chat, = job({"openai_route": "/openai/v1/chat/completions",
                 "openai_input": {"messages": USER, "stop": "sun", "n": None}})
    assert (chat["choices"][0]["message"]["content"], chat["choices"][0]["stop_reason"]) == ("It is ", "sun")
    error, = job({"openai_route": "/v1/chat/completions", "openai_input": {"messages": USER, "max_tokens": 10**6}})
    assert "maximum context length is 4096" in json.loads(str(error["error"]))["message"]


def test_say_helper_is_harmony(enc):
    # guards the scripts above: the answer ends with <|return|>, the call with <|call|>
    assert say(enc, "x", "final", last=RETURN)[-1] == RETURN
    assert reasoning_then_call(enc)[-1] == CALL
