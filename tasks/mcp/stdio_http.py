"""The streamable-HTTP side of a client session on a shared stdio server: each POST, GET and DELETE answered from the
session's own messages.

A POST with a request waits for its answer and sends it as JSON, or, when the client accepts SSE and asked for
progress (a progressToken), as an SSE stream that carries the progress and then the answer: the spec lets the
server choose either, and JSON saves the client an event stream on the calls that need none (measured in
bench/mcp_front.py). A server message related to a request that answers in JSON goes to the GET stream. A POST
with a notification or an answer gets 202. GET opens the session's one SSE stream for everything else; DELETE
ends the session. Resuming a stream with Last-Event-ID is not offered (the SDK's own servers offer it only with
an event store).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from mcp.types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from kiln.tasks.mcp.http import header, json_rpc_error
from kiln.tasks.mcp.relay import SESSION_HEADER
from kiln.tasks.mcp.stdio import StdioServer, StdioSession


class StdioHttpSession:
    """One session's HTTP requests, served against the shared StdioServer."""

    def __init__(self, server: StdioServer, session: StdioSession):
        self.server = server
        self.session = session
        self.ended = False
        self._headers = [(SESSION_HEADER.encode(), session.id.encode())]

    async def handle(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        method = scope["method"]
        if method == "POST":
            await self._post(scope, receive, send, body)
        elif method == "GET":
            await self._get(scope, receive, send)
        elif method == "DELETE":
            await self.end()
            await self._send_json(send, 200, b"")
        else:
            headers = {"allow": "GET, POST, DELETE", SESSION_HEADER: self.session.id}
            await json_rpc_error(send, 405, "Method Not Allowed", headers=headers)

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            await self.server.close_session(self.session)

    async def _post(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        accept = header(scope, "accept") or ""
        if "application/json" not in accept and "*/*" not in accept:
            await self._error(send, 406, "Not Acceptable: Client must accept application/json")
            return
        if not (header(scope, "content-type") or "").startswith("application/json"):
            await self._error(send, 415, "Unsupported Media Type: Content-Type must be application/json")
            return
        try:
            message = jsonrpc_message_adapter.validate_json(body, by_name=False)
        except ValidationError as error:
            code = PARSE_ERROR if any(e["type"] == "json_invalid" for e in error.errors()) else INVALID_REQUEST
            await self._error(send, 400, f"Bad Request: not one JSON-RPC message: {error.errors()[0]['msg']}", code)
            return
        if not isinstance(message, JSONRPCRequest):
            await self.server.from_client(self.session, message)
            await self._send_json(send, 202, b"")
            return
        answers: asyncio.Queue = asyncio.Queue()
        self.session.waiting[message.id] = answers
        if self.session.closed:
            answers.put_nowait(None)
        try:
            await self.server.from_client(self.session, message)
            meta = (message.params or {}).get("_meta")
            if "text/event-stream" in accept and isinstance(meta, dict) and "progressToken" in meta:
                await self._answer_as_sse(send, answers, message)
            else:
                await self._answer_as_json(send, answers, message)
        finally:
            if self.session.waiting.get(message.id) is answers:
                del self.session.waiting[message.id]

    async def _answer_as_json(self, send: Send, answers: asyncio.Queue, request: JSONRPCRequest) -> None:
        while True:
            item = await answers.get()
            if item is None:
                item = _ended(request)
            if isinstance(item, JSONRPCResponse | JSONRPCError):
                await self._send_json(send, 200, _json(item))
                return
            self.session.deliver(item)  # has no place in a JSON answer: the GET stream takes it

    async def _answer_as_sse(self, send: Send, answers: asyncio.Queue, request: JSONRPCRequest) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *self._headers]})
        while True:
            item = await answers.get()
            if item is None:
                item = _ended(request)
            await send({"type": "http.response.body", "body": _event(item), "more_body": True})
            if isinstance(item, JSONRPCResponse | JSONRPCError):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _get(self, scope: Scope, receive: Receive, send: Send) -> None:
        if "text/event-stream" not in (header(scope, "accept") or ""):
            await self._error(send, 406, "Not Acceptable: Client must accept text/event-stream")
            return
        if self.session.stream is not None:
            await self._error(send, 409, "Conflict: Only one SSE stream is allowed per session")
            return
        stream: asyncio.Queue = asyncio.Queue()
        self.session.stream = stream
        if self.session.closed:
            stream.put_nowait(None)
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *self._headers]})

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            stream.put_nowait(None)

        watching = asyncio.ensure_future(client_gone())
        try:
            while (item := await stream.get()) is not None:
                await send({"type": "http.response.body", "body": _event(item), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            if self.session.stream is stream:
                self.session.stream = None

    async def _send_json(self, send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *self._headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send: Send, status: int, message: str, code: int = INVALID_REQUEST) -> None:
        await json_rpc_error(send, status, message, code=code, headers={SESSION_HEADER: self.session.id})


_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache, no-transform"),
                (b"x-accel-buffering", b"no")]  # fmt: skip


def _json(message: JSONRPCMessage) -> bytes:
    return message.model_dump_json(by_alias=True, exclude_unset=True).encode()


def _event(message: JSONRPCMessage) -> bytes:
    return b"event: message\ndata: " + _json(message) + b"\n\n"


def _ended(request: JSONRPCRequest) -> JSONRPCError:
    message: Any = "the session ended before the server answered this request; start a new session"
    return JSONRPCError(jsonrpc="2.0", id=request.id, error=ErrorData(code=INTERNAL_ERROR, message=message))
