"""The job handler on the real engine (embedded tiny model): native and OpenAI outputs, batching,
errors, cancellation."""

import asyncio
import json

import pytest

from minivllm import SamplingParams
from minivllm.openai import OpenAIError, OpenAIServing
from minivllm.sampling_params import RequestOutputKind
from minivllm.worker import WorkerConfig, make_concurrency_modifier, make_handler


@pytest.fixture(scope="module")
def serving(engine):
    return OpenAIServing(engine, "tiny-gpt-oss", max_model_len=1024)


def free_blocks(engine) -> int:
    return engine.engine.block_manager.num_free_blocks


def run(handler, job_input: dict, job_id: str = "job") -> list:
    async def main():
        return [out async for out in handler({"id": job_id, "input": job_input})]
    return asyncio.run(main())


def handler_for(engine, serving=None, **settings):
    return make_handler(engine, serving, WorkerConfig(**settings))


def greedy_text(engine, prompt, max_tokens: int) -> str:
    async def main():
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        async for out in engine.generate(prompt, params):
            final = out
        return final.outputs[0].text
    return asyncio.run(main())


# ---- native jobs ----------------------------------------------------------------------------

def test_native_non_stream_is_one_item_with_the_whole_text_and_real_usage(engine):
    prompt = "The capital of France is"
    outs = run(handler_for(engine), {"prompt": prompt, "sampling_params": {"max_tokens": 8, "temperature": 0,
                                                                          "ignore_eos": True}})
    n_prompt = len(engine.tokenizer.encode(prompt))
    assert outs == [{
        "choices": [{"index": 0, "tokens": [greedy_text(engine, prompt, 8)], "finish_reason": "length"}],
        "usage": {"input": n_prompt, "output": 8, "prompt_tokens": n_prompt, "completion_tokens": 8,
                  "total_tokens": n_prompt + 8},
    }]


def test_native_stream_batches_grow_per_choice_with_n2(engine):
    prompt = "Once upon a time"
    job = {"prompt": prompt, "stream": True, "sampling_params": {"n": 2, "max_tokens": 13, "temperature": 0,
                                                               "ignore_eos": True}}
    outs = run(handler_for(engine, stream_flush_ms=0), job)
    n_prompt = len(engine.tokenizer.encode(prompt))
    # 13 tokens per choice in batches of 1, 3, 9 tokens per choice (default min 1, growth 3)
    assert [out["usage"]["output"] for out in outs] == [2, 8, 26]
    for out in outs:
        assert [c["index"] for c in out["choices"]] == [0, 1]
        assert out["usage"]["input"] == out["usage"]["prompt_tokens"] == n_prompt
        assert out["usage"]["completion_tokens"] == out["usage"]["output"]
        assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["output"]
    assert [c["finish_reason"] for c in outs[-1]["choices"]] == ["length", "length"]
    assert all(c["finish_reason"] is None for out in outs[:-1] for c in out["choices"])
    expected = greedy_text(engine, prompt, 13)
    for i in (0, 1):
        assert "".join(piece for out in outs for piece in out["choices"][i]["tokens"]) == expected


def test_native_stream_uses_the_jobs_batch_settings(engine):
    job = {"prompt": "abc", "stream": True, "max_batch_size": 4, "min_batch_size": 2, "batch_size_growth_factor": 1.5,
           "sampling_params": {"max_tokens": 12, "ignore_eos": True}}
    outs = run(handler_for(engine, stream_flush_ms=0), job)
    assert [out["usage"]["output"] for out in outs] == [2, 5, 9, 12]  # batches of 2, 3, 4, 3 (the rest)


def test_native_stream_time_limit_flushes_partial_batches(engine):
    job = {"prompt": "abc", "stream": True, "min_batch_size": 1000, "max_batch_size": 1000,
           "sampling_params": {"max_tokens": 10, "ignore_eos": True}}
    assert len(run(handler_for(engine, stream_flush_ms=0), job)) == 1  # no time limit: one batch of 10
    outs = run(handler_for(engine, stream_flush_ms=1), job)  # a step takes longer than 1 ms
    assert len(outs) > 1 and outs[-1]["usage"]["output"] == 10
    assert sum(len(out["choices"][0]["tokens"]) for out in outs) <= 10


def test_native_chat_messages_and_apply_chat_template(engine):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    out, = run(handler_for(engine), {"messages": messages, "sampling_params": {"max_tokens": 3, "ignore_eos": True}})
    assert out["usage"]["input"] == len(engine.tokenizer.render_chat(messages))
    out, = run(handler_for(engine), {"prompt": "Hi!", "apply_chat_template": True,
                                     "sampling_params": {"max_tokens": 3, "ignore_eos": True}})
    assert out["usage"]["input"] == len(engine.tokenizer.render_chat([{"role": "user", "content": "Hi!"}]))
    assert out["usage"]["output"] == 3


