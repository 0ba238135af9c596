"""JobInput validation messages and BatchSize sequences (no engine)."""

import asyncio
import time

import pytest

from minivllm.sampling_params import SamplingParams
from minivllm.worker import BatchSize, JobInput, JobInputError, WorkerConfig
from minivllm.worker.batching import timed_batches

NAN = float("nan")

# (input, a part of the message the user must see)
MALFORMED = [
    (None, "job input must be a JSON object, got null"),
    ("Tell me a joke", "job input must be a JSON object, got a string"),
    ([{"prompt": "x"}], "job input must be a JSON object, got a list"),
    ({}, "needs a prompt (text) or messages (a chat), an openai_route or a route"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "either prompt or messages, not both"),
    ({"prompt": ""}, "prompt is empty"),
    ({"messages": []}, "messages is empty"),
    ({"prompt": 42}, "prompt must be a string, got 42"),
    ({"messages": "hello"}, 'messages must be a list of objects, got "hello"'),
    ({"messages": [{"role": "user", "content": "hi"}, 7]}, "messages[1] must be an object, got 7"),
    ({"prompt": "a", "sampling_params": [0.5]}, "sampling_params must be an object, got [0.5]"),
    ({"prompt": "a", "sampling_params": {"temprature": 0.5}}, "unknown sampling_params key 'temprature'"),
    ({"prompt": "a", "sampling_params": {"output_kind": 1}}, "unknown sampling_params key 'output_kind'"),
    ({"prompt": "a", "sampling_params": {"temperature": "hot"}}, 'sampling_params.temperature must be a number, got "hot"'),
    ({"prompt": "a", "sampling_params": {"max_tokens": 10.5}}, "sampling_params.max_tokens must be an integer, got 10.5"),
    ({"prompt": "a", "sampling_params": {"max_tokens": True}}, "sampling_params.max_tokens must be an integer, got true"),
    ({"prompt": "a", "sampling_params": {"n": "2"}}, 'sampling_params.n must be an integer, got "2"'),
    ({"prompt": "a", "sampling_params": {"stop": 5}}, "sampling_params.stop must be a string or a list of strings, got 5"),
    ({"prompt": "a", "sampling_params": {"stop_token_ids": [1, "x"]}}, 'sampling_params.stop_token_ids[1] must be an integer, got "x"'),
    ({"prompt": "a", "sampling_params": {"ignore_eos": "yes"}}, 'sampling_params.ignore_eos must be true or false, got "yes"'),
    ({"prompt": "a", "sampling_params": {"temperature": -1}}, "sampling_params: temperature must be >= 0, got -1"),
    ({"prompt": "a", "sampling_params": {"top_p": 0}}, "sampling_params: top_p must be in (0, 1], got 0"),
    ({"prompt": "a", "sampling_params": {"max_tokens": 0}}, "sampling_params: max_tokens must be an integer >= 1, got 0"),
    ({"prompt": "a", "sampling_params": {"min_tokens": 9, "max_tokens": 2}}, "min_tokens (9) must be <= max_tokens (2)"),
    ({"prompt": "a", "sampling_params": {"logprobs": 50}}, "logprobs must be an integer in [0, 20], got 50"),
    ({"prompt": "a", "sampling_params": {"temperature": NAN}}, "not valid JSON: it holds NaN or Infinity"),
    ({"prompt": "a", "extra": b"bytes"}, "not valid JSON: Object of type bytes is not JSON serializable"),
    ({"prompt": "a", "stream": "maybe"}, 'stream must be true or false, got "maybe"'),
    ({"prompt": "a", "max_batch_size": 0}, "max_batch_size: input should be greater than or equal to 1, got 0"),
    ({"prompt": "a", "min_batch_size": "many"}, 'min_batch_size must be an integer, got "many"'),
    ({"prompt": "a", "batch_size_growth_factor": -2}, "batch_size_growth_factor: input should be greater than 0"),
    ({"prompt": "a", "sampling_param": {"max_tokens": 5}}, "unknown input key 'sampling_param' (valid keys: prompt, messages"),
    ({"openai_route": "/v1/chat/completions", "messages": [{"role": "user", "content": "x"}]},
     "this one mixes native and openai keys: messages, openai_route"),
    ({"route": "/v1/models", "prompt": "x"}, "this one mixes native and route keys: prompt, route"),
    ({"route": "/v1/models", "openai_input": {}}, "mixes openai and route keys"),
    ({"body": {"prompt": "x"}}, "route must be a route such as"),
    ({"route": "/v1/models", "method": "PUT"}, "method must be GET, POST or DELETE, got 'PUT'"),
    ({"openai_input": {"messages": []}}, "openai_input needs openai_route"),
    ({"openai_route": 5}, "openai_route must be a string, got 5"),
    ({"openai_route": "/v1/completions", "openai_input": "prompt"}, 'openai_input must be an object, got "prompt"'),
]


def _message(raw) -> str:
    with pytest.raises(JobInputError) as info:
        JobInput.parse(raw).make_sampling_params()
    return str(info.value)


