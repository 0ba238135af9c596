"""The harmony output parser on hand-made token sequences: one token at a time (streaming) and all
at once (non-streaming) must give the same items, and the same text as the stream's deltas."""

import openai_harmony as oh
import pytest

from minivllm.openai.harmony import (
    CONTENT,
    REASONING,
    TOOL_CALL,
    HarmonyOutputParser,
    tool_choice_prefill,
)
from minivllm.tokenizer import load_harmony

RETURN, CALL, END, START, ENDOFTEXT = 200002, 200012, 200007, 200006, 199999


@pytest.fixture(scope="module")
def enc():
    return load_harmony()


def msg(enc, text, channel, recipient=None, last=END):
    """An assistant message as the model writes it (no leading <|start|>assistant: the prompt has it)."""
    m = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient).with_content_type("<|constrain|>json")
    tokens = enc.render(m)
    assert tokens[0] == START
    return tokens[:-1] + [last]


def next_msg(enc, *args, **kwargs):
    """A following message: it does start with <|start|>assistant."""
    return msg(enc, *args, **kwargs)


def both_ways(enc, tokens, prefill=(), tools_enabled=True):
    """Parse token by token and in one go; assert they agree; return the items and stream text."""
    stream = HarmonyOutputParser(enc, list(prefill), tools_enabled)
    streamed: dict[int, str] = {}
    starts = []
    for t in tokens:
        for kind, i, text in stream.feed([t]):
            if kind == "start":
                starts.append(i)
            streamed[i] = streamed.get(i, "") + text
    stream.finish()
    whole = HarmonyOutputParser(enc, list(prefill), tools_enabled)
    whole.feed(tokens)
    whole.finish()
    summary = [(it.kind, it.name, it.text, it.complete) for it in whole.items]
    assert [(it.kind, it.name, it.text, it.complete) for it in stream.items] == summary
    assert starts == list(range(len(summary)))
    assert [streamed.get(i, "") for i in range(len(summary))] == [s[2] for s in summary]
    assert stream.token_kinds == whole.token_kinds and len(whole.token_kinds) == len(tokens)
    return summary, whole


def test_reasoning_then_final(enc):
    tokens = msg(enc, "The user wants 2+2.", "analysis")[2:] + next_msg(enc, "2 + 2 = 4.", "final", last=RETURN)
    items, parser = both_ways(enc, tokens)
    assert items == [(REASONING, None, "The user wants 2+2.", True), (CONTENT, None, "2 + 2 = 4.", True)]
    assert parser.text_of(CONTENT) == "2 + 2 = 4." and parser.text_of(REASONING) == "The user wants 2+2."
    # reasoning tokens are those that carried reasoning text, never the content's
    assert parser.num_tokens_of(REASONING) == len(enc.encode("The user wants 2+2.", allowed_special=set()))


def test_tool_call(enc):
    tokens = msg(enc, '{"city": "Paris"}', "commentary", "functions.get_weather", last=CALL)[2:]
    items, parser = both_ways(enc, tokens)
    assert items == [(TOOL_CALL, "get_weather", '{"city": "Paris"}', True)]
    assert parser.tool_calls[0].call_id.startswith("call_")


def test_tool_call_after_reasoning(enc):
    tokens = (msg(enc, "I should look it up.", "analysis")[2:]
              + next_msg(enc, '{"city": "Oslo"}', "commentary", "functions.get_weather", last=CALL))
    items, _ = both_ways(enc, tokens)
    assert items == [(REASONING, None, "I should look it up.", True),
                     (TOOL_CALL, "get_weather", '{"city": "Oslo"}', True)]


