"""Pydantic models of the OpenAI chat-completions, completions and models APIs (vLLM's extras too).

Requests ignore fields they don't know (as vLLM does: clients send vendor extras); responses
are dumped to plain dicts for JSON / SSE.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from minivllm.sampling_params import INT64_MAX, INT64_MIN


class OpenAIRequest(BaseModel):
    # Python's json reads NaN / Infinity; no sampling value means anything with them.
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False


class FunctionDefinition(OpenAIRequest):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIRequest):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str = Field(min_length=1)


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(OpenAIRequest):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class SamplingRequest(OpenAIRequest):
    """Fields chat and completions share; None means "the default"."""

    model: str | None = None
    n: int = Field(1, ge=1)  # at most RequestLimits.max_n
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # choices carry token_ids, the response prompt_token_ids
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM: logprobs of the prompt's tokens

    @field_validator("n", mode="before")
    @classmethod
    def _n_null_is_one(cls, value):
        # OpenAI documents n as "integer or null" and accepts an explicit null (clients that
        # serialize every field send it): null is the default, one choice.
        return 1 if value is None else value


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)  # at most RequestLimits.max_logprobs
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    # vLLM extensions
    echo: bool = False  # the reply starts with the last message's text when that is the reply's role
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message stays open: the model continues it

    @model_validator(mode="after")
    def _one_way_to_end_the_prompt(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0)  # at most RequestLimits.max_logprobs
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    skip_special_tokens: bool = True


# ---- responses --------------------------------------------------------------------------------

class Sparse(BaseModel):
    """Stream deltas carry only the fields that changed: None fields are left out."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0, reasoning: int | None = None) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                   completion_tokens_details=None if reasoning is None
                   else CompletionTokensDetails(reasoning_tokens=reasoning))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None
    refusal: list[ChatLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(Sparse):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "minivllm"
    root: str | None = None  # what the model was loaded from (vLLM's field): a repo id or folder
    max_model_len: int | None = None
    state: Literal["loaded", "loading", "unloading", "unloaded"] | None = Field(
        None, description="With a models file: whether the model is in memory now.")
    quantization: str | None = Field(None, description="The checkpoint's quantization (mxfp4), None if unquantized.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
