"""MCP deployments' one URL each: /api/v1/mcp/{name}/mcp, forwarded to the front its mcp_host job serves on a worker.

Any MCP client reaches a deployment of its key's project here with the kiln key as its bearer; another project's
key finds nothing (404). The request goes on to the job's front (kiln.tasks.mcp.serve) with the service token in
place of the key, streamed both ways, so SSE answers and the GET stream pass as they come.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.background import BackgroundTask

import kiln.services as services
from kiln.api.auth import admit, bearer, bearer_key
from kiln.api.contract import error_responses
from kiln.errors import Conflict, Forbidden, NotFound, ServerError, Unauthorized
from kiln.schemas.statuses import JobStatus
from kiln.store.models import JobRow

router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, Forbidden, ServerError))

MCP_HOST = "mcp_host"
# what passes from the client to the front, and back: MCP's own headers and the body's framing
FORWARDED = ("accept", "content-type", "mcp-session-id", "mcp-protocol-version", "last-event-id")
RETURNED = ("content-type", "mcp-session-id", "mcp-protocol-version", "retry-after", "cache-control")

LOOPBACK = ("localhost", "127.0.0.1", "::1")

_http: httpx.AsyncClient | None = None


def _client() -> httpx.AsyncClient:
    global _http
    if _http is None:
        # a tools/call may take minutes, an SSE stream stays open: no read timeout
        _http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
    return _http


async def serving(
    request: Request, name: str, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> services.Service:
    """Where the caller's project's running mcp_host job named `name` (the newest, if several) serves. Every request
    of an MCP session comes through here, so the key and the project's deployments are read together, in one read."""
    check_origin(request)
    key = bearer_key(credentials)
    caller, rows = await request.app.state.store.caller_and_jobs(key, type=MCP_HOST, status=JobStatus.RUNNING,
                                                                 limit=200)  # fmt: skip
    admit(request, key, caller)
    job_id = next((job_id for job_id, input in rows if (input or {}).get("name") == name), None)
    if job_id is None:
        raise NotFound(f"name: no MCP deployment {name!r} is serving in this project; deploy one as an mcp_host "
                       "job (`kiln mcp deploy`), or see `kiln mcp list`")  # fmt: skip
    service = services.lookup(job_id)
    if service is None:
        raise NotFound(f"name: the MCP deployment {name!r} (job {job_id}) is starting; try again in a moment")
    return service


def check_origin(request: Request) -> None:
    """Refuses a browser page of a foreign origin (DNS rebinding: a page of evil.example whose name resolves to this
    host). A request without an Origin header is no browser's and passes; the bearer key is checked after."""
    origin = request.headers.get("origin")
    if origin is None or urlsplit(origin).hostname in LOOPBACK:
        return
    if origin.rstrip("/") not in request.app.state.settings.mcp_allowed_origins:
        raise Forbidden(f"Origin: {origin!r} may not call MCP deployments; an operator allows a browser origin with "
                        "KILN_MCP_ALLOWED_ORIGINS")  # fmt: skip


Serving = Annotated[services.Service, Depends(serving)]


async def _forward(request: Request, service: services.Service, name: str):
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
    upstream = _client().build_request(request.method, f"{service.url}/mcp", content=await request.body(),
                                       headers={**headers, services.TOKEN_HEADER: service.token})  # fmt: skip
    try:
        response = await _client().send(upstream, stream=True)
    except httpx.HTTPError as exc:
        raise ServerError(f"the MCP deployment {name!r} did not answer ({type(exc).__name__})") from None
    return StreamingResponse(
        response.aiter_raw(), status_code=response.status_code,
        headers={k: v for k, v in response.headers.items() if k.lower() in RETURNED},
        background=BackgroundTask(response.aclose),
    )  # fmt: skip


DESCRIPTION = ("MCP streamable HTTP: POST JSON-RPC messages, GET the server's stream, DELETE the session "
               "(Mcp-Session-Id). 404 when the project has no deployment of that name serving; 403 for a browser "
               "Origin that is neither loopback nor in KILN_MCP_ALLOWED_ORIGINS.")


@router.post("/mcp/{name}/mcp", summary="An MCP deployment's endpoint (streamable HTTP)", description=DESCRIPTION,
             responses=error_responses(NotFound))  # fmt: skip
async def mcp_post(request: Request, name: str, service: Serving):
    return await _forward(request, service, name)


@router.get("/mcp/{name}/mcp", summary="An MCP deployment's server stream (streamable HTTP)", description=DESCRIPTION,
            responses=error_responses(NotFound))  # fmt: skip
async def mcp_get(request: Request, name: str, service: Serving):
    return await _forward(request, service, name)


@router.delete("/mcp/{name}/mcp", summary="End an MCP session (streamable HTTP)", description=DESCRIPTION,
               responses=error_responses(NotFound))  # fmt: skip
async def mcp_delete(request: Request, name: str, service: Serving):
    return await _forward(request, service, name)


async def scale(request: Request, job: JobRow, replicas: int) -> dict:
    """Sets a running mcp_host job's replicas live; Conflict when it does not serve or cannot scale."""
    if job.type != MCP_HOST or JobStatus(job.status) is not JobStatus.RUNNING:
        raise Conflict(f"replicas: job {job.id} is no running mcp_host job ({job.type}, {job.status})")
    service = services.lookup(job.id)
    if service is None:
        raise Conflict(f"replicas: the MCP deployment of job {job.id} is starting; try again in a moment")
    answer = await _client().post(f"{service.url}/_kiln/replicas", json={"replicas": replicas},
                                  headers={services.TOKEN_HEADER: service.token})  # fmt: skip
    if answer.status_code != 200:
        raise Conflict(f"replicas: {answer.json().get('detail', answer.text)}")
    return answer.json()
