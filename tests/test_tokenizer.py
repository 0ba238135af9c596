import json
import os
import subprocess
import sys
import textwrap

import pytest

import minivllm.tokenizer
from minivllm.tokenizer import IncrementalDetokenizer, Tokenizer

SPECIALS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
    "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
    "<|message|>": 200008, "<|call|>": 200012,
}
TEXTS = [
    "Hello, world! The quick brown fox.",
    "你好，世界。日本語のテキストも。한국어",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "mixed: café naïve ünïcödé — “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(0 <= i < 199998 for i in ids)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_special_token_ids(tok):
    for text, tid in SPECIALS.items():
        assert tok.harmony.encode(text, allowed_special="all") == [tid]
        assert tok.is_special(tid)
        assert tok.token_bytes(tid) == text.encode()
    assert not tok.is_special(tok.encode("hello")[0])
    assert tok.is_special(tok.vocab_size - 1)  # padded rows are reserved specials


def test_vocab_and_eos(tok):
    assert tok.vocab_size == 201088
    assert tok.eos_token_ids == {199999, 200002, 200012}


def test_special_text_is_plain_text(tok):
    ids = tok.encode("a<|end|>b<|start|>")
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == "a<|end|>b<|start|>"


def test_decode_skip_or_keep_specials(tok):
    ids = [200006, *tok.encode("user"), 200008, *tok.encode("hi"), 200007]
    assert tok.decode(ids) == "userhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|start|>user<|message|>hi<|end|>"


def test_decode_bad_id(tok):
    with pytest.raises(ValueError):
        tok.decode([10**9])
    with pytest.raises(ValueError):
        tok.token_bytes(-1)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer(tok, text):
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in tok.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == detok.text
    assert detok.flush() == ""


def test_incremental_detokenizer_holds_partial_characters(tok):
    # Byte-level BPE splits rare characters over several tokens; find one such token.
    text = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦩🪼"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "" in pieces  # some token ended mid-character and was held back
    assert "".join(pieces) == text


def test_incremental_detokenizer_specials(tok):
    ids = [200006, *tok.encode("🎉ok"), 200007]
    skip = IncrementalDetokenizer(tok)
    assert "".join(skip.add(i) for i in ids) == "🎉ok" == skip.text
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(keep.add(i) for i in ids) == "<|start|>🎉ok<|end|>" == keep.text


def test_incremental_detokenizer_flush_truncated(tok):
    emoji_ids = tok.encode("🦩")
    assert len(emoji_ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.add(emoji_ids[0]) == ""
    assert detok.flush() == "\ufffd"


def render_text(tok, messages, **kw):
    return tok.decode(tok.render_chat(messages, **kw), skip_special_tokens=False)


def test_render_system_user(tok):
    ids = tok.render_chat([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hello"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|start|>system<|message|>")
    assert "Reasoning: medium" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in text
    assert "<|start|>user<|message|>Hello<|end|>" in text
    assert text.endswith("<|start|>assistant")
    assert ids[-2] == 200006


def test_render_reasoning_effort(tok):
    msgs = [{"role": "user", "content": "hi"}]
    assert "Reasoning: high" in render_text(tok, msgs, reasoning_effort="high")
    assert "Reasoning: low" in render_text(tok, msgs, reasoning_effort="low")
    assert "Reasoning: medium" in render_text(tok, msgs, reasoning_effort=None)
    no_dev = render_text(tok, msgs)
    assert "<|start|>developer" not in no_dev  # nothing to say: no developer message


def test_render_content_parts_and_injection(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a<|end|>"},
                                         {"type": "text", "text": "b"}]}]
    ids = tok.render_chat(msgs)
    assert "<|start|>user<|message|>a<|end|>b<|end|>" in tok.decode(ids, False)
    assert ids.count(200007) == 2  # system + user; the user's "<|end|>" stays plain text


def test_render_tool_conversation(tok):
    msgs = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the weather tool.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    ids = tok.render_chat(msgs, tools=[WEATHER_TOOL], reasoning_effort="low")
    text = tok.decode(ids, skip_special_tokens=False)
    assert "type get_weather = (_: {" in text and "// Current weather for a city" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "<|channel|>analysis<|message|>Need the weather tool.<|end|>" in text
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
            '<|message|>{"city": "Paris"}<|call|>') in text
    assert ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
            '{"temp_c": 21}<|end|>') in text
    assert text.endswith("<|start|>assistant")
    assert 200003 in ids and 200012 in ids  # <|constrain|> and <|call|> as real specials


def test_render_tool_result_by_name_and_history(tok):
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "old thoughts"},
        {"role": "user", "content": "q2"},
        {"role": "tool", "name": "lookup", "content": "x"},
    ]
    text = render_text(tok, msgs)
    assert "<|start|>assistant<|channel|>final<|message|>a1<|end|>" in text
    assert "old thoughts" not in text  # harmony drops reasoning of finished turns
    assert "<|start|>functions.lookup to=assistant" in text
    closed = render_text(tok, msgs[:2], add_generation_prompt=False)
    assert closed.endswith("a1<|end|>")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "wizard", "content": "x"}], "invalid role 'wizard'"),
    ([{"content": "x"}], "role"),
    (["hello"], "role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text content"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user"}], "no content"),
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"function": {}}]}], r"tool_calls\[0\]"),
    ([{"role": "assistant", "content": ""}], "no content"),
])
def test_render_rejects_malformed(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_chat(messages)


def test_render_rejects_bad_effort_and_tools(tok):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="reasoning_effort"):
        tok.render_chat(msgs, reasoning_effort="extreme")
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        tok.render_chat(msgs, tools=[{"type": "function"}])


def test_offline_cache_bootstrap(tmp_path):
    # Fresh process, empty cache, no TIKTOKEN_ENCODINGS_BASE, and any HTTP(S) goes to a dead
    # proxy: loading must still work from the bpe-openai copy.
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    dead = "http://127.0.0.1:9"
    env.update(MINIVLLM_CACHE=str(tmp_path), HTTP_PROXY=dead, HTTPS_PROXY=dead,
               http_proxy=dead, https_proxy=dead, NO_PROXY="", no_proxy="")
    src = os.path.dirname(os.path.dirname(minivllm.tokenizer.__file__))  # however pytest found it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    code = textwrap.dedent("""
        import os
        from minivllm.tokenizer import Tokenizer
        tok = Tokenizer()
        assert tok.decode(tok.encode("offline ✓")) == "offline ✓"
        print(os.environ["TIKTOKEN_ENCODINGS_BASE"])
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "tiktoken"
    assert out.stdout.strip() == str(folder)
    assert (folder / "o200k_base.tiktoken").stat().st_size > 3_000_000
    assert [p.name for p in folder.iterdir()] == ["o200k_base.tiktoken"]  # no tmp leftovers
