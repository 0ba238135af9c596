"""HTTP routes of the Files and Batches API: an APIRouter over BatchService, mounted under /v1 and
/openai/v1. Errors are OpenAIError (the app's handler turns them into OpenAI error bodies).

    service = BatchService.create(serving.dispatch, store_url=..., data_dir=...)
    create_app(engine, serving, batches=service)   # routes + the runner's start/stop in the lifespan
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from minivllm.batches.files import MAX_FILE_BYTES, file_object, receive_upload
from minivllm.batches.service import BatchService
from minivllm.input_checks import parse_json
from minivllm.openai.errors import OpenAIError


def build_batch_router(service: BatchService) -> APIRouter:
    api = APIRouter(tags=["Batch"])

    @api.post("/files")
    async def create_file(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_FILE_BYTES + (1 << 20):
            raise OpenAIError(f"The file is larger than the {MAX_FILE_BYTES >> 20} MB limit.", 413, param="file")
        row = await receive_upload(service.storage, request.headers.get("content-type", ""), request.stream())
        return JSONResponse(file_object(row))

    @api.get("/files")
    async def list_files(purpose: str | None = None, after: str | None = None, limit: int = 10000,
                         order: str = "desc") -> JSONResponse:
        return JSONResponse(await service.list_files(purpose, after, limit, order))

    @api.get("/files/{file_id}")
    async def retrieve_file(file_id: str) -> JSONResponse:
        return JSONResponse(await service.retrieve_file(file_id))

    @api.get("/files/{file_id}/content")
    async def file_content(file_id: str) -> StreamingResponse:
        row = await service.file_row(file_id)
        # A sync iterator: Starlette reads it in a worker thread, a block at a time.
        return StreamingResponse(service.file_content(row), media_type="application/octet-stream",
                                 headers={"Content-Length": str(row["bytes"])})

    @api.delete("/files/{file_id}")
    async def delete_file(file_id: str) -> JSONResponse:
        return JSONResponse(await service.delete_file(file_id))

    @api.post("/batches")
    async def create_batch(request: Request) -> JSONResponse:
        try:
            body = parse_json(await request.body())
        except ValueError as e:
            raise OpenAIError(str(e), 400) from None
        return JSONResponse(await service.create_batch(body))

    @api.get("/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> JSONResponse:
        return JSONResponse(await service.list_batches(after, limit))

    @api.get("/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> JSONResponse:
        return JSONResponse(await service.retrieve_batch(batch_id))

    @api.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> JSONResponse:
        return JSONResponse(await service.cancel_batch(batch_id))

    return api
