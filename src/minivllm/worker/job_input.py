"""A RunPod job's input, validated: worker-vllm's schema, with messages that say what is wrong.

Three shapes, one per job:
- native: ``prompt`` or ``messages``, ``sampling_params``, ``stream``, ``apply_chat_template``;
- OpenAI (worker-vllm <= v2.23): ``openai_route`` + ``openai_input`` (the request body);
- route (worker-vllm v2.24+): ``route`` + ``body`` + ``method`` (a body means POST, none GET).
Each may set ``max_batch_size``, ``min_batch_size`` and ``batch_size_growth_factor`` for its stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from minivllm.input_checks import check_text
from minivllm.sampling_params import SamplingParams

NATIVE_MAX_TOKENS = 100  # worker-vllm's default for native jobs (SamplingParams says 16)


class JobInputError(ValueError):
    """The job's input is malformed; the message is meant for the user."""


def _sampling_params_schema() -> type[BaseModel]:
    """A strict pydantic mirror of SamplingParams' user-settable fields (types only; values are
    checked by SamplingParams itself)."""
    hints = typing.get_type_hints(SamplingParams)
    fields = {f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING
                       else Field(default_factory=f.default_factory))
              for f in dataclasses.fields(SamplingParams)
              if f.init and f.name != "output_kind"}  # output_kind is the worker's business
    config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    return create_model("SamplingParamsInput", __config__=config, **fields)


_SamplingParamsInput = _sampling_params_schema()


_SHAPES = {
    "native": ("prompt", "messages", "sampling_params", "stream", "apply_chat_template", "model"),
    "openai": ("openai_route", "openai_input"),
    "route": ("route", "body", "method"),
}


class JobInput(BaseModel):
    # Lax types at the top level: worker-vllm int()/float()-parsed its batch-size fields.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    apply_chat_template: bool = False
    model: str | None = None  # native jobs: a served name of the models file (absent: the first model)
    max_batch_size: int | None = Field(None, ge=1)
    min_batch_size: int | None = Field(None, ge=1)
    batch_size_growth_factor: float | None = Field(None, gt=0)
    openai_route: str | None = None
    openai_input: dict[str, Any] | None = None
    route: str | None = None
    body: dict[str, Any] | None = None
    method: str | None = None
    _size_bytes: int = PrivateAttr(0)

    @property
    def size_bytes(self) -> int:
        """The size of the input as (ASCII) JSON."""
        return self._size_bytes

    @classmethod
    def parse(cls, raw: Any) -> "JobInput":
        """Validate a job's ``input``; raises JobInputError with a readable message."""
        if not isinstance(raw, dict):
            raise JobInputError(f"job input must be a JSON object, got {_json_type(raw)}")
        try:
            size = len(json.dumps(raw, allow_nan=False))  # ASCII JSON: its length is its size in bytes
        except TypeError as e:
            raise JobInputError(f"job input is not valid JSON: {e}") from None
        except ValueError:
            raise JobInputError("job input is not valid JSON: it holds NaN or Infinity") from None
        except RecursionError:
            raise JobInputError("job input is nested too deeply") from None
        try:
            check_text(raw)
        except ValueError as e:
            raise JobInputError(f"job input: {e}") from None
        try:
            job = cls.model_validate(raw)
        except ValidationError as e:
            raise JobInputError(_explain(e, prefix="")) from None
        job._check_shape(raw)
        job._size_bytes = size
        return job

    @property
    def route_method(self) -> str:
        """A route job's HTTP method: as given, else POST with a body and GET without."""
        return (self.method or ("POST" if self.body is not None else "GET")).upper()

    def _check_shape(self, raw: dict) -> None:
        shapes = [name for name, keys in _SHAPES.items() if any(k in raw for k in keys)]
        if len(shapes) > 1:
            raise JobInputError(f"a job is one of: a native job (prompt/messages), an OpenAI job (openai_route + "
                                f"openai_input) or a route job (route + body + method); this one mixes "
                                f"{' and '.join(shapes)} keys: {', '.join(k for s in shapes for k in _SHAPES[s] if k in raw)}")
        if shapes == ["route"]:
            if not (self.route or "").strip():
                raise JobInputError("route must be a route such as '/v1/chat/completions'")
            if self.route_method not in ("GET", "POST", "DELETE"):
                raise JobInputError(f"method must be GET, POST or DELETE, got {self.method!r}")
            return
        if self.openai_route is not None:
            if not self.openai_route.strip():
                raise JobInputError("openai_route must be a route such as '/v1/chat/completions'")
            return
        if self.openai_input is not None:
            raise JobInputError("openai_input needs openai_route (e.g. '/v1/chat/completions')")
        if self.prompt is not None and self.messages is not None:
            raise JobInputError("give either prompt or messages, not both")
        if self.prompt is None and self.messages is None:
            raise JobInputError("the job needs a prompt (text) or messages (a chat), an openai_route or a route")
        if self.prompt is not None and not self.prompt:
            raise JobInputError("prompt is empty")
        if self.messages is not None and not self.messages:
            raise JobInputError("messages is empty")

    def make_sampling_params(self) -> SamplingParams:
        """SamplingParams for a native job (max_tokens defaults to 100, as in worker-vllm)."""
        raw = dict(self.sampling_params or {})
        # worker-vllm's documented table has best_of; we sample exactly n, so only best_of == n fits.
        best_of = raw.pop("best_of", None)
        if best_of is not None and best_of != raw.get("n", 1):
            raise JobInputError(f"sampling_params.best_of={best_of!r} is not supported: only best_of == n "
                                "(or leave it out); ask for n choices instead")
        try:
            checked = _SamplingParamsInput.model_validate(raw)
        except ValidationError as e:
            raise JobInputError(_explain(e, prefix="sampling_params.")) from None
        values = checked.model_dump(exclude_unset=True)
        values.setdefault("max_tokens", NATIVE_MAX_TOKENS)
        try:
            return SamplingParams(**values)
        except (TypeError, ValueError) as e:
            raise JobInputError(f"sampling_params: {e}") from None

    def batch_size(self, config) -> "BatchSize":
        """This job's stream batch sizes: the job's fields override the worker's defaults."""
        return BatchSize(
            self.max_batch_size or config.default_batch_size,
            self.min_batch_size or config.default_min_batch_size,
            self.batch_size_growth_factor or config.default_batch_size_growth_factor,
        )


