"""The Files and Batches API objects and rules, shared by the HTTP routes (routes.py) and RunPod
`openai_route` jobs (dispatch()). Every method returns the OpenAI object as a dict or raises
OpenAIError.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import Iterator

from minivllm.batches.files import FileStorage, default_data_dir, file_object, write_file
from minivllm.batches.runner import BatchRunner
from minivllm.batches.store import Store
from minivllm.batches.validation import ENDPOINTS
from minivllm.openai.errors import OpenAIError, bad_request, not_found

COMPLETION_WINDOW_S = {"24h": 24 * 3600}
TIME_FIELDS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
               "expired_at", "cancelling_at", "cancelled_at")


class BatchService:
    def __init__(self, store: Store, storage: FileStorage, runner: BatchRunner | None = None) -> None:
        self.store, self.storage, self.runner = store, storage, runner
        self.started = False

    @classmethod
    def create(cls, dispatch, *, store_url: str | None = None, data_dir: str | None = None,
               **runner_args) -> "BatchService":
        """The service with its runner: store_url defaults to SQLite in data_dir (default: the
        cache folder's batches/)."""
        import os

        data_dir = data_dir or default_data_dir()
        os.makedirs(data_dir, exist_ok=True)
        store = Store(store_url or f"sqlite:///{os.path.join(data_dir, 'batches.db')}")
        storage = FileStorage(store, data_dir)
        return cls(store, storage, BatchRunner(store, storage, dispatch, **runner_args))

    async def start(self) -> None:
        if self.runner is not None and not self.started:
            self.started = True
            await self.runner.start()

    async def ensure_started(self) -> None:
        """Start the runner on the calling event loop if nobody did (a RunPod worker: its loop
        is runpod's, reachable only from inside a job)."""
        await self.start()

    async def stop(self) -> None:
        if self.runner is not None and self.started:
            self.started = False
            await self.runner.stop()
        self.store.close()

    # ---- files --------------------------------------------------------------------------------
    async def upload_bytes(self, data: bytes, filename: str, purpose: str = "batch") -> dict:
        """A file from bytes in hand (a RunPod job's base64 `file`)."""
        if purpose != "batch":
            raise bad_request(f"purpose must be 'batch' (got {purpose!r}).", "purpose")
        from minivllm.batches.files import MAX_FILE_BYTES

        if len(data) > MAX_FILE_BYTES:
            raise OpenAIError("The file is larger than the 200 MB limit.", 413, param="file")
        pieces = (data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20))
        row = await asyncio.to_thread(write_file, self.storage, pieces, filename, purpose)
        return file_object(row)

    async def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                         order: str = "desc") -> dict:
        limit = _limit(limit, 10000)
        if order not in ("asc", "desc"):
            raise bad_request("order must be 'asc' or 'desc'.", "order")
        rows = await asyncio.to_thread(self.store.list_files, purpose, after, limit, order == "asc")
        return _page([file_object(r) for r in rows], limit)

    async def file_row(self, file_id: str) -> dict:
        row = await asyncio.to_thread(self.store.get_file, file_id)
        if row is None:
            raise not_found(f"No such File object: {file_id}")
        return row

    async def retrieve_file(self, file_id: str) -> dict:
        return file_object(await self.file_row(file_id))

    def file_content(self, row: dict) -> Iterator[bytes]:
        return self.storage.read(row)

    async def delete_file(self, file_id: str) -> dict:
        if not await asyncio.to_thread(self.storage.delete, file_id):
            raise not_found(f"No such File object: {file_id}")
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches ------------------------------------------------------------------------------
    async def create_batch(self, body: dict | None) -> dict:
        if not isinstance(body, dict):
            raise bad_request("Send a JSON object: input_file_id, endpoint, completion_window.")
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        window, metadata = body.get("completion_window"), body.get("metadata")
        if not isinstance(file_id, str) or not file_id:
            raise bad_request("input_file_id is required.", "input_file_id")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)} (got {endpoint!r}).", "endpoint")
        if window not in COMPLETION_WINDOW_S:
            raise bad_request(f"completion_window must be '24h' (got {window!r}).", "completion_window")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= 16
                and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                        for k, v in metadata.items())):
            raise bad_request("metadata: at most 16 string keys (64 characters) with string values (512).",
                              "metadata")
        row = await asyncio.to_thread(self.store.get_file, file_id)
        if row is None:
            raise not_found(f"No such File object: {file_id}")
        if row["purpose"] != "batch":
            raise bad_request(f"The file {file_id} has purpose {row['purpose']!r}, not 'batch'.", "input_file_id")
        now = int(time.time())
        batch = {"id": f"batch_{uuid.uuid4().hex}", "status": "validating", "endpoint": endpoint,
                 "input_file_id": file_id, "completion_window": window, "metadata": metadata,
                 "created_at": now, "expires_at": now + COMPLETION_WINDOW_S[window],
                 "total": 0, "completed": 0, "failed": 0}
        await asyncio.to_thread(self.store.add_batch, batch)
        if self.runner is not None:
            self.runner.wake()
        return await self.retrieve_batch(batch["id"])

    async def retrieve_batch(self, batch_id: str) -> dict:
        row = await asyncio.to_thread(self.store.get_batch, batch_id)
        if row is None:
            raise not_found(f"No such Batch object: {batch_id}")
        return await asyncio.to_thread(self._batch_object, row)

    async def list_batches(self, after: str | None = None, limit: int = 20) -> dict:
        limit = _limit(limit, 100)
        rows = await asyncio.to_thread(self.store.list_batches, after, limit)
        data = [await asyncio.to_thread(self._batch_object, r) for r in rows[:limit]]
        return _page(data + rows[limit:], limit)

    async def cancel_batch(self, batch_id: str) -> dict:
        row = await asyncio.to_thread(self.store.get_batch, batch_id)
        if row is None:
            raise not_found(f"No such Batch object: {batch_id}")
        moved = await asyncio.to_thread(self.store.update_batch, batch_id, when_status=("validating", "in_progress"),
                                        status="cancelling", cancelling_at=int(time.time()))
        if not moved:
            current = await asyncio.to_thread(self.store.get_batch, batch_id)
            if current["status"] not in ("cancelling", "cancelled"):
                raise OpenAIError(f"Cannot cancel a batch that is {current['status']}.", 409,
                                  type="invalid_request_error", code="batch_not_cancellable")
        if self.runner is not None:
            self.runner.wake()
        return await self.retrieve_batch(batch_id)

    def _batch_object(self, row: dict) -> dict:
        if row["status"] in ("in_progress", "finalizing", "cancelling"):
            counts = self.store.counts(row["id"])
            request_counts = {"total": sum(counts.values()), "completed": counts.get("done", 0),
                              "failed": counts.get("failed", 0)}
        else:
            request_counts = {"total": row["total"], "completed": row["completed"], "failed": row["failed"]}
        return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": row["errors"],
                "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
                "status": row["status"], "output_file_id": row["output_file_id"],
                "error_file_id": row["error_file_id"], **{k: row[k] for k in TIME_FIELDS},
                "request_counts": request_counts, "metadata": row["metadata"], "model": row["model"],
                "usage": row["usage"]}

    # ---- RunPod jobs --------------------------------------------------------------------------
    @staticmethod
    def handles(route: str) -> bool:
        """Whether a job's route belongs to this API (/v1/files..., /v1/batches...)."""
        return handles(route)

    async def dispatch(self, route: str, body: dict | None, method: str | None = None) -> dict:
        """/v1/files and /v1/batches for `openai_route` / `route` jobs. Upload: POST /v1/files with
        {"file": base64, "filename", "purpose": "batch"}; content: GET /v1/files/{id}/content
        answers {"id", "content": base64} (the file must fit a job's output). Query parameters
        (limit, after, purpose, order) come in the body for GET. Without a method (openai_route
        jobs) a body with `file` / `input_file_id` means POST, .../cancel means POST, else GET;
        DELETE /v1/files/{id} needs a `route` job with "method": "DELETE"."""
        path = "/" + route.split("?", 1)[0].strip().strip("/")
        for prefix in ("/openai", "/v1"):
            if path.startswith(prefix + "/"):
                path = path[len(prefix):]
        parts = path.strip("/").split("/")
        body = body or {}
        if method is None:  # an openai_route job has none: the body tells
            creates = (parts == ["files"] and "file" in body or parts == ["batches"] and "input_file_id" in body
                       or parts[-1] == "cancel")
            method = "POST" if creates else "GET"
        method = method.upper()
        match (method, parts):
            case ("POST", ["files"]):
                try:
                    data = base64.b64decode(body.get("file") or "", validate=True)
                except (binascii.Error, ValueError):
                    raise bad_request("file must be the file's bytes in base64.", "file") from None
                return await self.upload_bytes(data, str(body.get("filename") or "upload.jsonl"),
                                               str(body.get("purpose", "")))
            case ("GET", ["files"]):
                return await self.list_files(body.get("purpose"), body.get("after"), body.get("limit", 10000),
                                             body.get("order", "desc"))
            case ("GET", ["files", file_id]):
                return await self.retrieve_file(file_id)
            case ("DELETE", ["files", file_id]):
                return await self.delete_file(file_id)
            case ("GET", ["files", file_id, "content"]):
                row = await self.file_row(file_id)
                data = await asyncio.to_thread(lambda: b"".join(self.file_content(row)))
                return {"id": file_id, "object": "file.content", "content": base64.b64encode(data).decode()}
            case ("POST", ["batches"]):
                return await self.create_batch(body)
            case ("GET", ["batches"]):
                return await self.list_batches(body.get("after"), body.get("limit", 20))
            case ("GET", ["batches", batch_id]):
                return await self.retrieve_batch(batch_id)
            case ("POST", ["batches", batch_id, "cancel"]):
                return await self.cancel_batch(batch_id)
        raise not_found(f"Unknown route {method} {route!r} for the Files / Batches API.", code="unknown_url")


def handles(route: str) -> bool:
    """Whether a job's route belongs to this API (/v1/files..., /v1/batches...)."""
    path = "/" + route.split("?", 1)[0].strip().strip("/")
    for prefix in ("/openai", "/v1"):
        if path.startswith(prefix + "/"):
            path = path[len(prefix):]
    return path in ("/files", "/batches") or path.startswith(("/files/", "/batches/"))


def _limit(limit, most: int) -> int:
    try:
        limit = int(limit)
    except (TypeError, ValueError):
        raise bad_request("limit must be an integer.", "limit") from None
    if not 1 <= limit <= most:
        raise bad_request(f"limit must be between 1 and {most}.", "limit")
    return limit


def _page(data: list, limit: int) -> dict:
    has_more = len(data) > limit
    data = data[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
