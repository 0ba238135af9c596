"""Checks every door (HTTP body, RunPod job input) runs on raw user JSON before anything else.

JSON may legally carry ``\\ud800``-style escapes that decode to lone surrogates: Python strings
hold them, but they cannot be encoded as UTF-8, so they would fail later in the tokenizer, the
harmony renderer or the response encoder. Deeply nested JSON overflows Python's recursion limit.
Both are the client's mistake and get a clear message here.
"""

from __future__ import annotations

import json
from typing import Any


def parse_json(raw: bytes | str, *, check_strings: bool = True) -> Any:
    """``json.loads`` that raises ValueError (with a readable message) for anything unusable."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("The request body is nested too deeply.") from None
    except ValueError as e:
        raise ValueError(f"The request body is not valid JSON: {e}") from None
    if check_strings:
        check_text(value)
    return value


def check_text(value: Any, where: str = "") -> None:
    """Raise ValueError naming the first string (key or value) that is not valid Unicode text."""
    path = _first_bad_string(value, where)
    if path is not None:
        raise ValueError(f"{path or 'the input'}: contains an unpaired surrogate (\\ud800-\\udfff), "
                         "which is not valid Unicode text")


def _first_bad_string(value: Any, path: str) -> str | None:
    # Iterative: a body nested to the recursion limit must not overflow here either. Paths are
    # built only for containers and the bad string, so a list of 100k token ids costs one pass.
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _is_valid_text(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not _is_valid_text(key):
                    return where or "a key"
                if isinstance(child, (str, dict, list)):
                    stack.append((child, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            for i, child in enumerate(item):
                if isinstance(child, (str, dict, list)):
                    stack.append((child, f"{where}[{i}]"))
    return None


def _is_valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
