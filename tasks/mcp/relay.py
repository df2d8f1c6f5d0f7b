"""The front's side of a streamable-HTTP server (a process of ours or a remote url): requests relayed as they stream,
and its health pings.

The upstream keeps its own sessions; the front only swaps kiln's session id for the upstream's on the way in and
back on the way out. Bodies stream both ways as they come: an SSE response reaches the client event by event.
The client's credentials (the kiln key as bearer, cookies) and Origin never reach the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import httpx
from mcp.types.version import LATEST_HANDSHAKE_VERSION
from starlette.types import Receive, Scope, Send

from kiln.tasks.mcp.errors import PingFailed
from kiln.tasks.mcp.stdio import CLIENT_INFO

SESSION_HEADER = "mcp-session-id"
# request headers that stay with the front: its own hop, the client's credentials, and the session id it swaps
NOT_FORWARDED = {b"host", b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                 b"content-length", b"proxy-authorization", b"authorization", b"cookie", b"origin",
                 SESSION_HEADER.encode()}  # fmt: skip
# response headers the front's server sets itself, and the upstream's session id
NOT_RETURNED = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"date", b"server",
                SESSION_HEADER.encode()}  # fmt: skip


def relay_client() -> httpx.AsyncClient:
    """The client requests are relayed with: no read timeout, since an SSE stream may stay open for hours."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )  # fmt: skip


class HttpUpstream:
    """One streamable-HTTP endpoint the front relays to."""

    def __init__(self, url: str, client: httpx.AsyncClient):
        self.url = url
        self.client = client

    async def send(self, scope: Scope, body: bytes, upstream_session: str | None) -> httpx.Response:
        """The client's request, sent on with its body; the response's body is not read yet."""
        headers = [(name, value) for name, value in scope["headers"] if name.lower() not in NOT_FORWARDED]
        if upstream_session is not None:
            headers.append((SESSION_HEADER.encode(), upstream_session.encode()))
        request = self.client.build_request(scope["method"], self.url, headers=headers, content=body)
        return await self.client.send(request, stream=True)

    @staticmethod
    async def respond(response: httpx.Response, receive: Receive, send: Send, session_id: str | None) -> None:
        """Streams the upstream's response back as it comes, kiln's session id in place of the upstream's; stops
        (and closes the upstream's stream) when the client goes."""
        headers = [(name, value) for name, value in response.headers.raw if name.lower() not in NOT_RETURNED]
        if session_id is not None:
            headers.append((SESSION_HEADER.encode(), session_id.encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})

        async def pump() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the upstream went mid-stream: the client's stream ends too
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(client_gone())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await response.aclose()


class HttpProbe:
    """The front's own MCP session with a streamable-HTTP server, for health pings: initialize once, then a ping
    round trip per check. A session the server lost (404) is started anew by the next check."""

    def __init__(self, url: str):
        self.url = url
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self._ids = itertools.count(1)
        self._initialized = False
        self._session: str | None = None
        self._version: str | None = None

    async def ping(self) -> None:
        """One MCP ping round trip (after the handshake, the first time); PingFailed says what went wrong."""
        try:
            if not self._initialized:
                result, response = await self._call("initialize", {
                    "protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO,
                })  # fmt: skip
                self._session = response.headers.get(SESSION_HEADER)
                self._version = result.get("protocolVersion")
                await self._call("notifications/initialized", None, notify=True)
                self._initialized = True
            await self._call("ping", None)
        except httpx.HTTPError as error:
            raise PingFailed(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__) from None

    async def _call(self, method: str, params: dict[str, Any] | None, *, notify: bool = False) -> tuple[dict, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if not notify:
            message["id"] = request_id = next(self._ids)
        if params is not None:
            message["params"] = params
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if self._session:
            headers[SESSION_HEADER] = self._session
        if self._version:
            headers["mcp-protocol-version"] = self._version
        async with self._client.stream("POST", self.url, json=message, headers=headers) as response:
            if response.status_code == 404 and self._initialized:
                self._initialized, self._session = False, None
                raise PingFailed("the server lost the health check's session (404)")
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")[:200]
                raise PingFailed(f"HTTP {response.status_code} to {method}: {text}")
            if notify:
                return {}, response
            answer = await _answer(response, request_id)
        if "error" in answer:
            error = answer["error"] or {}
            raise PingFailed(f"{method} answered error {error.get('code')}: {error.get('message')}")
        return answer.get("result") or {}, response

    async def close(self) -> None:
        """Ends the probe's session on the server (if it still answers) and the client."""
        if self._session:
            with contextlib.suppress(httpx.HTTPError):
                await self._client.delete(self.url, headers={SESSION_HEADER: self._session}, timeout=1.0)
        await self._client.aclose()


async def _answer(response: httpx.Response, request_id: int) -> dict[str, Any]:
    """The JSON-RPC answer to `request_id` in a response: its JSON body, or the SSE event that carries it."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return json.loads(await response.aread())
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            message = json.loads("\n".join(data))
            data = []
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
    raise PingFailed("the response ended without an answer")
