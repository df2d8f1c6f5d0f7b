"""The few raw ASGI steps the front takes itself: reading a body once, handing it on, and JSON-RPC error answers."""

from __future__ import annotations

import json
from typing import Any

from mcp.types import INVALID_REQUEST
from starlette.types import Message, Receive, Scope, Send

MAX_BODY_BYTES = 4 * 1024 * 1024  # as the SDK's own servers (DEFAULT_MAX_REQUEST_BODY_SIZE)


class BodyTooLarge(Exception):
    """A request body past MAX_BODY_BYTES."""


def header(scope: Scope, name: str) -> str | None:
    wanted = name.encode()
    return next((value.decode("latin-1") for key, value in scope["headers"] if key.lower() == wanted), None)


def accepts_sse(scope: Scope) -> bool:
    return "text/event-stream" in (header(scope, "accept") or "")


async def read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLarge
        if not message.get("more_body"):
            break
    return bytes(body)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already-read body first, then whatever the connection says next (its end)."""
    given = False

    async def receive_again() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


async def json_rpc_error(send: Send, status: int, message: str, *, request_id: Any = None, code: int = INVALID_REQUEST,
                         headers: dict[str, str] | None = None) -> None:  # fmt: skip
    """An HTTP error whose body is a JSON-RPC error, as the SDK's servers answer (its client reads the message)."""
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
