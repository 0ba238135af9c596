"""The OpenAI error body, and turning bad input into it (never a raw pydantic dump)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ValidationError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          500: "server_error", 503: "server_error"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The error body, as a model for the OpenAPI schema (every key is always present)."""

    error: ErrorInfo


class OpenAIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status_code: int = 400, *, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPES.get(status_code, "invalid_request_error")
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_validation_error(cls, err: ValidationError) -> OpenAIError:
        """One readable clause per bad field, naming it; the first bad field is the param."""
        by_param: dict[str, list[str]] = {}
        for e in err.errors(include_url=False, include_input=False, include_context=False):
            param = ""
            for part in e["loc"]:
                if isinstance(part, int):
                    param += f"[{part}]"
                elif not _is_type_tag(part):
                    param += f".{part}" if param else str(part)
            msg = {"missing": "field required", "extra_forbidden": "unknown parameter"}.get(e["type"], e["msg"])
            msg = _INSTANCE_OF.sub("", msg)  # "...valid dictionary or instance of NamedToolChoice"
            msgs = by_param.setdefault(param, [])
            if msg not in msgs:
                msgs.append(msg)
        clauses = [f"{param}: {' or '.join(msgs)}" if param else " or ".join(msgs) for param, msgs in by_param.items()]
        return cls("; ".join(clauses), 400, param=next(iter(by_param), None) or None)


def _is_type_tag(part) -> bool:
    """Union members add their type to an error's location ('str', 'list[int]', 'NamedTool')."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or part[:1].isupper())


_INSTANCE_OF = re.compile(r" or instance of \w+")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before",
               "function-wrap", "literal", "tagged-union", "union"}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, param=param)


def not_found(message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, 404, code=code)