def test_worker_vllm_readme_jobs_run_unchanged(engine, serving):
    handler = handler_for(engine, serving)
    job = {"input": {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": "What is the capital of France?"}],
                     "sampling_params": {"max_tokens": 100, "temperature": 0.7}}}
    out, = run(handler, job["input"])
    assert set(out) == {"choices", "usage"} and isinstance(out["choices"][0]["tokens"][0], str)
    assert 1 <= out["usage"]["output"] <= 100
    models, = run(handler, {"openai_route": "/v1/models"})
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-gpt-oss"


@pytest.mark.parametrize("job_input,expected", [
    ({"prompt": "hi", "sampling_params": {"max_tokenz": 5}}, "unknown sampling_params key 'max_tokenz'"),
    ({"prompt": "hi", "sampling_params": {"temperature": -0.5}}, "temperature must be >= 0"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]: invalid role 'robot'"),
    ({"prompt": "word " * 1100}, "but max_model_len is 1024"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "either prompt or messages"),
])
def test_native_errors_are_one_clear_error_output(engine, job_input, expected):
    before = free_blocks(engine)
    outs = run(handler_for(engine), job_input)
    assert len(outs) == 1 and set(outs[0]) == {"error"} and isinstance(outs[0]["error"], str)
    assert expected in outs[0]["error"]
    assert free_blocks(engine) == before


def test_cancelling_a_native_job_frees_its_kv_blocks_before_the_error_propagates(engine):
    before = free_blocks(engine)
    handler = handler_for(engine, stream_flush_ms=0)

    async def main():
        first = asyncio.get_running_loop().create_future()

        async def consume():
            async for out in handler({"id": "c1", "input": {"prompt": "count " * 40, "stream": True,
                                                            "sampling_params": {"max_tokens": 500, "ignore_eos": True}}}):
                if not first.done():
                    first.set_result(out)

        task = asyncio.create_task(consume())
        await first
        assert free_blocks(engine) < before  # the request holds KV blocks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert free_blocks(engine) == before  # freed before CancelledError reached us
        assert not engine.engine.has_unfinished_requests()

    asyncio.run(main())


def test_closing_the_handler_early_frees_kv_blocks(engine):
    before = free_blocks(engine)
    handler = handler_for(engine, stream_flush_ms=0)

    async def main():
        outputs = handler({"id": "c2", "input": {"prompt": "x y z", "stream": True,
                                                 "sampling_params": {"max_tokens": 500, "ignore_eos": True}}})
        await outputs.__anext__()
        assert free_blocks(engine) < before
        await outputs.aclose()  # what runpod's GC hook does when its task is cancelled between yields
        assert free_blocks(engine) == before

    asyncio.run(main())


def test_concurrency_modifier_returns_max_concurrency():
    modifier = make_concurrency_modifier(WorkerConfig(max_concurrency=7))
    assert modifier(1) == 7 and modifier(30) == 7


# ---- OpenAI jobs (real serving layer) -------------------------------------------------------

