"""Responses kept in process (`store: true`): GET /v1/responses/{id}, previous_response_id, background runs.

Bounded by count and by an estimate of bytes; the oldest go first, except background runs still
going (they must stay reachable to be cancelled). Nothing survives a restart, as in vLLM.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class StoredResponse:
    response: dict  # the response object as GET returns it; replaced as a background run moves on
    background: bool = False
    items: list[dict] | None = None  # the conversation (earlier turns, input, output) once it ended
    task: asyncio.Task | None = None  # a background run
    events: list[dict] | None = None  # a streamed background run's events, for its reader
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced by each publish
    nbytes: int = 0

    @property
    def id(self) -> str:
        return self.response["id"]

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def publish(self, event: dict | None = None) -> None:
        """Wake the readers of a streamed background run (with a new event, or at its end)."""
        if event is not None and self.events is not None:
            self.events.append(event)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class ResponseStore:
    def __init__(self, max_responses: int = 1000, max_bytes: int = 256 << 20) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._entries.get(response_id)

    def put(self, entry: StoredResponse) -> None:
        """Add `entry`, or account for its new size if it is here already; then evict the oldest."""
        old = self._entries.get(entry.id)
        if old is not None:
            self.nbytes -= old.nbytes
        entry.nbytes = len(json.dumps(entry.response)) + len(json.dumps(entry.items or []))
        self._entries[entry.id] = entry
        self.nbytes += entry.nbytes
        self._evict()

    def pop(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def _full(self) -> bool:
        return len(self._entries) > self.max_responses or self.nbytes > self.max_bytes

    def _evict(self) -> None:
        if not self._full():
            return
        for entry in [e for e in self._entries.values() if not e.running]:  # oldest first
            self.pop(entry.id)
            if not self._full():
                return
