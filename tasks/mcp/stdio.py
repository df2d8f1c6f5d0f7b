"""One stdio MCP server shared by many client sessions: ids rewritten per session, every message routed back to its own.

An stdio process is one MCP connection, so the front initializes it once itself and answers each client's
`initialize` from that result. Every request a client sends gets a fresh id on the server's side (and its
progressToken the same number), so two clients that both send id 1 never see each other's answers
(supergateway #35, #138). What the server sends goes where it belongs:

- a response, and the progress of a request, to the session that sent the request, under the client's own id
  and token;
- notifications/resources/updated to the sessions that subscribed to that resource;
- every other notification (tools/list_changed, the other list_changed, logging messages, …) to every session;
- a request of its own (sampling, elicitation, roots/list) to the one session that has requests in flight when
  it arrives, if that session's client declared the capability it needs. When several sessions have requests
  in flight, none, or the client did not declare it, the front cannot tell whose it is and answers it with a
  JSON-RPC error itself; a ping it answers at once.

From a client, notifications/initialized is swallowed (the front sent it once), notifications/cancelled goes on
with the request id rewritten, and a resources/unsubscribe that another session still needs is answered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from mcp.types import (
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    ErrorData,
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
    jsonrpc_message_adapter,
)
from mcp.types.version import LATEST_HANDSHAKE_VERSION

from kiln.tasks.mcp.errors import PingFailed

log = logging.getLogger(__name__)

REQUEST_CANCELLED = -32800  # the SDK's answer to a cancelled request on the 2025 wire (mcp.server.streamable_http)
OUTBOX_LIMIT = 10_000  # messages waiting for a session that does not read them; past it the session is ended
CLIENT_INFO = {"name": "kiln-mcp-front", "version": "1"}
# What the front declares to the server for its clients. roots is left out: servers ask roots/list right after
# initialization, when no session's request is in flight and the front could only refuse.
CLIENT_CAPABILITIES: dict[str, Any] = {"sampling": {}, "elicitation": {"form": {}}}
# the capability a client must have declared for each server→client request it is handed
NEEDS_CAPABILITY = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}


class ConnectionLost(PingFailed):
    """The server's stdout closed (it exited) while a request of the front's own waited."""


class RpcError(PingFailed):
    """The server answered a request of the front's own with a JSON-RPC error."""


@dataclass(eq=False)
class StdioSession:
    """One client session on the shared server, as the server's side sees it. What is sent to it waits in queues
    its HTTP requests read (stdio_http): one per request in flight (`waiting`, its answer and its progress) and one
    for the session's GET stream. A client that does not read never holds up the others."""

    id: str
    capabilities: dict[str, Any] = field(default_factory=dict)
    upstream_ids: dict[RequestId, int] = field(default_factory=dict)  # its request ids → the server's
    subscriptions: set[str] = field(default_factory=set)
    server_requests: set[RequestId] = field(default_factory=set)  # server→client requests handed to it, unanswered
    waiting: dict[RequestId, asyncio.Queue] = field(default_factory=dict)  # its requests' POSTs, by request id
    stream: asyncio.Queue | None = None  # its GET stream, while one is open
    closed: bool = False

    def deliver(self, message: JSONRPCMessage, related_request_id: RequestId | None = None) -> None:
        """Hands a message to the client: an answer, or what relates to a request, to that request's POST; the rest
        to the GET stream (dropped when none is open, as the SDK's own servers do without an event store)."""
        if self.closed:
            return
        if isinstance(message, JSONRPCResponse | JSONRPCError):
            related_request_id = message.id
        queue = self.waiting.get(related_request_id) if related_request_id is not None else None
        if queue is None and not isinstance(message, JSONRPCResponse | JSONRPCError):
            queue = self.stream
        if queue is None:
            return
        if queue.qsize() >= OUTBOX_LIMIT:
            log.warning("MCP session %s reads nothing: %d messages wait for it; it is ended", self.id, OUTBOX_LIMIT)
            self.close()
            return
        queue.put_nowait(message)

    def close(self) -> None:
        """Nothing more comes: every request still waiting, and the GET stream, is told so (a None)."""
        if not self.closed:
            self.closed = True
            for queue in (*self.waiting.values(), *([self.stream] if self.stream else [])):
                queue.put_nowait(None)


@dataclass(eq=False)
class _Pending:
    """A request sent to the server and not answered yet: a client's (session and its id) or the front's (future)."""

    session: StdioSession | None = None
    client_id: RequestId | None = None
    progress_token: Any = None  # the client's own, restored on the progress notifications
    future: asyncio.Future | None = None


def _error(request_id: RequestId | None, code: int, message: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))


def _wire(message: JSONRPCMessage) -> dict[str, Any]:
    return message.model_dump(by_alias=True, mode="json", exclude_unset=True)


