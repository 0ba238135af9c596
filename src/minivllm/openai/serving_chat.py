"""POST /v1/chat/completions for GPT-OSS: messages -> harmony prompt -> engine -> harmony parse."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from minivllm.openai.base import ServingBase, random_id
from minivllm.openai.chat_template import ChatTemplate
from minivllm.openai.errors import bad_request
from minivllm.openai.harmony import (
    CHANNEL,
    CONTENT,
    MESSAGE,
    REASONING,
    RETURN,
    TOOL_CALL,
    Event,
    HarmonyOutputParser,
    tool_choice_prefill,
)
from minivllm.openai.logprobs import chat_logprobs, prompt_logprobs_json
from minivllm.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ResponseFormat,
    ToolCall,
    Usage,
)
from minivllm.outputs import CompletionOutput
from minivllm.sampling_params import SamplingParams


@dataclass
class ChatPrompt:
    token_ids: list[int]  # ends with the forced tool-call header or the continued message, if any
    prefill: list[int]  # that header: the output parser reads it first
    tools_enabled: bool
    echo: str = ""  # text the reply's content starts with (`echo`)


@dataclass
class ChoiceState:
    """One choice's progress; the streaming and non-streaming paths both fill it."""

    parser: HarmonyOutputParser
    keep_stop_str: bool = False  # include_stop_str_in_output
    # Stop tokens reported as EOS (stop_reason null, as vLLM does for the tokenizer's EOS): the route
    # adds them to stop_token_ids, which would otherwise make the engine name them.
    eos_ids: frozenset[int] = frozenset()
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    tool_index: dict[int, int] = field(default_factory=dict)  # output item index -> tool call index

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, c: CompletionOutput) -> list[Event]:
        """Take one output delta (never after finishing: the engine keeps reporting finished choices)."""
        events = self.parser.feed(c.token_ids)
        self.num_tokens += len(c.token_ids)
        self.token_ids.extend(c.token_ids)
        if c.logprobs:
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            if isinstance(c.stop_reason, str):  # a stop string: OpenAI leaves it out of the output
                self.parser.cut_at_stop_string(events, c.stop_reason, self.keep_stop_str)
            events += self.parser.finish()
            tools_called = c.finish_reason == "stop" and self.parser.tool_calls
            self.finish_reason = "tool_calls" if tools_called else c.finish_reason
            self.stop_reason = None if c.stop_reason in self.eos_ids else c.stop_reason
        return events


