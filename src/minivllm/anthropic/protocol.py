"""Pydantic models of Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens).

Field names follow the `anthropic` SDK's types. Requests ignore fields they don't know (as the
OpenAI models do: cache_control, metadata, thinking, service_tier ... are accepted and unused);
content blocks of a type this server cannot render (image, document ...) are a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from minivllm.sampling_params import INT64_MAX


class AnthropicRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)


# ---- content blocks (in requests; the output ones are the same shapes) --------------------------

class TextBlock(AnthropicRequest):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(AnthropicRequest):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(AnthropicRequest):
    """Opaque reasoning a client echoes back: accepted, rendered as nothing."""

    type: Literal["redacted_thinking"] = "redacted_thinking"
    data: str = ""


class ToolUseBlock(AnthropicRequest):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(AnthropicRequest):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


ContentBlock = Annotated[TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock,
                         Field(discriminator="type")]


class Message(AnthropicRequest):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


# ---- tools ------------------------------------------------------------------------------------

class Tool(AnthropicRequest):
    type: Literal["custom"] | None = None  # client tools only: server tools (web_search ...) are not run here
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoiceAuto(AnthropicRequest):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None  # harmony calls one tool per turn anyway


class ToolChoiceAny(AnthropicRequest):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(AnthropicRequest):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(AnthropicRequest):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class JsonOutputFormat(AnthropicRequest):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(AnthropicRequest):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # -> harmony reasoning effort
    format: JsonOutputFormat | None = None


# ---- requests ---------------------------------------------------------------------------------

class CountTokensRequest(AnthropicRequest):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=INT64_MAX)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT64_MAX)


# ---- responses --------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock | ThinkingBlock | ToolUseBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int