def completion_job(stream: bool, max_tokens: int = 13, **extra) -> dict:
    body = {"model": "tiny-gpt-oss", "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, **extra}
    return {"openai_route": "/v1/completions", "openai_input": body}


def sse_events(text: str) -> list:
    assert text.endswith("\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_openai_raw_stream_is_sse_text_in_growing_batches_ending_in_done(engine, serving):
    outs = run(handler_for(engine, serving, stream_flush_ms=0), completion_job(True))
    assert all(isinstance(out, str) for out in outs)
    assert outs[-1].endswith("data: [DONE]\n\n") and "[DONE]" not in "".join(outs[:-1])
    counts = [len(sse_events(out)) for out in outs]
    assert counts[:3] == [1, 3, 9]
    payloads = [p for out in outs for p in sse_events(out) if p != "[DONE]"]
    chunks = [json.loads(p) for p in payloads]
    assert all(c["object"] == "text_completion" and c["model"] == "tiny-gpt-oss" for c in chunks)
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == greedy_text(engine, "Hello there", 13)


def test_openai_stream_with_raw_output_off_yields_lists_of_chunks(engine, serving):
    job = completion_job(True, stream_options={"include_usage": True})
    outs = run(handler_for(engine, serving, stream_flush_ms=0, raw_openai_output=False), job)
    assert all(isinstance(out, list) and all(isinstance(c, dict) for c in out) for out in outs)
    assert [len(out) for out in outs][:3] == [1, 3, 9]
    usage = outs[-1][-1]["usage"]
    n_prompt = len(engine.tokenizer.encode("Hello there"))
    assert usage["prompt_tokens"] == n_prompt and usage["completion_tokens"] == 13


def test_openai_non_stream_yields_the_response_once(engine, serving):
    outs = run(handler_for(engine, serving), completion_job(False, max_tokens=5))
    assert len(outs) == 1 and outs[0]["object"] == "text_completion"
    assert outs[0]["choices"][0]["text"] == greedy_text(engine, "Hello there", 5)
    assert outs[0]["usage"]["completion_tokens"] == 5

    chat = {"openai_route": "/v1/chat/completions",
            "openai_input": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}}
    out, = run(handler_for(engine, serving), chat)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("job_input,message", [
    ({"openai_route": "/v1/embeddings", "openai_input": {"input": "x"}}, "Unknown route '/v1/embeddings'"),
    ({"openai_route": "/v1/chat/completions", "openai_input": {"messages": "hi"}}, "messages"),
    ({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "model": "gpt-4"}}, "The model `gpt-4` does not exist"),
])
def test_openai_errors_fail_the_job_with_the_openai_error_body(engine, serving, job_input, message):
    outs = run(handler_for(engine, serving), job_input)
    assert len(outs) == 1 and set(outs[0]) == {"error"}
    body = outs[0]["error"]
    assert set(body) == {"message", "type", "param", "code"} and message in body["message"]
    # runpod fails the job with str(output["error"]): that string is the JSON error object
    assert json.loads(str(body)) == body


class MidStreamFailure:
    """A serving-layer stand-in (dispatch's signature) over the real engine that fails mid-stream."""

    def __init__(self, engine):
        self.engine = engine

    async def dispatch(self, route, body, method=None):
        if route == "/v1/broken-response":
            return {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
        return self._stream()

    async def _stream(self):
        params = SamplingParams(max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        async for out in self.engine.generate("hello", params):
            yield {"object": "text_completion", "choices": [{"index": 0, "text": out.outputs[0].text}]}
            if out.outputs[0].finish_reason:
                raise OpenAIError("the engine went away", 503)


def test_openai_mid_stream_error_ends_the_job_with_the_error_body(engine):
    outs = run(handler_for(engine, MidStreamFailure(engine), stream_flush_ms=0),
               {"openai_route": "/v1/completions", "openai_input": {"stream": True}})
    assert [o.count("data: ") for o in outs[:-1]] == [1, 3]  # events before the failure
    assert outs[-1] == {"error": {"message": "the engine went away", "type": "server_error", "param": None,
                                  "code": None}}
    outs = run(handler_for(engine, MidStreamFailure(engine)), {"openai_route": "/v1/broken-response"})
    assert json.loads(str(outs[0]["error"]))["message"] == "bad"


def test_cancelling_an_openai_stream_frees_its_kv_blocks(engine, serving):
    before = free_blocks(engine)
    # The first batch is one event; the second would need the whole 500-token stream, so the
    # second read is surely still waiting on the engine when it is cancelled.
    handler = handler_for(engine, serving, stream_flush_ms=0)
    job = completion_job(True, max_tokens=500)
    job.update(min_batch_size=1, max_batch_size=1000, batch_size_growth_factor=1000)

    async def main():
        outputs = handler({"id": "c3", "input": job})
        await outputs.__anext__()
        assert free_blocks(engine) < before
        task = asyncio.ensure_future(outputs.__anext__())
        await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert free_blocks(engine) == before  # the cancel returned only after the abort freed them
        assert not engine.engine.has_unfinished_requests()

    asyncio.run(main())


def test_route_jobs_reach_the_anthropic_messages_api(engine, serving):
    handler = handler_for(engine, serving, stream_flush_ms=0)
    body = {"model": "tiny-gpt-oss", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    message, = run(handler, {"route": "/v1/messages", "body": body})
    assert message["type"] == "message" and message["usage"]["output_tokens"] <= 3
    outs = run(handler, {"route": "/v1/messages", "body": {**body, "stream": True}})
    text = "".join(outs)
    assert text.startswith("event: message_start\n") and "event: message_stop\n" in text
    failed, = run(handler, {"route": "/v1/messages", "body": {"messages": []}})
    assert json.loads(str(failed["error"]))["type"] == "invalid_request_error"  # Anthropic's error shape
