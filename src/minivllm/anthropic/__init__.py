"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) over the OpenAI chat serving layer."""

from minivllm.anthropic.errors import AnthropicError, error_body, is_anthropic_route
from minivllm.anthropic.serving import AnthropicServing

__all__ = ["AnthropicError", "AnthropicServing", "error_body", "is_anthropic_route"]
