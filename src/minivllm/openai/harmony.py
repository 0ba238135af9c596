"""GPT-OSS output (harmony tokens) -> OpenAI fields, incrementally.

analysis channel -> reasoning, final (or a commentary preamble) -> content, a message addressed
``to=functions.NAME`` -> a tool call whose arguments are the message text. Streaming and
non-streaming feed the same parser (the latter all at once), so both paths agree by construction.

The model can emit anything, so malformed harmony never raises: what was parsed stands, the
parser skips ahead to the next ``<|start|>`` and resumes there.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import openai_harmony as oh

logger = logging.getLogger(__name__)

START, CHANNEL, MESSAGE, CONSTRAIN = 200006, 200005, 200008, 200003
RETURN = 200002  # <|return|>: the end of a final answer, gpt-oss's EOS
END_TOKENS = frozenset({200007, 200002, 200012})  # <|end|>, <|return|>, <|call|>
REASONING, CONTENT, TOOL_CALL = "reasoning", "content", "tool_call"


@dataclass
class OutputItem:
    """One assistant message of the output, in order."""

    kind: str  # REASONING | CONTENT | TOOL_CALL
    text: str = ""  # for a tool call: its JSON arguments
    name: str | None = None  # tool calls: the function name
    call_id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    done: bool = False  # no more text will come
    complete: bool = False  # ended by its end token, not cut off


# An event of one feed: ("start" | "delta" | "end", item index, delta text).
Event = tuple[str, int, str]


class HarmonyOutputParser:
    def __init__(self, encoding: oh.HarmonyEncoding, prefill: list[int] | tuple[int, ...] = (),
                 tools_enabled: bool = True) -> None:
        self._encoding = encoding
        self._parser = oh.StreamableParser(encoding, oh.Role.ASSISTANT)
        self._tools_enabled = tools_enabled
        self._current: int | None = None  # index of the item receiving text
        self._skipping = False  # after malformed output: ignore tokens up to the next <|start|>
        self.items: list[OutputItem] = []
        self.token_kinds: list[str | None] = []  # per generated token: the kind it added text to
        self._pending: list[Event] = []  # events of the prefill, handed out by the first feed
        for token in prefill:  # a forced header (tool_choice): parsed, but not generated output
            self._process(token, self._pending)

    def feed(self, token_ids: list[int]) -> list[Event]:
        events, self._pending = self._pending, []
        for token in token_ids:
            n = len(events)
            self._process(token, events)
            delta_kinds = [self.items[i].kind for kind, i, _ in events[n:] if kind == "delta"]
            self.token_kinds.append(delta_kinds[0] if delta_kinds else None)
        return events

    def finish(self) -> list[Event]:
        """End of output: a message cut off (e.g. at max_tokens) ends here, incomplete."""
        events, self._pending = self._pending, []
        self._end_current(events, complete=False)
        return events

    def cut_at_stop_string(self, events: list[Event], stop: str, keep: bool = False) -> None:
        """The engine stopped on `stop` and cut its text there, but this parser reads token ids: the
        stop string (and what followed it in the same token) is still in the open item. Cut it there
        too, and out of this feed's `events` (text streamed by earlier feeds stays as sent)."""
        if self._current is None:
            return
        item = self.items[self._current]
        deltas = [text for kind, i, text in events if kind == "delta" and i == self._current]
        # The engine's rule: only a match that ends in the last token's text counts.
        start = max(0, len(item.text) - len(deltas[-1] if deltas else "") - len(stop) + 1)
        at = item.text.find(stop, start)
        if at == -1:  # it spanned harmony headers: nothing of it is in this item's text
            return
        end = at + len(stop) if keep else at
        cut, item.text = len(item.text) - end, item.text[:end]
        for n in range(len(events) - 1, -1, -1):
            kind, i, text = events[n]
            if cut <= 0:
                break
            if kind == "delta" and i == self._current:
                kept = text[:max(0, len(text) - cut)]
                cut -= len(text) - len(kept)
                events[n] = (kind, i, kept)

    # ---- results ----------------------------------------------------------------------------
    def text_of(self, kind: str) -> str:
        return "".join(item.text for item in self.items if item.kind == kind)

    @property
    def tool_calls(self) -> list[OutputItem]:
        return [item for item in self.items if item.kind == TOOL_CALL]

    def num_tokens_of(self, kind: str) -> int:
        return sum(1 for k in self.token_kinds if k == kind)

    # ---- internals --------------------------------------------------------------------------
    def _process(self, token: int, events: list[Event]) -> None:
        if self._skipping and token != START:
            return
        if token == START and (self._skipping or self._parser.state != oh.StreamState.EXPECT_START):
            # Resync, or a new message cutting the last one short: the parser itself would take
            # this <|start|> for text of the unfinished message or header.
            self._end_current(events, complete=False)
            self._skipping = False
            self._parser = oh.StreamableParser(self._encoding, None)
        try:
            self._parser.process(token)
        except oh.HarmonyError as e:
            logger.debug("malformed harmony output (%s); resuming at the next <|start|>", e)
            self._end_current(events, complete=False)
            self._skipping = True
            return
        if token == MESSAGE and self._current is None:
            self._start_item(events)
        elif token in END_TOKENS:
            self._end_current(events, complete=True)
        elif self._current is not None:
            delta = self._parser.last_content_delta
            if delta:
                self.items[self._current].text += delta
                events.append(("delta", self._current, delta))

    def _start_item(self, events: list[Event]) -> None:
        recipient = self._parser.current_recipient
        channel = self._parser.current_channel
        if recipient and recipient.startswith("functions.") and self._tools_enabled:
            item = OutputItem(TOOL_CALL, name=recipient[len("functions."):])
        elif recipient or channel == "analysis":  # thinking, or a call to a tool we don't run
            item = OutputItem(REASONING)
        else:  # final, a commentary preamble, or no channel at all
            item = OutputItem(CONTENT)
        self.items.append(item)
        self._current = len(self.items) - 1
        events.append(("start", self._current, ""))

    def _end_current(self, events: list[Event], complete: bool) -> None:
        if self._current is None:
            return
        item = self.items[self._current]
        item.done, item.complete = True, complete
        events.append(("end", self._current, ""))
        self._current = None


def tool_choice_prefill(encoding: oh.HarmonyEncoding, function_name: str | None) -> list[int]:
    """Assistant header tokens that force a tool call: any function (None) or a named one.

    Without guided decoding this is how tool_choice "required" / named is honoured: the prompt
    already says the model is calling a function, in the form gpt-oss itself writes
    (``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``).
    """
    if function_name is None:  # stop before "." so the model writes ".name" the way it tokenizes
        return [CHANNEL] + encoding.encode("commentary to=functions", disallowed_special=())
    return ([CHANNEL] + encoding.encode(f"commentary to=functions.{function_name} ", disallowed_special=())
            + [CONSTRAIN] + encoding.encode("json", disallowed_special=()) + [MESSAGE])
