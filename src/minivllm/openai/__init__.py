"""OpenAI-compatible serving: chat completions, completions, responses and models over AsyncEngine."""

from minivllm.openai.errors import OpenAIError
from minivllm.openai.serving import OpenAIServing

__all__ = ["OpenAIError", "OpenAIServing"]