class BatchSize:
    """Stream batch sizes min, min*g, min*g^2, ... capped at max; fixed at max unless
    g > 1 and 1 <= min < max. A float g accumulates exactly; the size is its ceiling."""

    def __init__(self, max_batch_size: int, min_batch_size: int = 1, growth_factor: float = 3.0):
        self.max_batch_size = max_batch_size
        self.min_batch_size = min_batch_size
        self.growth_factor = growth_factor
        self.is_dynamic = growth_factor > 1 and 1 <= min_batch_size < max_batch_size
        self._size = float(min_batch_size if self.is_dynamic else max_batch_size)

    @property
    def current(self) -> int:
        return math.ceil(self._size - 1e-9)

    def update(self) -> None:
        if self.is_dynamic:
            self._size = min(self._size * self.growth_factor, float(self.max_batch_size))

    def sizes(self, count: int) -> list[int]:
        """The next `count` sizes (advances the sequence)."""
        out = []
        for _ in range(count):
            out.append(self.current)
            self.update()
        return out


# ---- messages -------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "an object", type(None): "null", Any: "any value"}


def _describe(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if origin is list:
        return f"a list of {_plural(_describe(args[0]))}" if args else "a list"
    if origin is dict:
        return "an object"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(words: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "an object": "objects"}.get(words, words)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _preview(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


_ERROR_WORDS = {"dict_type": "an object", "list_type": "a list", "string_type": "a string",
                "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
                "bool_type": "true or false", "bool_parsing": "true or false",
                "int_parsing": "an integer", "float_parsing": "a number", "finite_number": "a finite number"}


def _explain(error: ValidationError, prefix: str) -> str:
    """One readable line per bad field (a union's several errors become one)."""
    model = JobInput if not prefix else _SamplingParamsInput
    parts: dict[str, str] = {}
    for err in error.errors(include_url=False):
        loc = err["loc"]
        field = str(loc[0]) if loc else ""
        if field in parts:
            continue  # further branches of the same union
        info = model.model_fields.get(field)
        if err["type"] == "extra_forbidden":
            what = "sampling_params key" if prefix else "input key"
            parts[field] = f"unknown {what} {field!r} (valid keys: {', '.join(model.model_fields)})"
            continue
        path = prefix + field + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
        expected = _ERROR_WORDS.get(err["type"])
        if expected is not None and info is not None and (len(loc) == 1 or _is_union(info.annotation)):
            expected = _describe(info.annotation)
            path = prefix + field
        if expected is not None:
            parts[field] = f"{path} must be {expected}, got {_preview(err['input'])}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts[field] = f"{path}: {msg[0].lower() + msg[1:]}, got {_preview(err['input'])}"
    return "; ".join(parts.values())


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and \
        len([a for a in typing.get_args(annotation) if a is not type(None)]) > 1
