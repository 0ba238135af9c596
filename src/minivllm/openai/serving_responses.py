"""The Responses API over the chat path (same prompt rendering, same parser), with a response store.

POST /v1/responses creates; with `store` (the default) the response is kept, so GET
/v1/responses/{id} returns it and `previous_response_id` continues its conversation (its input and
output items, then the new input; its `instructions` are not carried over, as in OpenAI).
`background: true` returns at once (status `queued`) and runs in a task that POST
/v1/responses/{id}/cancel cancels, aborting the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from minivllm.openai.base import random_id
from minivllm.openai.errors import OpenAIError, bad_request, not_found
from minivllm.openai.harmony import (
    CONTENT,
    REASONING,
    TOOL_CALL,
    HarmonyOutputParser,
    OutputItem,
)
from minivllm.openai.protocol import JsonSchemaFormat, ResponseFormat
from minivllm.openai.response_store import ResponseStore, StoredResponse
from minivllm.openai.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesNamedTool,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
)
from minivllm.openai.serving_chat import ChatServing, ChoiceState

logger = logging.getLogger(__name__)

_ID_PREFIX = {REASONING: "rs_", CONTENT: "msg_", TOOL_CALL: "fc_"}
_RUNNING = ("queued", "in_progress")


class ResponsesServing:
    def __init__(self, chat: ChatServing, store: ResponseStore | None = None) -> None:
        self.chat = chat
        self.store = store if store is not None else ResponseStore()

    # ---- POST /v1/responses -----------------------------------------------------------------
    async def create(self, req: ResponsesRequest) -> dict | AsyncIterator[dict]:
        chat = self.chat
        chat.check_model(req.model)
        store = req.store is not False
        if req.background and not store:
            raise bad_request("background mode needs store: true (a background response is only reachable "
                              "through the store).", "background")
        if req.n != 1:
            raise bad_request("the Responses API produces one output; use n with chat completions.", "n")
        conversation = self._history(req.previous_response_id) + input_items(req.input)
        named = req.tool_choice.name if isinstance(req.tool_choice, ResponsesNamedTool) else None
        chat.check_tools(req.tools)
        tools = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                 for t in req.tools or []]
        prompt = await asyncio.to_thread(  # O(input) work stays off the event loop
            chat.render_prompt, input_to_messages(req.instructions, conversation), tools=tools or None,
            tool_choice="named" if named else req.tool_choice, named_tool=named,
            reasoning_effort=req.reasoning.effort if req.reasoning else None,
            response_format=_response_format(req.text))
        chat.check_token_ids(prompt.token_ids, "input")
        max_tokens = chat.resolve_max_tokens(len(prompt.token_ids), req.max_output_tokens, "input",
                                             "max_output_tokens")
        params = chat.chat_sampling_params(req, max_tokens)
        run = _Run(req, random_id("resp_"), chat.model_name, tools,
                   ChoiceState(HarmonyOutputParser(chat.harmony, prompt.prefill, prompt.tools_enabled),
                               keep_stop_str=req.include_stop_str_in_output),
                   len(prompt.token_ids))
        stream = chat.generate(prompt.token_ids, params, run.response_id)
        entry = StoredResponse(run.response("queued").model_dump(), background=bool(req.background),
                               items=conversation) if store else None
        if req.background:
            return self._start_background(run, stream, entry)
        on_end = (lambda final: self._save(entry, final)) if entry is not None else None
        if req.stream:
            return run.stream(stream, on_end)
        async with aclosing(run.stream(stream, on_end)) as events:
            async for _ in events:
                pass
        return run.final.model_dump()

    def _history(self, previous_response_id: str | None) -> list[dict]:
        if not previous_response_id:
            return []
        entry = self.store.get(previous_response_id)
        if entry is None:
            raise OpenAIError(f"Previous response with id '{previous_response_id}' not found.", 400,
                              param="previous_response_id", code="previous_response_not_found")
        if entry.response["status"] in _RUNNING:
            raise bad_request(f"Previous response with id '{previous_response_id}' is still in progress.",
                              "previous_response_id")
        return list(entry.items or [])

    def _save(self, entry: StoredResponse, final: ResponseObject) -> None:
        """Keep the ended response, and its conversation for a next turn (input items, then output)."""
        if entry.response["status"] not in _RUNNING:  # ended already (a cancel racing the end)
            return
        entry.response = final.model_dump()
        entry.items = entry.items + entry.response["output"]
        self.store.put(entry)

    # ---- background -------------------------------------------------------------------------
    def _start_background(self, run: _Run, stream: AsyncIterator, entry: StoredResponse) -> dict | AsyncIterator:
        if run.req.stream:
            entry.events = []
        entry.task = asyncio.create_task(self._run_background(run, stream, entry))
        self.store.put(entry)
        return self._follow(entry, entry.events) if run.req.stream else entry.response

    async def _run_background(self, run: _Run, stream: AsyncIterator, entry: StoredResponse) -> None:
        entry.response = run.response("in_progress").model_dump()
        try:
            async with aclosing(run.stream(stream, lambda final: self._save(entry, final))) as events:
                async for event in events:
                    entry.publish(event)
        except asyncio.CancelledError:  # cancel(): the engine request is aborted (KV freed) by now
            self._save(entry, run.response("cancelled"))
        except Exception as e:  # a background failure is the response's status, not an exception
            if not isinstance(e, OpenAIError):
                logger.exception("background response %s failed", run.response_id)
            message = e.message if isinstance(e, OpenAIError) else f"Internal server error: {type(e).__name__}"
            final = run.response("failed")
            final.error = {"code": "server_error", "message": message}
            self._save(entry, final)
        finally:
            entry.events = None  # the reader holds its own reference
            entry.publish()

    @staticmethod
    async def _follow(entry: StoredResponse, events: list[dict]) -> AsyncIterator[dict]:
        """A streamed background run's events; closing this stream leaves the run going."""
        sent = 0
        while True:
            changed = entry.changed
            while sent < len(events):
                yield events[sent]
                sent += 1
            if not entry.running:
                return
            await changed.wait()

    # ---- /v1/responses/{id}[/cancel] ----------------------------------------------------------
    async def handle(self, rest: str, body: dict | None, method: str | None = None) -> dict:
        """GET (no body) /responses/{id}, POST /responses/{id}/cancel, DELETE /responses/{id}."""
        response_id, _, action = rest.partition("/")
        if action == "cancel" and method in (None, "POST"):
            return await self.cancel(response_id)
        if not action and method == "DELETE":
            return await self.delete(response_id)
        if not action and not body and method in (None, "GET"):
            return self.retrieve(response_id)
        raise not_found(f"Unknown route {method or ''} /responses/{rest}: this server serves GET "
                        f"/v1/responses/{{id}}, POST /v1/responses/{{id}}/cancel and DELETE /v1/responses/{{id}}.",
                        code="unknown_url")

    def _entry(self, response_id: str) -> StoredResponse:
        entry = self.store.get(response_id)
        if entry is None:
            raise not_found(f"Response with id '{response_id}' not found.")
        return entry

    def retrieve(self, response_id: str) -> dict:
        return self._entry(response_id).response

    async def cancel(self, response_id: str) -> dict:
        """Cancel a background response; returns once its engine request is aborted (KV freed)."""
        entry = self._entry(response_id)
        if not entry.background:
            raise bad_request("Cannot cancel a synchronous response.")
        if entry.running:
            entry.task.cancel()
            await asyncio.wait({entry.task})  # (not gather: our own caller leaving must not cancel it twice)
        if entry.response["status"] in _RUNNING:  # cancelled before its task started
            entry.response = entry.response | {"status": "cancelled"}
            self.store.put(entry)
        return entry.response

    async def delete(self, response_id: str) -> dict:
        entry = self._entry(response_id)
        if entry.running:
            await self.cancel(response_id)
        self.store.pop(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


class _Run:
    """One response: its id, its output items (one per harmony message) and the event sequence."""

    def __init__(self, req: ResponsesRequest, response_id: str, model: str, tools: list[dict],
                 state: ChoiceState, num_prompt_tokens: int) -> None:
        self.req, self.response_id, self.model, self.tools = req, response_id, model, tools
        self.state = state
        self.num_prompt_tokens = num_prompt_tokens
        self.cached = 0
        self.created_at = int(time.time())
        self.item_ids: list[str] = []
        self.sequence_number = 0
        self.final: ResponseObject | None = None

    def response(self, status: str | None = None) -> ResponseObject:
        """The response as it stands: ended (status None: completed or incomplete), or `status`."""
        req, st = self.req, self.state
        incomplete = st.finish_reason == "length"
        if status is None:
            status = "incomplete" if incomplete else "completed"
        done = status not in _RUNNING
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, ResponsesNamedTool) else (
            req.tool_choice or "auto")
        usage = None
        if done:
            out_tokens = st.num_tokens
            usage = ResponseUsage(
                input_tokens=self.num_prompt_tokens, output_tokens=out_tokens,
                total_tokens=self.num_prompt_tokens + out_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=self.cached),
                output_tokens_details=OutputTokensDetails(reasoning_tokens=st.parser.num_tokens_of(REASONING)))
        return ResponseObject(
            id=self.response_id, created_at=self.created_at, status=status, background=bool(req.background),
            model=self.model,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if done and incomplete else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            output=[self.item(i) for i in range(len(st.parser.items))] if done else [],
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id, store=req.store is not False,
            temperature=req.temperature, top_p=req.top_p, tool_choice=tool_choice,
            tools=[t["function"] | {"type": "function"} for t in self.tools], usage=usage, metadata=req.metadata)

    def item(self, index: int, added: bool = False):
        """Output item `index`: empty as first announced (`added`), else as it stands."""
        item: OutputItem = self.state.parser.items[index]
        while len(self.item_ids) <= index:
            kind = self.state.parser.items[len(self.item_ids)].kind
            self.item_ids.append(random_id(_ID_PREFIX[kind]))
        item_id = self.item_ids[index]
        status = "in_progress" if added or not item.done else ("completed" if item.complete else "incomplete")
        if item.kind == REASONING:
            return ReasoningItem(id=item_id, status=status, content=[] if added else [ReasoningText(text=item.text)])
        if item.kind == CONTENT:
            return MessageItem(id=item_id, status=status, content=[] if added else [OutputText(text=item.text)])
        return FunctionCallItem(id=item_id, status=status, call_id=item.call_id, name=item.name,
                                arguments="" if added else item.text)

    def event(self, type: str, **fields) -> dict:
        event = {"type": type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    async def stream(self, stream: AsyncIterator,
                     on_end: Callable[[ResponseObject], None] | None = None) -> AsyncIterator[dict]:
        """The event sequence; every item and part opened is closed before the last event, and
        `on_end` gets the final response before that event is sent."""
        yield self.event("response.created", response=self.response("in_progress").model_dump())
        yield self.event("response.in_progress", response=self.response("in_progress").model_dump())
        async with aclosing(stream):
            async for out in stream:
                self.cached = out.num_cached_tokens
                if self.state.finished:
                    continue
                for kind, index, text in self.state.add(out.outputs[0]):
                    for event in self.item_events(kind, index, text):
                        yield event
        self.final = final = self.response()
        if on_end is not None:
            on_end(final)
        yield self.event(f"response.{final.status}", response=final.model_dump())

    def item_events(self, kind: str, index: int, text: str) -> list[dict]:
        item = self.state.parser.items[index]
        where = {"output_index": index}
        if kind == "start":
            events = [self.event("response.output_item.added", item=self.item(index, added=True).model_dump(),
                                 **where)]
            if item.kind != TOOL_CALL:
                events.append(self.event("response.content_part.added", item_id=self.item_ids[index],
                                         content_index=0, part=self._part(item, ""), **where))
            return events
        where["item_id"] = self.item_ids[index]
        if kind == "delta":
            if item.kind == TOOL_CALL:
                return [self.event("response.function_call_arguments.delta", delta=text, **where)]
            if item.kind == REASONING:
                return [self.event("response.reasoning_text.delta", content_index=0, delta=text, **where)]
            return [self.event("response.output_text.delta", content_index=0, delta=text, logprobs=[], **where)]
        done_item = self.item(index).model_dump()
        if item.kind == TOOL_CALL:
            events = [self.event("response.function_call_arguments.done", arguments=item.text, name=item.name,
                                 **where)]
        else:
            text_done = ("response.reasoning_text.done" if item.kind == REASONING else "response.output_text.done")
            extra = {} if item.kind == REASONING else {"logprobs": []}
            events = [self.event(text_done, content_index=0, text=item.text, **extra, **where),
                      self.event("response.content_part.done", content_index=0, part=self._part(item, item.text),
                                 **where)]
        del where["item_id"]
        return events + [self.event("response.output_item.done", item=done_item, **where)]

    @staticmethod
    def _part(item: OutputItem, text: str) -> dict:
        if item.kind == REASONING:
            return ReasoningText(text=text).model_dump()
        return OutputText(text=text).model_dump()


def input_items(input: str | list[dict]) -> list[dict]:
    """`input` as a list of items (a string is one user message)."""
    if isinstance(input, str):
        return [{"type": "message", "role": "user", "content": input}]
    return list(input)


def input_to_messages(instructions: str | None, items: str | list[dict]) -> list[dict]:
    """Responses `input` (and `instructions`) as chat messages for the harmony renderer."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where}: expected an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}: role must be user, system, developer or assistant", "input")
            text = _text(item.get("content"), where)
            if text or item["role"] != "assistant":  # an empty answer (e.g. cut off at once) says nothing
                messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            if not item.get("name") or "call_id" not in item:
                raise bad_request(f"{where}: a function_call needs 'call_id' and 'name'", "input")
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}]})
        elif kind == "function_call_output":
            if "call_id" not in item:
                raise bad_request(f"{where}: a function_call_output needs 'call_id'", "input")
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else _text(output, where)})
        elif kind == "reasoning":
            text = _text(item.get("content") or [], where) or _text(item.get("summary") or [], where)
            if text:
                messages.append({"role": "assistant", "reasoning_content": text})
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported", "input")
    return messages


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{where}: content must be a string or a list of text parts", "input")
    texts = []
    for part in content:
        if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
            raise bad_request(f"{where}: only text content parts are supported", "input")
        texts.append(part["text"])
    return "".join(texts)


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.json_schema is None:
        raise bad_request("text.format of type 'json_schema' needs a 'schema'.", "text.format")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=fmt.name, description=fmt.description, schema=fmt.json_schema, strict=fmt.strict))
