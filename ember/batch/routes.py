"""/v1/files and /v1/batches (the OpenAI Batch API) on `ember serve`, installed as an app addon
(`install_batch_api`); the logic is in `ember.batch.service`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from ember.batch.protocol import (FILE_PURPOSES, BatchList, BatchObject, CreateBatchRequest,
                                  FileDeleted, FileList, FileObject)
from ember.batch.service import BatchService
from ember.server.errors import bad_request
from ember.server.routes import ERROR_RESPONSES
from ember.server.serving.base import json_response
from ember.server.state import AppState

router = APIRouter(tags=["Batch"])


def install_batch_api(app: FastAPI, state: AppState) -> BatchService:
    """Add the Batch API to `app` (an `AddonFactory` for `create_app`): its routes, and the
    service that runs batches on the app's engine from `ServerConfig.batch_dir`."""
    config = state.config
    root = config.server.batch_dir or str(config.env.cache_path / "batches")
    service = BatchService(Path(root).expanduser(), state)
    app.state.ember_batches = service
    app.include_router(router)
    return service


def get_batches(request: Request) -> BatchService:
    service: BatchService = request.app.state.ember_batches
    return service


BatchDep = Annotated[BatchService, Depends(get_batches)]


async def _chunks(upload: UploadFile, size: int = 1 << 20) -> AsyncIterator[bytes]:
    while chunk := await upload.read(size):
        yield chunk


@router.post("/v1/files", response_model=FileObject, responses=ERROR_RESPONSES)
async def create_file(service: BatchDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> JSONResponse:
    """Upload a file (multipart: `file`, `purpose`); batch inputs use purpose 'batch'."""
    if purpose not in FILE_PURPOSES:
        raise bad_request(f"purpose must be one of {', '.join(FILE_PURPOSES)}", "purpose")
    return json_response(await service.files.create(_chunks(file), file.filename or "upload",
                                                    purpose))


@router.get("/v1/files", response_model=FileList, responses=ERROR_RESPONSES)
async def list_files(service: BatchDep, purpose: str | None = None) -> JSONResponse:
    """Stored files, newest first."""
    return json_response(FileList(data=service.files.list(purpose)))


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=ERROR_RESPONSES)
async def retrieve_file(file_id: str, service: BatchDep) -> JSONResponse:
    return json_response(service.files.get(file_id))


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=ERROR_RESPONSES)
async def delete_file(file_id: str, service: BatchDep) -> JSONResponse:
    service.files.delete(file_id)
    return json_response(FileDeleted(id=file_id))


@router.get("/v1/files/{file_id}/content", response_class=FileResponse,
            responses=ERROR_RESPONSES)
async def file_content(file_id: str, service: BatchDep) -> FileResponse:
    """The file's bytes (batch output and error files are JSONL)."""
    return FileResponse(service.files.content_path(file_id),
                        media_type="application/octet-stream")


@router.post("/v1/batches", response_model=BatchObject, responses=ERROR_RESPONSES)
async def create_batch(body: CreateBatchRequest, service: BatchDep) -> JSONResponse:
    """Run an uploaded JSONL file of requests in the background (lower priority)."""
    return json_response(service.create(body))


@router.get("/v1/batches", response_model=BatchList, responses=ERROR_RESPONSES)
async def list_batches(service: BatchDep, after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:
    """Batches, newest first (`after`: the last id of the previous page)."""
    batches = service.batches.list()
    if after is not None:
        ids = [b.id for b in batches]
        batches = batches[ids.index(after) + 1:] if after in ids else []
    page = batches[:limit]
    return json_response(BatchList(data=page, first_id=page[0].id if page else None,
                                   last_id=page[-1].id if page else None,
                                   has_more=len(batches) > limit))


@router.get("/v1/batches/{batch_id}", response_model=BatchObject, responses=ERROR_RESPONSES)
async def retrieve_batch(batch_id: str, service: BatchDep) -> JSONResponse:
    return json_response(service.batches.get(batch_id))


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject,
             responses=ERROR_RESPONSES)
async def cancel_batch(batch_id: str, service: BatchDep) -> JSONResponse:
    """Stop a batch; what finished is kept in its output and error files."""
    return json_response(service.cancel(batch_id))