class StdioServer:
    """The front's single MCP connection to one stdio server process, multiplexed over client sessions."""

    def __init__(self, stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader, name: str):
        self.name = name  # "replica 2", for messages
        self._stdin = stdin
        self._stdout = stdout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._sessions: dict[str, StdioSession] = {}
        self._server_requests: dict[RequestId, StdioSession] = {}
        self.initialize_result: dict[str, Any] | None = None
        self.lost: str | None = None  # why the connection ended, once it has

    @property
    def in_flight(self) -> int:
        """Client requests the server has not answered yet."""
        return sum(1 for pending in self._pending.values() if pending.session is not None)

    # the front's own requests: initialize and health pings

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sends a request of the front's own and waits for its result."""
        if self.lost:
            raise ConnectionLost(self.lost)
        upstream_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[upstream_id] = _Pending(future=future)
        try:
            await self._send({"jsonrpc": "2.0", "id": upstream_id, "method": method,
                              **({"params": params} if params is not None else {})})  # fmt: skip
            return await future
        finally:
            self._pending.pop(upstream_id, None)

    async def initialize(self) -> dict[str, Any]:
        """The handshake, once for every session to come; its result answers each client's initialize."""
        result = await self.request("initialize", {
            "protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": CLIENT_CAPABILITIES, "clientInfo": CLIENT_INFO,
        })  # fmt: skip
        await self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.initialize_result = result
        return result

    async def ping(self) -> None:
        await self.request("ping")

    # client sessions

    def open(self, session_id: str) -> StdioSession:
        session = StdioSession(session_id)
        self._sessions[session_id] = session
        return session

    async def close_session(self, session: StdioSession) -> None:
        """The session ended (DELETE, or its replica going): its requests still in flight are cancelled."""
        self._sessions.pop(session.id, None)
        session.close()
        for upstream_id, pending in list(self._pending.items()):
            if pending.session is session:
                del self._pending[upstream_id]
                with contextlib.suppress(ConnectionError):
                    params = {"requestId": upstream_id, "reason": "the client's session ended"}
                    await self._send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
        for request_id in session.server_requests:
            self._server_requests.pop(request_id, None)
            await self._answer_server(_error(request_id, INTERNAL_ERROR, "the client's session ended"))

    async def from_client(self, session: StdioSession, message: JSONRPCMessage) -> None:
        """A message a client sent in its session, on its way to the server (or answered here)."""
        if isinstance(message, JSONRPCRequest):
            await self._client_request(session, message)
        elif isinstance(message, JSONRPCNotification):
            await self._client_notification(session, message)
        elif message.id in session.server_requests:  # its answer to a server→client request: ids are the server's
            session.server_requests.discard(message.id)
            self._server_requests.pop(message.id, None)
            await self._answer_server(message)

    async def _client_request(self, session: StdioSession, request: JSONRPCRequest) -> None:
        params = dict(request.params or {})
        if request.method == "initialize":
            session.capabilities = params.get("capabilities") or {}
            session.deliver(JSONRPCResponse(jsonrpc="2.0", id=request.id, result=self.initialize_result))
            return
        if request.method == "resources/subscribe" and isinstance(params.get("uri"), str):
            session.subscriptions.add(params["uri"])
        if request.method == "resources/unsubscribe" and isinstance(params.get("uri"), str):
            session.subscriptions.discard(params["uri"])
            if any(params["uri"] in other.subscriptions for other in self._sessions.values()):
                session.deliver(JSONRPCResponse(jsonrpc="2.0", id=request.id, result={}))
                return
        if self.lost:
            session.deliver(_error(request.id, INTERNAL_ERROR, f"{self.name} {self.lost}; start a new session"))
            return
        upstream_id = next(self._ids)
        pending = _Pending(session=session, client_id=request.id)
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            pending.progress_token = meta["progressToken"]
            params["_meta"] = {**meta, "progressToken": upstream_id}
        self._pending[upstream_id] = pending
        session.upstream_ids[request.id] = upstream_id
        try:
            await self._send({"jsonrpc": "2.0", "id": upstream_id, "method": request.method,
                              **({"params": params} if request.params is not None else {})})  # fmt: skip
        except ConnectionError:
            self._answered(upstream_id)
            session.deliver(_error(request.id, INTERNAL_ERROR, f"{self.name} closed its stdin; start a new session"))

    async def _client_notification(self, session: StdioSession, notification: JSONRPCNotification) -> None:
        params = notification.params or {}
        if notification.method == "notifications/initialized":
            return
        if notification.method == "notifications/cancelled":
            upstream_id = session.upstream_ids.get(params.get("requestId"))
            if upstream_id is None:
                return  # answered already, or never sent
            self._answered(upstream_id)
            # the 2025 wire ends a cancelled request's stream with an error for it (as the SDK's own transport does)
            session.deliver(_error(params["requestId"], REQUEST_CANCELLED, "Request cancelled"))
            params = {**params, "requestId": upstream_id}
        with contextlib.suppress(ConnectionError):
            await self._send({"jsonrpc": "2.0", "method": notification.method, "params": params})

    # the server's side

    async def run(self) -> None:
        """Reads the server's messages until its stdout closes; then every request in flight is answered with an
        error."""
        try:
            while line := await self._stdout.readline():
                if not line.strip():
                    continue
                try:
                    message = jsonrpc_message_adapter.validate_json(line, by_name=False)
                except ValueError:
                    log.warning("%s wrote a line on stdout that is no JSON-RPC message: %.200r", self.name, line)
                    continue
                await self._from_server(message)
        except (ValueError, ConnectionError) as error:  # a line past the limit, or the pipe broke
            log.warning("%s: reading its stdout failed: %s", self.name, error)
        finally:
            self.fail(self.lost or "closed its stdout")

    def fail(self, reason: str) -> None:
        """The connection is gone: every waiting request, the front's and the clients', is answered with the reason."""
        self.lost = self.lost or reason
        for upstream_id, pending in list(self._pending.items()):
            del self._pending[upstream_id]
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(ConnectionLost(f"{self.name} {self.lost}"))
            elif pending.session is not None:
                pending.session.upstream_ids.pop(pending.client_id, None)
                message = f"{self.name} {self.lost} while this request was in flight; start a new session"
                pending.session.deliver(_error(pending.client_id, INTERNAL_ERROR, message))

    async def _from_server(self, message: JSONRPCMessage) -> None:
        if isinstance(message, JSONRPCResponse | JSONRPCError):
            pending = self._answered(message.id) if isinstance(message.id, int) else None
            if pending is None:
                if message.id is None:
                    log.warning("%s answered with an error for no request: %s", self.name, message)
                return
            if pending.future is not None:
                if isinstance(message, JSONRPCError):
                    pending.future.set_exception(RpcError(f"error {message.error.code}: {message.error.message}"))
                else:
                    pending.future.set_result(message.result)
                return
            message.id = pending.client_id
            pending.session.deliver(message)
        elif isinstance(message, JSONRPCNotification):
            self._server_notification(message)
        else:
            await self._server_request(message)

    def _server_notification(self, notification: JSONRPCNotification) -> None:
        params = notification.params or {}
        if notification.method == "notifications/progress":
            pending = self._pending.get(params.get("progressToken"))
            if pending is not None and pending.session is not None:
                notification.params = {**params, "progressToken": pending.progress_token}
                pending.session.deliver(notification, pending.client_id)
        elif notification.method == "notifications/cancelled":  # of a request the server sent a client
            session = self._server_requests.pop(params.get("requestId"), None)
            if session is not None:
                session.server_requests.discard(params["requestId"])
                session.deliver(notification)
        elif notification.method == "notifications/resources/updated":
            for session in list(self._sessions.values()):
                if params.get("uri") in session.subscriptions:
                    session.deliver(notification)
        else:
            for session in list(self._sessions.values()):
                session.deliver(notification)

    async def _server_request(self, request: JSONRPCRequest) -> None:
        if request.method == "ping":
            await self._answer_server(JSONRPCResponse(jsonrpc="2.0", id=request.id, result={}))
            return
        asking = {pending.session for pending in self._pending.values() if pending.session is not None}
        if len(asking) != 1:
            why = f"{len(asking)} sessions have requests in flight" if asking else "no session has a request in flight"
            await self._answer_server(_error(request.id, METHOD_NOT_FOUND, f"kiln's MCP front cannot tell which "
                                             f"client {request.method} is for: {why}"))  # fmt: skip
            return
        (session,) = asking
        needed = NEEDS_CAPABILITY.get(request.method)
        if needed is not None and needed not in session.capabilities:
            await self._answer_server(_error(request.id, METHOD_NOT_FOUND, f"the client did not declare {needed}"))
            return
        related = [pending.client_id for pending in self._pending.values() if pending.session is session]
        self._server_requests[request.id] = session
        session.server_requests.add(request.id)
        session.deliver(request, related[0] if len(related) == 1 else None)

    async def _answer_server(self, message: JSONRPCMessage) -> None:
        with contextlib.suppress(ConnectionError):
            await self._send(_wire(message))

    def _answered(self, upstream_id: int) -> _Pending | None:
        """Forgets a request that is answered (or cancelled); its entry, if it was waiting."""
        pending = self._pending.pop(upstream_id, None)
        if pending is not None and pending.session is not None:
            pending.session.upstream_ids.pop(pending.client_id, None)
        return pending

    async def _send(self, message: dict[str, Any]) -> None:
        if self._stdin.is_closing():
            raise ConnectionResetError("its stdin is closed")
        self._stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self._stdin.drain()
