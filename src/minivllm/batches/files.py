"""File bytes: under the data folder (SQLite store, or a folder every replica mounts), or in the
database itself in 1 MiB chunks (PostgreSQL: any replica serves any file). Metadata is always in
the store. Uploads arrive as a stream and are written as they come, never whole in memory.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator

from python_multipart.multipart import MultipartParser, parse_options_header

from minivllm.batches.store import Store
from minivllm.openai.errors import OpenAIError, bad_request

MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for batch input files
CHUNK = 1 << 20
PURPOSES = ("batch", "batch_output")


def default_data_dir() -> str:
    from minivllm.model.tiny import cache_dir

    return os.path.join(cache_dir(), "batches")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


class FileStorage:
    """Where the bytes live. in_db: PostgreSQL chunks; else data_dir/files/<id>."""

    def __init__(self, store: Store, data_dir: str, in_db: bool | None = None) -> None:
        self.store = store
        self.data_dir = data_dir
        self.in_db = (not store.is_sqlite) if in_db is None else in_db
        os.makedirs(os.path.join(data_dir, "files"), exist_ok=True)

    def path(self, file_id: str) -> str:
        return os.path.join(self.data_dir, "files", file_id)

    def writer(self, file_id: str) -> "FileWriter":
        return FileWriter(self, file_id)

    def read(self, row: dict) -> Iterator[bytes]:
        if row["in_db"]:
            yield from self.store.read_chunks(row["id"])
            return
        with open(self.path(row["id"]), "rb") as f:
            while block := f.read(CHUNK):
                yield block

    def lines(self, row: dict) -> Iterator[bytes]:
        """The file's lines (without the newline), one at a time."""
        rest = b""
        for block in self.read(row):
            rest += block
            *complete, rest = rest.split(b"\n")
            yield from complete
        if rest:
            yield rest

    def delete(self, file_id: str) -> bool:
        found = self.store.delete_file(file_id)
        try:
            os.remove(self.path(file_id))
        except FileNotFoundError:
            pass
        return found

    def add(self, file_id: str, filename: str, purpose: str, size: int) -> dict:
        row = {"id": file_id, "purpose": purpose, "filename": filename, "bytes": size,
               "created_at": int(time.time()), "in_db": self.in_db}
        self.store.add_file(row)
        return row


class FileWriter:
    """Buffered writes of one file's bytes; close() makes them durable, abort() drops them."""

    def __init__(self, storage: FileStorage, file_id: str) -> None:
        self.storage, self.file_id = storage, file_id
        self.size = 0
        self._seq = 0
        self._buffer = bytearray()
        self._file = None if storage.in_db else open(storage.path(file_id) + ".part", "wb")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            self._flush(bytes(self._buffer[:CHUNK]))
            del self._buffer[:CHUNK]

    def _flush(self, data: bytes) -> None:
        self.storage.store.add_chunk(self.file_id, self._seq, data)
        self._seq += 1

    def close(self) -> None:
        if self._file is None:
            if self._buffer:
                self._flush(bytes(self._buffer))
                self._buffer.clear()
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.storage.path(self.file_id) + ".part", self.storage.path(self.file_id))

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            os.remove(self.storage.path(self.file_id) + ".part")
        else:
            self.storage.store.delete_file(self.file_id)  # its chunks


async def receive_upload(storage: FileStorage, content_type: str, body: AsyncIterator[bytes],
                         max_bytes: int = MAX_FILE_BYTES) -> dict:
    """A multipart/form-data upload (fields `purpose` and `file`), streamed into storage.
    Returns the new file's row."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise bad_request("Upload a file as multipart/form-data with the fields `file` and `purpose`.")
    file_id = new_file_id()
    state = {"headers": {}, "field": None, "name": None, "filename": None, "pending": bytearray(),
             "fields": {}, "file_parts": 0,
             "upload_name": None}
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin():
        state["headers"], state["name"], state["filename"] = {}, None, None

    def on_header_field(data, start, end):
        header_field.extend(data[start:end])

    def on_header_value(data, start, end):
        header_value.extend(data[start:end])

    def on_header_end():
        state["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished():
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        state["filename"] = None if filename is None else filename.decode("utf-8", "replace")
        if state["name"] == "file":
            state["file_parts"] += 1
            if state["file_parts"] == 1:
                state["upload_name"] = state["filename"] or "upload.jsonl"
        else:
            state["fields"][state["name"]] = bytearray()

    def on_part_data(data, start, end):
        if state["name"] == "file":
            if state["file_parts"] == 1:
                state["pending"].extend(data[start:end])
        else:
            field = state["fields"][state["name"]]
            if len(field) < 4096:
                field.extend(data[start:end])

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    writer = storage.writer(file_id)
    try:
        async for chunk in body:
            parser.write(chunk)
            if writer.size + len(state["pending"]) > max_bytes:
                raise OpenAIError(f"The file is larger than the {max_bytes // (1024 * 1024)} MB limit.", 413,
                                  param="file")
            if len(state["pending"]) >= CHUNK:
                data = bytes(state["pending"])
                state["pending"].clear()
                await asyncio.to_thread(writer.write, data)
        parser.finalize()
        if state["file_parts"] != 1:
            raise bad_request("Send exactly one `file` field.", "file")
        purpose = bytes(state["fields"].get("purpose", b"")).decode("utf-8", "replace").strip()
        if purpose != "batch":
            raise bad_request(f"purpose must be 'batch' (got {purpose!r}): this server keeps files for the "
                              "Batch API only.", "purpose")
        data = bytes(state["pending"])
        await asyncio.to_thread(_finish, writer, data)
    except BaseException:
        await asyncio.to_thread(writer.abort)
        raise
    return await asyncio.to_thread(storage.add, file_id, state["upload_name"], purpose, writer.size)


def _finish(writer: FileWriter, data: bytes) -> None:
    writer.write(data)
    writer.close()


def write_file(storage: FileStorage, chunks, filename: str, purpose: str) -> dict:
    """A file made here (batch output, a local upload) from an iterable of bytes."""
    file_id = new_file_id()
    writer = storage.writer(file_id)
    try:
        for data in chunks:
            writer.write(data)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return storage.add(file_id, filename, purpose, writer.size)


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}