class ChatServing(ServingBase):
    def __init__(self, engine, model_name: str, max_model_len: int, *, response_role: str = "assistant",
                 force_include_usage: bool = False, chat_template: str | None = None, limits=None) -> None:
        super().__init__(engine, model_name, max_model_len, force_include_usage=force_include_usage, limits=limits)
        self.response_role = response_role
        self.chat_template = ChatTemplate(chat_template) if chat_template else None
        self._generation_prompt = self.harmony.encode("<|start|>assistant", allowed_special="all")

    # ---- prompt -----------------------------------------------------------------------------
    def render_prompt(self, messages: list[dict], *, tools: list[dict] | None, tool_choice: str | None,
                      named_tool: str | None, reasoning_effort: str | None,
                      response_format: ResponseFormat | None, add_generation_prompt: bool = True,
                      continue_final_message: bool = False, echo: bool = False) -> ChatPrompt:
        """tool_choice: "none" | "auto" | "required" | "named" (then `named_tool` is the function).

        continue_final_message: the last message (an assistant one) is rendered open, without its
        end token, and the parser starts inside it, so the reply continues its text."""
        opened: list[int] = []  # the open message's header (the parser reads it) ...
        opened_text: list[int] = []  # ... and its text so far
        echo_text = ""
        if continue_final_message:
            messages, opened, opened_text, echo_text = self._open_final_message(messages, tool_choice)
        elif echo and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == self.response_role:
            content = messages[-1].get("content")
            echo_text = content if isinstance(content, str) else ""
        tool_choice = tool_choice or ("auto" if tools else "none")
        if tool_choice in ("required", "named") and not tools:
            raise bad_request(f"tool_choice {tool_choice!r} needs a non-empty 'tools' list.", "tool_choice")
        if tool_choice == "named" and named_tool not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice names the function {named_tool!r}, which is not in 'tools'.",
                              "tool_choice")
        tools_enabled = tool_choice != "none" and bool(tools)
        messages = messages + _format_instructions(response_format)
        try:
            if self.chat_template is not None:
                text = self.chat_template.render(messages, tools if tools_enabled else None, reasoning_effort)
                token_ids = self.harmony.encode(text, allowed_special="all")
            else:
                token_ids = self.tokenizer.render_chat(messages, reasoning_effort=reasoning_effort,
                                                       tools=tools if tools_enabled else None)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        if not add_generation_prompt and not continue_final_message and token_ids[-2:] == self._generation_prompt:
            token_ids = token_ids[:-2]  # the model writes the next message's header itself
        prefill = opened
        if tool_choice in ("required", "named"):
            prefill = tool_choice_prefill(self.harmony, named_tool if tool_choice == "named" else None)
        return ChatPrompt(token_ids + prefill + opened_text, prefill, tools_enabled, echo_text if echo else "")

    def _open_final_message(self, messages: list[dict], tool_choice: str | None):
        """Split off the last message for continue_final_message: (the messages before it, its
        harmony header, its text's tokens, its text)."""
        last = messages[-1] if messages else None
        if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
            raise bad_request("continue_final_message needs the last message to be an assistant message "
                              "with text to continue.", "messages")
        if tool_choice in ("required", "named"):
            raise bad_request("continue_final_message cannot be combined with a forced tool_choice.", "tool_choice")
        content = last.get("content")
        reasoning = last.get("reasoning_content") or last.get("reasoning")
        text, channel = (content, "final") if content else (reasoning, "analysis")
        if not isinstance(text, str) or not text:
            raise bad_request("continue_final_message needs the last message to have string content "
                              "(or reasoning_content) to continue.", "messages")
        header = [CHANNEL] + self.harmony.encode(channel, disallowed_special=()) + [MESSAGE]
        return messages[:-1], header, self.tokenizer.encode(text), text

    def chat_sampling_params(self, req, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        stop_ids = list(req.stop_token_ids or []) + list(self.tokenizer.stop_ids)  # <|return|>, <|call|>
        return self.sampling_params(req, max_tokens, logprobs_name="top_logprobs", logprobs=logprobs,
                                    skip_special_tokens=False, stop_token_ids=stop_ids,
                                    prompt_logprobs=req.prompt_logprobs)

    # ---- the route --------------------------------------------------------------------------
    async def create(self, req: ChatCompletionRequest) -> dict | AsyncIterator[dict]:
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true.", "top_logprobs")
        self.check_tools(req.tools)
        named = req.tool_choice.function.name if not isinstance(req.tool_choice, (str, type(None))) else None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt = await asyncio.to_thread(  # O(input) work stays off the event loop
            self.render_prompt, req.messages, tools=tools, tool_choice="named" if named else req.tool_choice,
            named_tool=named, reasoning_effort=req.reasoning_effort, response_format=req.response_format,
            add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
            echo=req.echo)
        self.check_token_ids(prompt.token_ids, "messages")
        max_tokens = self.resolve_max_tokens(len(prompt.token_ids), req.max_completion_tokens or req.max_tokens,
                                             "messages")
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        params = self.chat_sampling_params(req, max_tokens, top_k)
        request_id = random_id("chatcmpl-")
        eos_ids = frozenset({RETURN}) - set(req.stop_token_ids or [])  # unless the user asked for it
        choices = [ChoiceState(HarmonyOutputParser(self.harmony, prompt.prefill, prompt.tools_enabled),
                               keep_stop_str=req.include_stop_str_in_output, eos_ids=eos_ids)
                   for _ in range(req.n)]
        if req.stream:
            return self._stream(request_id, prompt, params, choices, top_k, self.include_usage(req),
                                req.return_token_ids)
        return await self._complete(request_id, prompt, params, choices, top_k, req.return_token_ids)

    async def _complete(self, request_id: str, prompt: ChatPrompt, params: SamplingParams,
                        choices: list[ChoiceState], top_k: int | None, return_token_ids: bool) -> dict:
        cached, prompt_logprobs = 0, None
        async with aclosing(self.generate(prompt.token_ids, params, request_id)) as stream:
            async for out in stream:
                cached, prompt_logprobs = out.num_cached_tokens, out.prompt_logprobs or prompt_logprobs
                for c in out.outputs:
                    if not choices[c.index].finished:
                        choices[c.index].add(c)
        result = []
        for i, st in enumerate(choices):
            p = st.parser
            calls = [ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.text))
                     for item in p.tool_calls]
            content = p.text_of(CONTENT)
            content = prompt.echo + content if prompt.echo else content
            message = ChatMessage(role=self.response_role, content=content or (None if calls else ""),
                                  reasoning_content=p.text_of(REASONING) or None, tool_calls=calls)
            result.append(ChatChoice(index=i, message=message, finish_reason=st.finish_reason,
                                     stop_reason=st.stop_reason,
                                     logprobs=self._logprobs(st, 0, st.num_tokens, top_k)))
        response = ChatCompletionResponse(id=request_id, model=self.model_name, choices=result,
                                          usage=self._usage(prompt, choices, cached)).model_dump()
        if params.prompt_logprobs is not None:  # vLLM's extra field
            response["prompt_logprobs"] = prompt_logprobs_json(prompt_logprobs)
        if return_token_ids:  # vLLM's extra fields
            response["prompt_token_ids"] = prompt.token_ids
            for choice, st in zip(response["choices"], choices):
                choice["token_ids"] = st.token_ids
        return response

    async def _stream(self, request_id: str, prompt: ChatPrompt, params: SamplingParams,
                      choices: list[ChoiceState], top_k: int | None, include_usage: bool,
                      return_token_ids: bool) -> AsyncIterator[dict]:
        created = int(time.time())

        def chunk(choice: ChatChunkChoice | None, usage: Usage | None = None, token_ids=None) -> dict:
            c = ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                    choices=[choice] if choice else [], usage=usage)
            body = c.model_dump(exclude=None if include_usage else {"usage"})
            if token_ids is not None:
                body["choices"][0]["token_ids"] = token_ids
            return body

        for i in range(len(choices)):
            first = chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role=self.response_role, content=prompt.echo)),
                          token_ids=[] if return_token_ids else None)
            if return_token_ids:
                first["prompt_token_ids"] = prompt.token_ids
            yield first
        cached = 0
        async with aclosing(self.generate(prompt.token_ids, params, request_id)) as stream:
            async for out in stream:
                cached = out.num_cached_tokens
                for c in out.outputs:
                    st = choices[c.index]
                    if st.finished:
                        continue
                    start = st.num_tokens
                    delta = self._delta(st, st.add(c))
                    logprobs = self._logprobs(st, start, st.num_tokens, top_k)
                    new_ids = st.token_ids[start:] if return_token_ids else None
                    if delta is None and st.finish_reason is None and not (logprobs and logprobs.content) \
                            and not new_ids:
                        continue
                    yield chunk(ChatChunkChoice(index=c.index, delta=delta or DeltaMessage(), logprobs=logprobs,
                                                finish_reason=st.finish_reason, stop_reason=st.stop_reason),
                                token_ids=new_ids)
        if include_usage:
            yield chunk(None, self._usage(prompt, choices, cached))

    # ---- pieces -----------------------------------------------------------------------------
    @staticmethod
    def _delta(st: ChoiceState, events: list[Event]) -> DeltaMessage | None:
        content, reasoning, calls = [], [], []
        for kind, idx, text in events:
            item = st.parser.items[idx]
            if item.kind == TOOL_CALL:
                if kind == "start":
                    st.tool_index[idx] = len(st.tool_index)
                    calls.append(DeltaToolCall(index=st.tool_index[idx], id=item.call_id, type="function",
                                               function=DeltaFunctionCall(name=item.name, arguments="")))
                elif kind == "delta":
                    if calls and calls[-1].index == st.tool_index[idx]:
                        calls[-1].function.arguments += text
                    else:
                        calls.append(DeltaToolCall(index=st.tool_index[idx],
                                                   function=DeltaFunctionCall(arguments=text)))
            elif kind == "delta":
                (content if item.kind == CONTENT else reasoning).append(text)
        if not (content or reasoning or calls):
            return None
        return DeltaMessage(content="".join(content) if content else None,
                            reasoning_content="".join(reasoning) if reasoning else None,
                            tool_calls=calls or None)

    def _logprobs(self, st: ChoiceState, start: int, end: int, top_k: int | None) -> ChoiceLogprobs | None:
        """Logprobs of the content tokens in [start, end) (reasoning and harmony headers are not content)."""
        if top_k is None:
            return None
        kinds = st.parser.token_kinds
        picked = [i for i in range(start, end) if kinds[i] == CONTENT]
        return ChoiceLogprobs(content=chat_logprobs(self.tokenizer, [st.token_ids[i] for i in picked],
                                                    [st.logprobs[i] for i in picked], top_k))

    @staticmethod
    def _usage(prompt: ChatPrompt, choices: list[ChoiceState], cached: int) -> Usage:
        return Usage.of(len(prompt.token_ids), sum(st.num_tokens for st in choices), cached,
                        reasoning=sum(st.parser.num_tokens_of(REASONING) for st in choices))


def _format_instructions(fmt: ResponseFormat | None) -> list[dict]:
    """response_format as developer instructions (harmony's "# Response Formats" section)."""
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [{"role": "developer", "content": "# Response Formats\n\nRespond with a single JSON object only."}]
    schema = fmt.json_schema
    desc = f"// {schema.description}\n" if schema.description else ""
    return [{"role": "developer",
             "content": f"# Response Formats\n\n## {schema.name}\n\n{desc}{json.dumps(schema.json_schema)}"}]
