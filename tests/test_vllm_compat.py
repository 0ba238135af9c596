"""What vLLM users send, through the real `openai` SDK on a real server: logit_bias, vocabulary
checks naming the bad id, return_token_ids, cached-token usage."""

import time

import httpx
import openai
import pytest

from minivllm.openai import OpenAIServing
from minivllm.server.app import create_app

from conftest import serve_in_thread

MODEL = "tiny-compat"


@pytest.fixture(scope="module")
def client(engine):
    serving = OpenAIServing(engine, MODEL, max_model_len=engine.engine.max_model_len)
    with serve_in_thread(create_app(engine, serving)) as url:
        while httpx.get(url + "/ready").status_code != 200:
            time.sleep(0.05)
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy_completion(client, max_tokens: int = 6, **extra):
    return client.completions.create(model=MODEL, prompt="The weather today", max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True, **extra.pop("extra_body", {})}, **extra)


def token_ids_of(completion) -> list[int]:
    return completion.choices[0].model_extra["token_ids"]


def test_logit_bias_forces_and_bans_tokens(client):
    forced = 1000
    out = greedy_completion(client, logit_bias={str(forced): 100}, extra_body={"return_token_ids": True})
    assert token_ids_of(out) == [forced] * 6
    plain = token_ids_of(greedy_completion(client, extra_body={"return_token_ids": True}))
    banned = token_ids_of(greedy_completion(client, logit_bias={str(plain[0]): -100},
                                            extra_body={"return_token_ids": True}))
    assert banned[0] != plain[0]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logit_bias={str(forced): 100},
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    assert token_ids_of(chat) == [forced] * 4


def client_decode(client, ids):
    from minivllm.tokenizer import Tokenizer

    return Tokenizer().decode(ids)


@pytest.mark.parametrize("bias,expected", [
    ({"abc": 1}, "key 'abc' is not a token id"),
    ({"999999": 1}, "token id 999999 is out of vocabulary"),
    ({"-1": 1}, "token id -1 is out of vocabulary"),
])
def test_bad_logit_bias_is_a_400_naming_the_key(client, bias, expected):
    for create in (lambda: greedy_completion(client, logit_bias=bias),
                   lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                          max_tokens=2, logit_bias=bias)):
        with pytest.raises(openai.BadRequestError) as e:
            create()
        assert expected in e.value.body["message"]


def test_out_of_vocab_ids_are_400s_naming_the_id(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2, 300000], max_tokens=2)
    assert "token id 300000 is out of vocabulary" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        greedy_completion(client, extra_body={"stop_token_ids": [5, 250000]})
    assert "token id 250000 is out of vocabulary" in e.value.body["message"]


def test_return_token_ids_non_stream(client):
    prompt_ids = client_tokens("The weather today")
    out = greedy_completion(client, n=2, extra_body={"return_token_ids": True})
    for choice in out.choices:
        assert choice.model_extra["prompt_token_ids"] == prompt_ids
        assert len(choice.model_extra["token_ids"]) == 6
        assert client_decode(client, choice.model_extra["token_ids"]) == choice.text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    assert chat.model_extra["prompt_token_ids"][-2:] == client_tokens("<|start|>assistant", special=True)
    assert len(chat.choices[0].model_extra["token_ids"]) == chat.usage.completion_tokens == 5


def test_return_token_ids_stream_carries_every_token_once(client):
    stream = client.completions.create(model=MODEL, prompt="The weather today", max_tokens=7, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    assert chunks[0].choices[0].model_extra["prompt_token_ids"] == client_tokens("The weather today")
    streamed = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
    assert streamed == token_ids_of(greedy_completion(client, max_tokens=7, extra_body={"return_token_ids": True}))
    chat = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert chat[0].model_extra["prompt_token_ids"]
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in chat if c.choices) == 5


def test_usage_reports_cached_prompt_tokens(client):
    prompt = "a shared prefix that spans several kv blocks " * 8
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def client_tokens(text: str, special: bool = False) -> list[int]:
    from minivllm.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    return tokenizer.harmony.encode(text, allowed_special="all") if special else tokenizer.encode(text)


def test_prompt_logprobs_on_chat_and_completions(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    prompt_ids = chat.model_extra["prompt_token_ids"]
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token) in entry and len(entry) <= 3  # the prompt token plus the top 2
        assert {lp["rank"] for lp in entry.values()} >= {1, 2}
        assert all(lp["logprob"] <= 0 and isinstance(lp["decoded_token"], str) for lp in entry.values())
    out = greedy_completion(client, n=2, extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    for choice in out.choices:
        entries = choice.model_extra["prompt_logprobs"]
        ids = choice.model_extra["prompt_token_ids"]
        assert entries[0] is None and [list(e) for e in entries[1:]] == [[str(t)] for t in ids[1:]]
    with pytest.raises(openai.BadRequestError, match="not available when `stream=True`"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       stream=True, extra_body={"prompt_logprobs": 1})


def test_top_logprobs_edge_cases(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=0, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content or []
    assert all(entry.top_logprobs == [] for entry in content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logprobs=True, top_logprobs=21)
    out = greedy_completion(client, logprobs=0)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == 6 and all(len(top) == 1 for top in logprobs.top_logprobs)


PREFILLED = [{"role": "user", "content": "Finish my sentence."}, {"role": "assistant", "content": "The answer is"}]
FORCED = 1000  # logit_bias makes the random model write this token, so the reply is known


def chat(client, messages, **body):
    stream = body.pop("stream", False)
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                          logit_bias={str(FORCED): 100}, stream=stream,
                                          extra_body={"ignore_eos": True, "return_token_ids": True, **body})


def test_continue_final_message_continues_the_assistant_text(client):
    out = chat(client, PREFILLED, add_generation_prompt=False, continue_final_message=True)
    prompt = out.model_extra["prompt_token_ids"]
    opened = client_tokens("<|channel|>final<|message|>", special=True) + client_tokens("The answer is")
    start = client_tokens("<|start|>assistant", special=True)
    assert prompt[-len(opened) - 2:] == start + opened  # the message is left open: no <|end|>
    assert out.choices[0].message.content == client_decode(client, [FORCED] * 3)
    echoed = chat(client, PREFILLED, add_generation_prompt=False, continue_final_message=True, echo=True)
    assert echoed.choices[0].message.content == "The answer is" + client_decode(client, [FORCED] * 3)
    chunks = list(chat(client, PREFILLED, add_generation_prompt=False, continue_final_message=True, echo=True,
                       stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.content == "The answer is" and text == echoed.choices[0].message.content


def test_generation_prompt_options_and_their_errors(client):
    with pytest.raises(openai.BadRequestError, match="Cannot set both `continue_final_message` and "
                                                     "`add_generation_prompt` to True"):
        chat(client, PREFILLED, continue_final_message=True)
    with pytest.raises(openai.BadRequestError, match="last message to be an assistant message"):
        chat(client, PREFILLED[:1], add_generation_prompt=False, continue_final_message=True)
    bare = chat(client, PREFILLED[:1], add_generation_prompt=False).model_extra["prompt_token_ids"]
    full = chat(client, PREFILLED[:1]).model_extra["prompt_token_ids"]
    assert full == bare + client_tokens("<|start|>assistant", special=True)
    echo_user = chat(client, PREFILLED[:1], echo=True)  # the last message is not the reply's role: no echo
    assert echo_user.choices[0].message.content == chat(client, PREFILLED[:1]).choices[0].message.content
