"""Anthropic's error body: ``{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}``.

AnthropicError is an OpenAIError, so every door that already renders OpenAIError (the HTTP
server's exception handler, the RunPod worker) sends it as is: only ``to_dict`` differs.
"""

from __future__ import annotations

from minivllm.openai.errors import OpenAIError

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
          503: "overloaded_error", 529: "overloaded_error"}


class AnthropicError(OpenAIError):
    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message, status_code, type=_TYPES.get(status_code, "api_error"))

    @classmethod
    def of(cls, err: OpenAIError) -> AnthropicError:
        """The same error (message, status) in Anthropic's shape."""
        return err if isinstance(err, AnthropicError) else cls(err.message, err.status_code)

    def to_dict(self) -> dict:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


def error_body(err: OpenAIError) -> dict:
    """What a route under /v1/messages answers for any OpenAIError (e.g. raised by the HTTP layer)."""
    return AnthropicError.of(err).to_dict()


def is_anthropic_route(path: str) -> bool:
    """Whether an HTTP path is one of the Messages routes, whose every error is Anthropic-shaped."""
    path = "/" + path.split("?", 1)[0].strip("/")
    return path.endswith(("/v1/messages", "/v1/messages/count_tokens"))