def test_two_tool_calls(enc):
    tokens = (msg(enc, '{"city": "Oslo"}', "commentary", "functions.get_weather", last=CALL)[2:]
              + next_msg(enc, '{"tz": "CET"}', "commentary", "functions.get_time", last=CALL))
    items, parser = both_ways(enc, tokens)
    assert [(k, n, t) for k, n, t, _ in items] == [(TOOL_CALL, "get_weather", '{"city": "Oslo"}'),
                                                   (TOOL_CALL, "get_time", '{"tz": "CET"}')]
    assert parser.tool_calls[0].call_id != parser.tool_calls[1].call_id


def test_preamble_is_content_and_builtin_tools_are_reasoning(enc):
    tokens = (msg(enc, "Let me check.", "commentary")[2:]
              + next_msg(enc, '{"q": "x"}', "analysis", "browser.search"))
    items, _ = both_ways(enc, tokens)
    assert [(k, t) for k, _, t, _ in items] == [(CONTENT, "Let me check."), (REASONING, '{"q": "x"}')]


def test_tool_calls_disabled_are_not_reported(enc):
    tokens = msg(enc, '{"city": "Paris"}', "commentary", "functions.get_weather", last=CALL)[2:]
    items, _ = both_ways(enc, tokens, tools_enabled=False)
    assert [k for k, *_ in items] == [REASONING]


def test_truncated_at_max_tokens(enc):
    full = msg(enc, "Thinking about a long problem here", "analysis")[2:]
    items, _ = both_ways(enc, full[:-2])  # cut inside the analysis text: it stands, incomplete
    assert items == [(REASONING, None, "Thinking about a long problem", False)]
    tool = msg(enc, '{"city": "Paris", "unit": "C"}', "commentary", "functions.get_weather", last=CALL)[2:]
    items, _ = both_ways(enc, tool[:-4])  # a tool call cut off: partial arguments, incomplete
    assert items[0][:2] == (TOOL_CALL, "get_weather") and items[0][3] is False
    items, _ = both_ways(enc, full[:2])  # cut inside the header: nothing to show
    assert items == []


def test_malformed_output_recovers_at_next_start(enc):
    first = msg(enc, "hmm", "analysis")[2:]
    junk = enc.encode(" stray words", allowed_special=set()) + [ENDOFTEXT]
    tokens = first + junk + next_msg(enc, "Answer.", "final", last=RETURN)
    items, parser = both_ways(enc, tokens)
    assert items == [(REASONING, None, "hmm", True), (CONTENT, None, "Answer.", True)]
    assert parser.token_kinds[len(first):len(first) + len(junk)] == [None] * len(junk)


def test_a_new_message_cuts_the_last_one_short(enc):
    cut = msg(enc, "thinking and then", "analysis")[2:-1]  # no <|end|>
    items, _ = both_ways(enc, cut + msg(enc, "Done.", "final", last=RETURN))
    assert items == [(REASONING, None, "thinking and then", False), (CONTENT, None, "Done.", True)]
    header_only = msg(enc, "x", "analysis")[2:4]  # "<|channel|>analysis", then a new message
    items, _ = both_ways(enc, header_only + msg(enc, "Done.", "final", last=RETURN))
    assert items == [(CONTENT, None, "Done.", True)]


def test_random_tokens_never_raise(enc):
    import random

    rng = random.Random(0)
    for _ in range(20):
        tokens = [rng.randrange(0, 201088) for _ in range(40)]
        both_ways(enc, tokens)  # no exception, streaming == non-streaming


def test_tool_choice_prefill_named_and_required(enc):
    named = tool_choice_prefill(enc, "get_weather")
    assert enc.decode(named) == "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    items, _ = both_ways(enc, enc.encode('{"city": "Rome"}', allowed_special=set()) + [CALL], prefill=named)
    assert items == [(TOOL_CALL, "get_weather", '{"city": "Rome"}', True)]
    required = tool_choice_prefill(enc, None)
    rest = enc.encode(".get_time <|constrain|>json<|message|>{}", allowed_special="all") + [CALL]
    items, _ = both_ways(enc, rest, prefill=required)
    assert items == [(TOOL_CALL, "get_time", "{}", True)]
