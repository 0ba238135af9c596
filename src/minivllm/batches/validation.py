"""Checking a batch input file, line by line, with the pydantic models the live routes use.

A bad line becomes an error-file line (its custom_id and the reason) and the rest still run; a
file that cannot be a batch at all (missing, empty, over 50,000 lines) fails the batch with
`errors`, as OpenAI's validation does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator

from pydantic import ValidationError

from minivllm.batches.store import dumps
from minivllm.openai.errors import OpenAIError
from minivllm.openai.protocol import ChatCompletionRequest, CompletionRequest
from minivllm.openai.responses_protocol import ResponsesRequest

ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
             "/v1/responses": ResponsesRequest}
MAX_LINES = 50_000


class FileInvalid(Exception):
    """The whole file is not a batch: the batch fails with this code and message."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line = code, message, line

    def to_error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": None, "line": self.line}


def line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def error_line(custom_id: str | None, code: str, message: str) -> str:
    return dumps({"id": line_id(), "custom_id": custom_id, "response": None,
                  "error": {"code": code, "message": message}})


def check_line(raw: bytes, number: int, endpoint: str, seen: set[str]) -> tuple[str | None, str | None, str | None]:
    """(custom_id, body JSON, None) for a good line, (custom_id or None, None, reason) for a bad one.
    `number` is 1-based, for messages; `seen` collects custom_ids."""
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, None, f"Line {number} is not valid JSON: {e}"
    if not isinstance(item, dict):
        return None, None, f"Line {number} is not a JSON object."
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, None, f"Line {number}: custom_id must be a non-empty string."
    if custom_id in seen:
        return custom_id, None, f"Line {number}: custom_id {custom_id!r} is used by an earlier line; custom_ids " \
                                "must be unique within a batch."
    seen.add(custom_id)
    method = item.get("method")
    if not isinstance(method, str) or method.upper() != "POST":
        return custom_id, None, f"Line {number}: method must be 'POST' (got {method!r})."
    url = item.get("url")
    if url != endpoint:
        return custom_id, None, f"Line {number}: url {url!r} differs from the batch's endpoint {endpoint!r}."
    body = item.get("body")
    if not isinstance(body, dict) or not body:
        return custom_id, None, f"Line {number}: body must be a JSON object (the request to {endpoint})."
    try:
        request = ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as e:
        return custom_id, None, f"Line {number}: {OpenAIError.from_validation_error(e).message}"
    if request.stream:
        return custom_id, None, f"Line {number}: stream must be false in a batch."
    if getattr(request, "background", None):
        return custom_id, None, f"Line {number}: background must be false in a batch."
    return custom_id, dumps(body), None


def validate_lines(raw_lines: Iterable[bytes], endpoint: str, max_lines: int = MAX_LINES) -> Iterator[dict]:
    """Rows for the store's lines table, in file order: good lines pending, bad lines failed with
    their error-file line. Raises FileInvalid (after the rows it already gave) for a file that
    cannot be a batch; blank lines are skipped."""
    seen: set[str] = set()
    idx = 0
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        if idx >= max_lines:
            raise FileInvalid("too_many_lines", f"The file has more than {max_lines} requests (lines); split it "
                              "into several batches.", number)
        custom_id, body, reason = check_line(raw, number, endpoint, seen)
        if reason is None:
            yield {"idx": idx, "custom_id": custom_id, "body": body, "state": "pending", "result": None}
        else:
            yield {"idx": idx, "custom_id": custom_id, "body": None, "state": "failed",
                   "result": error_line(custom_id, "invalid_request", reason)}
        idx += 1
    if idx == 0:
        raise FileInvalid("empty_file", "The input file has no requests.")
