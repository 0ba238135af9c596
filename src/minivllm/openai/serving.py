"""One entry point for every OpenAI route: the HTTP server and the RunPod worker both call dispatch().

    result = await serving.dispatch("/v1/chat/completions", body)

returns the response object as a dict, or (when body["stream"] is true) an async iterator of
chunk dicts, each one SSE event's JSON payload; the caller frames them (``data: ...``) and ends
with ``data: [DONE]``. Closing that iterator early aborts the engine request. Bad input raises
OpenAIError before any work starts.

Anthropic's Messages API: ``/v1/messages`` and ``/v1/messages/count_tokens`` (minivllm.anthropic);
their errors are AnthropicError, an OpenAIError whose to_dict() is Anthropic's error body.

Stored responses: ``/v1/responses/{id}`` with no body retrieves one, ``/v1/responses/{id}/cancel``
cancels a background one, and ``method="DELETE"`` on ``/v1/responses/{id}`` deletes one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import ValidationError

from minivllm.engine.async_engine import AsyncEngine
from minivllm.limits import RequestLimits
from minivllm.openai.errors import OpenAIError, bad_request, not_found
from minivllm.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from minivllm.openai.response_store import ResponseStore
from minivllm.openai.responses_protocol import ResponsesRequest
from minivllm.openai.serving_chat import ChatServing
from minivllm.openai.serving_completion import CompletionServing
from minivllm.openai.serving_responses import ResponsesServing

logger = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_name: str, *, max_model_len: int,
                 response_role: str = "assistant", force_include_usage: bool = False,
                 chat_template: str | None = None, max_stored_responses: int = 1000,
                 max_stored_bytes: int = 256 << 20, limits: RequestLimits | None = None,
                 response_store: ResponseStore | None = None) -> None:
        """max_stored_*: the bound of the in-process response store (`store: true`); oldest go first.
        limits: what one request may ask for (n, logprobs, stop strings, tools).
        response_store: a store shared with other models' servings (a ModelManager's)."""
        self.engine = engine
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.limits = limits or RequestLimits()
        self.chat = ChatServing(engine, served_model_name, max_model_len, response_role=response_role,
                                force_include_usage=force_include_usage, chat_template=chat_template,
                                limits=self.limits)
        self.completion = CompletionServing(engine, served_model_name, max_model_len,
                                            force_include_usage=force_include_usage, limits=self.limits)
        self.responses = ResponsesServing(self.chat, response_store or ResponseStore(max_stored_responses,
                                                                                   max_stored_bytes))
        from minivllm.anthropic.serving import AnthropicServing  # here: minivllm.anthropic imports this package

        self.anthropic = AnthropicServing(self.chat)
        self._routes: dict[str, tuple[type, Callable]] = {
            "/chat/completions": (ChatCompletionRequest, self.chat.create),
            "/completions": (CompletionRequest, self.completion.create),
            "/responses": (ResponsesRequest, self.responses.create),
        }

    @property
    def request_observer(self) -> Callable[[int], Any] | None:
        return self.chat.request_observer

    @request_observer.setter
    def request_observer(self, observer: Callable[[int], Any] | None) -> None:
        """Called with each request's prompt length; returns an object with on_output(out), on_end()."""
        self.chat.request_observer = self.completion.request_observer = observer

    async def dispatch(self, route: str, body: dict | None, method: str | None = None) -> dict | AsyncIterator[dict]:
        """`method`: checked against the route when given (a route job's); it also tells the two
        meanings of one path apart (DELETE /v1/responses/{id})."""
        path = check_route(route, method)
        if path.startswith("/responses/"):
            return await self.responses.handle(path[len("/responses/"):], body, method and method.upper())
        if path in ("/messages", "/messages/count_tokens"):
            return await self.anthropic.handle(path, body)
        if path == "/models":
            return self.models()
        if path.startswith("/models/"):
            name = path[len("/models/"):]
            if name != self.served_model_name:
                raise not_found(f"The model `{name}` does not exist.", code="model_not_found")
            return ModelCard(id=name, max_model_len=self.max_model_len).model_dump()
        request_type, handler = self._routes[path]
        if not isinstance(body, dict) or not body:
            raise bad_request(f"{path[1:]} needs a JSON object as the request body.")
        try:  # in a thread: validating a 100k-token prompt takes long enough to stall the event loop
            request = await asyncio.to_thread(request_type.model_validate, body)
        except ValidationError as e:
            raise OpenAIError.from_validation_error(e) from None
        if request.model_extra:
            logger.warning("ignoring unsupported request fields: %s", sorted(request.model_extra))
        return await handler(request)

    def models(self) -> dict:
        return ModelList(data=[ModelCard(id=self.served_model_name, max_model_len=self.max_model_len)]).model_dump()


def check_route(route: str, method: str | None) -> str:
    """The normalized path of a route this server serves. OpenAIError 404 for an unknown route;
    405 when `method` (a route job's, or HTTP's) is not the route's."""
    path = _normalize(route)
    allowed = allowed_methods(path)
    if not allowed:
        raise not_found(f"Unknown route {route!r}: this server serves /v1/models, /v1/chat/completions, "
                        f"/v1/completions, /v1/responses and /v1/messages.", code="unknown_url")
    if method is not None and method.upper() not in allowed:
        error = OpenAIError(f"{method.upper()} is not allowed on {route}: use {' or '.join(sorted(allowed))}.",
                            405, code="method_not_allowed")
        raise anthropic_error(error) if path.startswith("/messages") else error
    return path


def anthropic_error(error: OpenAIError) -> OpenAIError:
    """The same error in Anthropic's shape (the Messages routes answer with it)."""
    from minivllm.anthropic.errors import AnthropicError  # (a cycle at import time)

    return AnthropicError.of(error)


def _normalize(route: str) -> str:
    """'/openai/v1/chat/completions', '/v1/chat/completions', 'chat/completions' -> '/chat/completions'."""
    path = "/" + route.split("?", 1)[0].strip().strip("/")
    for prefix in ("/openai", "/v1"):
        if path == prefix or path.startswith(prefix + "/"):
            path = path[len(prefix):] or "/"
    return path


def allowed_methods(path: str) -> frozenset[str]:
    """The HTTP methods a (normalized) route answers; empty for a route this server lacks."""
    if path == "/models" or path.startswith("/models/"):  # ids may hold a slash: openai/gpt-oss-20b
        return frozenset({"GET"})
    if path in ("/chat/completions", "/completions", "/responses", "/messages", "/messages/count_tokens"):
        return frozenset({"POST"})
    if path.startswith("/responses/"):
        return frozenset({"POST"}) if path.endswith("/cancel") else frozenset({"GET", "DELETE"})
    return frozenset()