@pytest.mark.parametrize("raw,expected", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_input_gets_a_clear_message(raw, expected):
    message = _message(raw)
    assert expected in message
    assert "Traceback" not in message and "ValidationError" not in message and "pydantic" not in message


def test_at_least_twenty_malformed_inputs_are_covered():
    assert len(MALFORMED) >= 20


def test_valid_inputs_parse_like_worker_vllm():
    job = JobInput.parse({"prompt": "The capital of France is",
                          "sampling_params": {"max_tokens": 64, "temperature": 0.0, "stop": ["\n"]}})
    params = job.make_sampling_params()
    assert isinstance(params, SamplingParams) and params.max_tokens == 64 and params.stop_strings == ["\n"]
    assert not job.stream and job.openai_route is None

    # max_tokens defaults to 100 for native jobs; ints are fine where floats are expected
    params = JobInput.parse({"messages": [{"role": "user", "content": "hi"}],
                             "sampling_params": {"temperature": 1, "top_k": -1}}).make_sampling_params()
    assert params.max_tokens == 100 and params.temperature == 1.0 and params.top_k == 0

    # worker-vllm int()/float()-parsed the batch fields, so strings still work there
    job = JobInput.parse({"prompt": "x", "stream": True, "max_batch_size": "8", "min_batch_size": 2,
                          "batch_size_growth_factor": "1.5"})
    assert (job.max_batch_size, job.min_batch_size, job.batch_size_growth_factor) == (8, 2, 1.5)

    job = JobInput.parse({"openai_route": "/v1/models"})
    assert job.openai_route == "/v1/models" and job.openai_input is None


def test_batch_size_default_sequence():
    assert BatchSize(50, 1, 3).sizes(7) == [1, 3, 9, 27, 50, 50, 50]


def test_batch_size_float_growth_accumulates_exactly():
    assert BatchSize(10, 2, 1.5).sizes(7) == [2, 3, 5, 7, 10, 10, 10]  # 2, 3, 4.5, 6.75, 10.125
    assert BatchSize(100, 1, 2.5).sizes(6) == [1, 3, 7, 16, 40, 98]  # 2.5, 6.25, 15.6, 39.1, 97.7


@pytest.mark.parametrize("args", [(50, 1, 1.0), (50, 1, 0.5), (50, 50, 3), (5, 10, 3)])
def test_batch_size_fixed_unless_it_can_grow(args):
    sizes = BatchSize(*args)
    assert not sizes.is_dynamic
    assert sizes.sizes(3) == [args[0]] * 3


def test_job_fields_override_worker_defaults():
    config = WorkerConfig(default_batch_size=20, default_min_batch_size=2, default_batch_size_growth_factor=2)
    assert JobInput.parse({"prompt": "x"}).batch_size(config).sizes(5) == [2, 4, 8, 16, 20]
    job = JobInput.parse({"prompt": "x", "max_batch_size": 10, "min_batch_size": 1, "batch_size_growth_factor": 4})
    assert job.batch_size(config).sizes(4) == [1, 4, 10, 10]
    assert JobInput.parse({"prompt": "x", "max_batch_size": 6}).batch_size(config).sizes(4) == [2, 4, 6, 6]


def test_batch_size_env_spellings_both_read():
    for min_name, growth_name in [("DEFAULT_MIN_BATCH_SIZE", "DEFAULT_BATCH_SIZE_GROWTH_FACTOR"),
                                  ("MIN_BATCH_SIZE", "BATCH_SIZE_GROWTH_FACTOR")]:
        env = {"DEFAULT_BATCH_SIZE": "40", min_name: "2", growth_name: "2.5"}
        config = WorkerConfig.load(env, local_args_path="/nonexistent.json")
        assert JobInput.parse({"prompt": "x"}).batch_size(config).sizes(5) == [2, 5, 13, 32, 40]


async def _slow_source(delays):
    for i, delay in enumerate(delays):
        await asyncio.sleep(delay)
        yield i


def _collect(source, sizes, max_wait):
    async def main():
        out = []
        async for batch in timed_batches(source, sizes, lambda _: 1, max_wait):
            out.append((batch, time.monotonic()))
        return out
    return asyncio.run(main())


def test_time_limit_flushes_a_partial_batch():
    # Items 0.2 s apart, batches of 50: with a 20 ms limit each item goes out before the next
    # one arrives; without a limit all wait for the end.
    batches = _collect(_slow_source([0.2] * 4), BatchSize(50, 50, 1), 0.02)
    assert [b for b, _ in batches] == [[0], [1], [2], [3]]
    batches = _collect(_slow_source([0.01] * 4), BatchSize(50, 50, 1), None)
    assert [b for b, _ in batches] == [[0, 1, 2, 3]]


def test_time_limit_keeps_full_batches_and_growth():
    batches = _collect(_slow_source([0.0] * 13), BatchSize(50, 1, 3), 5.0)
    assert [len(b) for b, _ in batches] == [1, 3, 9]


def test_best_of_from_worker_vllm_docs_is_accepted_when_it_equals_n():
    job = JobInput.parse({"prompt": "hi", "sampling_params": {"n": 2, "best_of": 2}})
    assert job.make_sampling_params().n == 2
    with pytest.raises(JobInputError, match="best_of=3 is not supported"):
        JobInput.parse({"prompt": "hi", "sampling_params": {"best_of": 3}}).make_sampling_params()
