"""Files: a project's uploads (POST and GET /api/v1/files) and a job's files (GET /api/v1/jobs/{id}/files…)."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.errors import InputInvalid, InvalidRequest, NotFound, ServerError, TooLarge, Unauthorized
from kiln.files import FileStore
from kiln.schemas.files import StoredFile, name_problem
from kiln.store.batches import files_owner

router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, ServerError))

Project = Annotated[str, Depends(project_of_caller)]

# files and other form fields one upload may carry; the bytes are limited by KILN_UPLOAD_MAX_BYTES
MAX_FILES = 1000
FIELD = "files"

UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    FIELD: {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "minItems": 1,
                        "description": "The files, one part each, named by their filename (`curl -F files=@data.csv`): "
                        "one path segment, at most 255 bytes. They are stored in order; an upload of a name the "
                        "project has (or a name sent twice) replaces it.",
                    }
                },
                "required": [FIELD],
                "additionalProperties": False,
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "path": {
                        "type": "string",
                        "minLength": 1,
                        "description": "A file, or a folder whose files (not its subfolders) are each uploaded by "
                        "name, on the API's machine under KILN_HOME/datasets (the path relative to KILN_HOME, or "
                        "absolute). For data already there: nothing is sent but the path.",
                    }
                },
                "required": ["path"],
                "additionalProperties": False,
            }
        },
    },
}


def files_of(request: Request) -> FileStore:
    return FileStore.of(request.app.state.settings)


async def _at_most(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request body, or TooLarge once more than `limit` bytes have come."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"body: an upload takes at most {limit} bytes ({_human(limit)}, KILN_UPLOAD_MAX_BYTES), its files "
                    "together; send fewer or smaller files per request")  # fmt: skip


def _human(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:g} {unit}" if unit == "bytes" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@router.post(
    "/files",
    status_code=201,
    response_model=list[StoredFile],
    summary="Upload files to the project (multipart, or a path under KILN_HOME/datasets); a job's input names them",
    responses=error_responses(InvalidRequest, TooLarge, InputInvalid),
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def upload_files(request: Request, project_id: Project) -> list[StoredFile]:
    limit = request.app.state.settings.upload_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)  # before a byte of it is read
    media_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if media_type == b"application/json":
        return await _upload_path(request, project_id, limit)
    if media_type != b"multipart/form-data":
        sent = media_type.decode("latin-1") or "none"
        raise InvalidRequest(f"Content-Type: an upload is multipart/form-data with one part named '{FIELD}' per file "
                             f"(curl -F files=@data.csv); got {sent}")  # fmt: skip
    try:
        form = await MultiPartParser(request.headers, _at_most(request.stream(), limit), max_files=MAX_FILES,
                                     max_fields=MAX_FILES).parse()  # fmt: skip
    except MultiPartException as exc:
        raise InvalidRequest(f"body: not multipart/form-data as its Content-Type says ({exc.message})") from None
    try:
        parts = _read_parts(form)
        store = files_of(request)
        return [await asyncio.to_thread(store.upload, project_id, part.filename, part.file) for part in parts]
    finally:
        await form.close()


async def _upload_path(request: Request, project_id: str, limit: int) -> list[StoredFile]:
    """POST /api/v1/files with `{"path"}`: a file or folder under KILN_HOME/datasets, uploaded where it lies."""
    import json

    try:
        body = json.loads(await request.body())
    except ValueError:
        raise InvalidRequest("body: not JSON; send {\"path\": \"…\"} or multipart files") from None
    if not isinstance(body, dict) or set(body) != {"path"} or not isinstance(body["path"], str) or not body["path"]:
        raise InputInvalid("path: send {\"path\": \"…\"}, a file or folder under KILN_HOME/datasets, and nothing else; "
                           "or the files themselves as multipart/form-data parts named 'files'",
                           details=[{"loc": ["body", "path"], "msg": "required string", "type": "invalid_upload"}])
    home = request.app.state.settings.home_dir
    try:
        return await asyncio.to_thread(files_of(request).upload_path_in_home, project_id, home, body["path"], limit)
    except OverflowError:
        raise _too_large(limit) from None


def _read_parts(form) -> list[UploadFile]:
    """The form's file parts, or InputInvalid naming each part that is not one with a name kiln takes."""
    problems = [(["body", key], f"{key}: an upload has only '{FIELD}' parts") for key in form if key != FIELD]
    parts = form.getlist(FIELD)
    if not parts and not problems:
        problems.append((["body", FIELD], f"{FIELD}: send one or more files, each a part named '{FIELD}' "
                                          "(curl -F files=@data.csv)"))  # fmt: skip
    for index, part in enumerate(parts):
        where = f"{FIELD}.{index}"
        if not isinstance(part, UploadFile):
            problems.append((["body", FIELD, index], f"{where}: a file is expected (a part with a filename), "
                                                     "not a text field"))  # fmt: skip
            continue
        problem = name_problem(part.filename or "")
        if problem:
            problems.append((["body", FIELD, index], f"{where}: filename {part.filename!r}: {problem}"))
    if problems:
        raise InputInvalid("; ".join(message for _, message in problems),
                           details=[{"loc": loc, "msg": message.split(": ", 1)[1], "type": "invalid_upload"}
                                    for loc, message in problems])  # fmt: skip
    return parts


@router.get("/files", response_model=list[StoredFile], summary="The project's uploads, by name")
async def list_files(request: Request, project_id: Project) -> list[StoredFile]:
    return await asyncio.to_thread(files_of(request).uploads, project_id)


@router.get(
    "/jobs/{job_id}/files",
    response_model=list[StoredFile],
    summary="The files a job produced (a cache hit: those of the job it reused), by name",
    responses=error_responses(NotFound),
)
async def list_job_files(request: Request, job_id: str, project_id: Project) -> list[StoredFile]:
    owner = await _files_owner(request, job_id, project_id)
    return await asyncio.to_thread(files_of(request).job_files, owner)


async def _files_owner(request: Request, job_id: str, project_id: str) -> str:
    return await files_owner(request.app.state.store, job_id, project_id)


@router.get(
    "/jobs/{job_id}/files/{name}",
    summary="Download a file a job produced",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file, its Content-Type guessed from its name, as an attachment "
            "(Content-Disposition) of that name; its ETag is its sha256.",
            "content": {"*/*": {}},
            "headers": {
                "Content-Disposition": {"description": "attachment; filename=\"<name>\"", "schema": {"type": "string"}},
                "ETag": {"description": "The content's sha256, quoted.", "schema": {"type": "string"}},
            },
        },
        **error_responses(NotFound),
    },
)
async def download_job_file(request: Request, job_id: str, name: str, project_id: Project) -> FileResponse:
    owner = await _files_owner(request, job_id, project_id)
    found = await asyncio.to_thread(files_of(request).job_file, owner, name)
    if found is None:
        raise NotFound(f"job {job_id} has no file {name!r}; GET /api/v1/jobs/{job_id}/files lists its files")
    stored, path = found
    if not path.exists():
        raise ServerError(f"the content of job {job_id}'s file {name!r} ({stored.sha256}) is missing from "
                          f"{path.parent.parent}")  # fmt: skip
    return FileResponse(path, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
                        filename=name, headers={"ETag": f'"{stored.sha256}"'})  # fmt: skip
