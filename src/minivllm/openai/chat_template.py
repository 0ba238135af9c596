"""A user-supplied Jinja chat template (vLLM's --chat-template, worker-vllm's CUSTOM_CHAT_TEMPLATE).

Without one, prompts are rendered by openai-harmony (Tokenizer.render_chat). With one, the
template's text is tokenized with special tokens allowed, as transformers' apply_chat_template does.
"""

from __future__ import annotations

import datetime
import json
import os


class ChatTemplate:
    def __init__(self, template: str) -> None:
        """`template`: a file path or the template text itself."""
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise RuntimeError("a custom chat template needs the 'jinja2' package") from None
        if os.path.isfile(template):
            with open(template) as f:
                template = f.read()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self._error = TemplateError
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise ValueError(f"invalid chat template: {e}") from None

    def render(self, messages: list[dict], tools: list[dict] | None, reasoning_effort: str | None) -> str:
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                         reasoning_effort=reasoning_effort or "medium")
        except self._error as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None


def _raise(message: str):
    raise ValueError(message)
