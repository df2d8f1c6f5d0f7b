"""A deployment's one MCP streamable-HTTP endpoint (an ASGI app): sessions opened on a replica, and kept there.

An `initialize` without Mcp-Session-Id opens a session on the healthy replica, not draining, that holds the fewest
sessions; the answer carries kiln's own session id, and every later request with that id (POST, the GET stream,
DELETE) goes to that replica and no other. A session whose replica stopped (exited, restarted, drained) is gone:
its id answers 404, which tells an MCP client to start a new session with initialize (the spec's rule for a lost
session); the new one lands on a replica that serves.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from mcp.types import INTERNAL_ERROR
from starlette.types import Receive, Scope, Send

from kiln.tasks.mcp.http import BodyTooLarge, header, json_rpc_error, parse, read_body, replaying
from kiln.tasks.mcp.relay import SESSION_HEADER
from kiln.tasks.mcp.replica import Replica

RETRY_AFTER_SECONDS = 1  # told to a client when no replica can take a session right now


class Front:
    """The ASGI app. `pick` names the replica a new session goes to (None: none can take one, and `unavailable`
    says why); `sessionless` says whether a request outside any session may be relayed (HTTP servers only)."""

    def __init__(self, pick: Callable[[], Replica | None], unavailable: Callable[[], str], *, sessionless: bool):
        self._pick = pick
        self._unavailable = unavailable
        self._sessionless = sessionless
        self.sessions: dict[str, Replica] = {}

    def forget(self, replica: Replica) -> None:
        """The replica is stopping: its sessions answer 404 from now on."""
        for session_id in list(replica.sessions):
            self.sessions.pop(session_id, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the deployment starts and stops by itself, not with the server that hosts it
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = b""
        if scope["method"] == "POST":
            try:
                body = await read_body(receive)
            except BodyTooLarge:
                await json_rpc_error(send, 413, "Payload Too Large: a request body may have at most 4 MiB")
                return
        receive = replaying(body, receive)
        session_id = header(scope, SESSION_HEADER)
        if session_id is not None:
            await self._in_session(session_id, scope, receive, send, body)
            return
        message = parse(body) if body else None
        request_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(message, dict) and message.get("method") == "initialize":
            await self._open(scope, receive, send, body, request_id)
        elif self._sessionless and (replica := self._pick()) is not None:
            await replica.serve_sessionless(scope, receive, send, body)
        elif self._sessionless:
            await self._no_replica(send, request_id)
        else:
            await json_rpc_error(send, 400, "Bad Request: Missing session ID; a session starts with initialize "
                                 "(this server speaks the initialize handshake)", request_id=request_id)  # fmt: skip

    async def _in_session(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        replica = self.sessions.get(session_id)
        if replica is None or session_id not in replica.sessions:
            self.sessions.pop(session_id, None)
            await json_rpc_error(send, 404, "Session not found: it ended, or the replica that held it stopped; "
                                 "send initialize to start a new session")  # fmt: skip
            return
        try:
            await replica.serve(session_id, scope, receive, send, body)
        finally:
            if session_id not in replica.sessions:
                self.sessions.pop(session_id, None)

    async def _open(self, scope: Scope, receive: Receive, send: Send, body: bytes, request_id) -> None:
        replica = self._pick()
        if replica is None:
            await self._no_replica(send, request_id)
            return
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = replica
        try:
            await replica.open_session(session_id, scope, receive, send, body)
        finally:
            if session_id not in replica.sessions:
                self.sessions.pop(session_id, None)

    async def _no_replica(self, send: Send, request_id) -> None:
        message = f"Service Unavailable: no replica can take a session now ({self._unavailable()})"
        await json_rpc_error(send, 503, message, request_id=request_id, code=INTERNAL_ERROR,
                             headers={"retry-after": str(RETRY_AFTER_SECONDS)})
