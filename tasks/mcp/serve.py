"""The mcp_host job's executor: its deployment served from the worker until the job is cancelled or it fails.

The front listens on a loopback port of the worker; the kiln API gives it its one public URL
(/api/v1/mcp/{name}/mcp) and forwards to it, with the token kiln.services keeps: a request without it is refused,
so nothing on the machine reaches the servers around kiln's keys. `POST /_kiln/replicas` {"replicas": n}, with
the same token, scales the deployment live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

import uvicorn
from starlette.types import Receive, Scope, Send

import kiln.services as services
from kiln.runtime import current_job, report_health
from kiln.schemas.mcp_host import McpHostInput
from kiln.tasks.mcp.deployment import Deployment
from kiln.tasks.mcp.http import header
from kiln.tasks.mcp.sandboxed import launcher_for

log = logging.getLogger(__name__)

SCALE_PATH = "/_kiln/replicas"
# what the job's SSE stream shows of the deployment's events; its failure is the job's own end
HEALTH_EVENTS = {"starting", "healthy", "unhealthy", "restarting", "scaled"}


class Guarded:
    """The deployment's front behind the service token, with the scaling endpoint beside it."""

    def __init__(self, deployment: Deployment, token: str):
        self.deployment = deployment
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not secrets.compare_digest(header(scope, services.TOKEN_HEADER) or "",
                                                                  self.token):  # fmt: skip
            await _answer(send, 403, {"detail": "not through kiln"})
            return
        if scope["type"] == "http" and scope["path"] == SCALE_PATH:
            await self._scale(receive, send)
            return
        await self.deployment.app(scope, receive, send)

    async def _scale(self, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            await self.deployment.set_replicas(int(json.loads(body)["replicas"]))
        except Exception as exc:  # noqa: BLE001 - the API turns it into the caller's error
            await _answer(send, 409, {"detail": str(exc)})
            return
        await _answer(send, 200, {"replicas": self.deployment.target, "status": self.deployment.status()})


async def _answer(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def serve_deployment(spec: McpHostInput) -> str:
    """Serves the deployment until it fails (its reason comes back) or the job is cancelled; leaves nothing running."""
    job_id, _, flow_run_id = current_job()
    job_id = job_id or f"local-{secrets.token_hex(4)}"
    deployment: Deployment | None = None

    def on_event(kind: str, data: dict) -> None:
        report_health(deployment.status(), kind if kind in HEALTH_EVENTS else None, data)

    launch, command = await launcher_for(spec, flow_run_id)
    deployment = Deployment(spec, on_event=on_event, command=command, **({"launch": launch} if launch else {}))
    server = None
    try:
        await deployment.start()
        service_token = secrets.token_urlsafe(32)
        server = uvicorn.Server(uvicorn.Config(Guarded(deployment, service_token), host="127.0.0.1", port=0,
                                               log_level="warning", lifespan="off"))  # fmt: skip
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        services.register(job_id, f"http://127.0.0.1:{port}", service_token)
        report_health(deployment.status(), None)
        return await deployment.wait()
    finally:
        services.unregister(job_id)
        if server is not None:
            server.should_exit = True
        await deployment.stop()
