"""Anthropic's Messages API on the chat path: same harmony rendering, sampling, engine stream and parser.

    POST /v1/messages               -> a Message, or (stream) Anthropic's event sequence
    POST /v1/messages/count_tokens  -> {"input_tokens": N}, N = the prompt /v1/messages would run

Mapping: `system` -> developer instructions; text -> user / final; `thinking` blocks <-> the analysis
channel; `tool_use` <-> a harmony call to functions.NAME; `tool_result` -> a tool message;
tool_choice auto / any / tool / none -> chat's auto / required / named / none; a conversation that
ends with an assistant turn is continued (prefill); output_config.effort is harmony's reasoning
effort. Accepted and unused: `thinking` (gpt-oss always reasons), a tool_result's `is_error`,
disable_parallel_tool_use (one call per turn anyway). Every error is an AnthropicError, in
Anthropic's shape, before the stream starts or as an `error` event within it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import ValidationError

from minivllm.anthropic.errors import AnthropicError
from minivllm.anthropic.protocol import (
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessagesRequest,
    MessagesResponse,
    TextBlock,
    ThinkingBlock,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolUseBlock,
    Usage,
)
from minivllm.openai.base import random_id
from minivllm.openai.errors import OpenAIError, bad_request
from minivllm.openai.harmony import REASONING, RETURN, TOOL_CALL, HarmonyOutputParser, OutputItem
from minivllm.openai.protocol import JsonSchemaFormat, ResponseFormat, SamplingRequest
from minivllm.openai.serving_chat import ChatPrompt, ChatServing, ChoiceState

logger = logging.getLogger(__name__)

ROUTES = ("/messages", "/messages/count_tokens")
_EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


class AnthropicServing:
    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def handle(self, path: str, body: dict | None) -> dict | AsyncIterator[dict]:
        """`path`: one of ROUTES. Any error leaves as an AnthropicError."""
        count = path == "/messages/count_tokens"
        try:
            if not isinstance(body, dict) or not body:
                raise bad_request(f"{path[1:]} needs a JSON object as the request body.")
            try:
                req = (CountTokensRequest if count else MessagesRequest).model_validate(body)
            except ValidationError as e:
                raise OpenAIError.from_validation_error(e) from None
            if req.model_extra:
                logger.debug("ignoring unsupported request fields: %s", sorted(req.model_extra))
            return await (self.count_tokens(req) if count else self.create(req))
        except OpenAIError as e:
            raise AnthropicError.of(e) from None

    async def count_tokens(self, req: CountTokensRequest) -> dict:
        prompt = await self._prompt(req)
        return CountTokensResponse(input_tokens=len(prompt.token_ids)).model_dump()

    async def create(self, req: MessagesRequest) -> dict | AsyncIterator[dict]:
        chat = self.chat
        prompt = await self._prompt(req)
        max_tokens = chat.resolve_max_tokens(len(prompt.token_ids), req.max_tokens, "messages")
        sampling = SamplingRequest(stop=req.stop_sequences, temperature=req.temperature, top_p=req.top_p,
                                   top_k=req.top_k, stream=req.stream)
        params = chat.chat_sampling_params(sampling, max_tokens)
        run = _Run(random_id("msg_"), chat.model_name, len(prompt.token_ids),
                   ChoiceState(HarmonyOutputParser(chat.harmony, prompt.prefill, prompt.tools_enabled),
                               eos_ids=frozenset({RETURN})))
        outputs = chat.generate(prompt.token_ids, params, run.message_id)
        if req.stream:
            return run.stream(outputs)
        async with aclosing(outputs):
            async for out in outputs:
                if not run.state.finished:
                    run.state.add(out.outputs[0])
        return run.message().model_dump()

    async def _prompt(self, req: CountTokensRequest) -> ChatPrompt:
        chat = self.chat
        chat.check_model(req.model)
        chat.check_tools(req.tools)
        messages = to_chat_messages(req.system, req.messages)
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.input_schema}} for t in req.tools or []]
        choice = req.tool_choice
        tool_choice = ("none" if isinstance(choice, ToolChoiceNone) else "required" if isinstance(choice, ToolChoiceAny)
                       else "named" if isinstance(choice, ToolChoiceTool) else None)
        last = messages[-1] if messages else {}
        continued = last.get("role") == "assistant" and not last.get("tool_calls")  # prefill: continue it
        config = req.output_config
        fmt = config.format if config else None
        prompt = await asyncio.to_thread(  # O(input) work stays off the event loop
            chat.render_prompt, messages, tools=tools or None, tool_choice=tool_choice,
            named_tool=choice.name if isinstance(choice, ToolChoiceTool) else None,
            reasoning_effort=_EFFORT[config.effort] if config and config.effort else None,
            response_format=fmt and ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
                schema=fmt.json_schema)),
            add_generation_prompt=not continued, continue_final_message=continued)
        chat.check_token_ids(prompt.token_ids, "messages")
        return prompt


class _Run:
    """One message being generated: its content blocks are the parser's items, in order."""

    def __init__(self, message_id: str, model: str, num_prompt_tokens: int, state: ChoiceState) -> None:
        self.message_id, self.model, self.num_prompt_tokens, self.state = message_id, model, num_prompt_tokens, state
        self.signatures: dict[int, str] = {}  # thinking block index -> its (opaque) signature

    def message(self, started: bool = False) -> MessagesResponse:
        """The message as it ends, or as `message_start` announces it (no content, no stop reason)."""
        st = self.state
        stop_reason, stop_sequence = (None, None) if started else self.stop()
        content = [] if started else [self.block(i) for i in range(len(st.parser.items))]
        return MessagesResponse(id=self.message_id, model=self.model, content=content, stop_reason=stop_reason,
                                stop_sequence=stop_sequence, usage=self.usage(0 if started else st.num_tokens))

    def stop(self) -> tuple[str | None, str | None]:
        st = self.state
        if st.finish_reason == "tool_calls":
            return "tool_use", None
        if st.finish_reason == "length":
            return "max_tokens", None
        if st.finish_reason == "stop":
            if isinstance(st.stop_reason, str):
                return "stop_sequence", st.stop_reason
            return "end_turn", None
        return None, None  # aborted (the server is draining)

    def usage(self, output_tokens: int) -> Usage:
        return Usage(input_tokens=self.num_prompt_tokens, output_tokens=output_tokens)

    def block(self, index: int, started: bool = False) -> TextBlock | ThinkingBlock | ToolUseBlock:
        item: OutputItem = self.state.parser.items[index]
        if item.kind == REASONING:
            signature = self.signatures.setdefault(index, random_id(""))
            return ThinkingBlock(thinking="" if started else item.text, signature="" if started else signature)
        if item.kind == TOOL_CALL:
            return ToolUseBlock(id=item.call_id, name=item.name, input={} if started else _arguments(item))
        return TextBlock(text="" if started else item.text)

    async def stream(self, outputs: AsyncIterator) -> AsyncIterator[dict]:
        """message_start, per block content_block_start / _delta... / _stop, message_delta, message_stop;
        an error on the way is an `error` event (and the last one)."""
        yield {"type": "message_start", "message": self.message(started=True).model_dump()}
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    if self.state.finished:
                        continue
                    for kind, index, text in self.state.add(out.outputs[0]):
                        for event in self.block_events(kind, index, text):
                            yield event
        except OpenAIError as e:
            yield AnthropicError.of(e).to_dict()
            return
        except Exception as e:  # noqa: BLE001 -- the client gets an error event, not a cut stream
            logger.exception("message stream %s failed", self.message_id)
            yield AnthropicError(f"Internal server error: {type(e).__name__}", 500).to_dict()
            return
        stop_reason, stop_sequence = self.stop()
        yield {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": self.usage(self.state.num_tokens).model_dump()}
        yield {"type": "message_stop"}

    def block_events(self, kind: str, index: int, text: str) -> list[dict]:
        item = self.state.parser.items[index]
        if kind == "start":
            block = self.block(index, started=True).model_dump()
            return [{"type": "content_block_start", "index": index, "content_block": block}]
        if kind == "delta":
            if not text:
                return []
            delta = ({"type": "thinking_delta", "thinking": text} if item.kind == REASONING
                     else {"type": "input_json_delta", "partial_json": text} if item.kind == TOOL_CALL
                     else {"type": "text_delta", "text": text})
            return [{"type": "content_block_delta", "index": index, "delta": delta}]
        events = []
        if item.kind == REASONING:
            signature = self.signatures.setdefault(index, random_id(""))
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": signature}})
        return events + [{"type": "content_block_stop", "index": index}]


def _arguments(item: OutputItem) -> dict:
    """A tool call's input: the model's JSON arguments (malformed or not an object: {})."""
    try:
        value = json.loads(item.text) if item.text.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        logger.warning("tool call %s: arguments are not a JSON object: %.200r", item.name, item.text)
        return {}
    return value


def to_chat_messages(system: str | list[TextBlock] | None, messages: list[Message]) -> list[dict]:
    """Anthropic `system` + `messages` as chat messages for ChatServing.render_prompt."""
    out: list[dict] = []
    if system:
        out.append({"role": "system",
                    "content": system if isinstance(system, str) else "\n\n".join(b.text for b in system)})
    for i, msg in enumerate(messages):
        blocks = [TextBlock(text=msg.content)] if isinstance(msg.content, str) else msg.content
        where = f"messages[{i}]"
        if msg.role == "user":
            out.extend(_user_messages(blocks, where))
        else:
            out.extend(_assistant_message(blocks, where))
    return out


def _user_messages(blocks: list, where: str) -> list[dict]:
    """Text -> user messages, tool_result -> tool messages, in their order."""
    out, text = [], []
    for j, block in enumerate(blocks):
        if block.type == "text":
            text.append(block.text)
        elif block.type == "tool_result":
            if text:
                out.append({"role": "user", "content": "\n\n".join(text)})
                text = []
            content = block.content
            text_of = "\n\n".join(b.text for b in content) if isinstance(content, list) else content or ""
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text_of})
        else:
            raise bad_request(f"{where}.content[{j}]: a user message cannot hold a {block.type!r} block.", "messages")
    if text or not out:
        out.append({"role": "user", "content": "\n\n".join(text)})
    return out


def _assistant_message(blocks: list, where: str) -> list[dict]:
    """thinking -> reasoning, text -> content, tool_use -> tool calls (harmony renders them in that order)."""
    reasoning, text, calls = [], [], []
    for j, block in enumerate(blocks):
        if block.type == "text":
            text.append(block.text)
        elif block.type == "thinking":
            reasoning.append(block.thinking)
        elif block.type == "tool_use":
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif block.type != "redacted_thinking":
            raise bad_request(f"{where}.content[{j}]: an assistant message cannot hold a {block.type!r} block.",
                              "messages")
    if not (reasoning or any(text) or calls):
        return []  # an empty turn (e.g. cut off at once) says nothing
    return [{"role": "assistant", "content": "\n\n".join(text) or None,
             "reasoning_content": "\n\n".join(reasoning) or None, "tool_calls": calls}]
