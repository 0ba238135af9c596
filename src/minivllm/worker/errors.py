"""Error outputs a job yields. RunPod marks a job FAILED when an output dict has an ``error`` key,
and stores ``str(output["error"])``: so the value must read well as a string."""

from __future__ import annotations

import json


class JsonDict(dict):
    """A dict whose str() is JSON, so RunPod's str(error) gives JSON, not a Python repr."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)

    __repr__ = __str__


def job_error(message: str) -> dict:
    """A native job's error output: ``{"error": "clear message"}``."""
    return {"error": message}


def openai_error(body: dict) -> dict:
    """An OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` that stays JSON
    when RunPod stringifies its ``error``."""
    inner = body.get("error")
    return {**body, "error": JsonDict(inner) if isinstance(inner, dict) else inner}
