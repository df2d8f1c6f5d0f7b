"""One replica: one running MCP server, of one of three kinds, and the client sessions it holds.

- StdioReplica: a command over stdio, a child process whose one connection the front shares among its sessions
  (stdio.StdioServer), each served over HTTP by stdio_http.StdioHttpSession;
- ProcessHttpReplica: a command over streamable-http, a child process given a free loopback port (env PORT and
  `{port}` in its argv) and reached at http://127.0.0.1:PORT/mcp;
- RemoteReplica: a url, nothing to start.

The process replicas start their process through a Launcher (kiln.tasks.mcp.sandboxed): a command under the
worker with tier B's limits, or a plugin image in plugin_exec's sandbox (stdio only: the sandbox has no network).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
from starlette.types import Message, Receive, Scope, Send

from kiln.tasks.mcp.errors import PingFailed, ReplicaFailed
from kiln.tasks.mcp.http import json_rpc_error, parse
from kiln.tasks.mcp.process import Launcher, ServerProcess, launch_command
from kiln.tasks.mcp.relay import SESSION_HEADER, HttpProbe, HttpUpstream
from kiln.tasks.mcp.stdio import StdioServer
from kiln.tasks.mcp.stdio_http import StdioHttpSession

FIRST_PING_RETRY_SECONDS = 0.05  # how often a starting HTTP replica is asked again until it answers
EXIT_REASON_SECONDS = 1.0  # how long a replica whose connection broke at start is given to exit, for its reason


class Replica(ABC):
    """One running MCP server and its sessions (kiln's session id → what the kind keeps for it)."""

    transport: ClassVar[str]

    def __init__(self, number: int):
        self.number = number
        self.name = f"replica {number}"
        self.sessions: dict[str, Any] = {}
        self.started_at = time.monotonic()
        self.stopped = False

    @property
    def pid(self) -> int | None:
        """Its process's pid, when kiln started one."""
        return None

    @property
    def alive(self) -> bool:
        """Whether it can still serve: not stopped, and (as far as the front knows yet) not exited."""
        return not self.stopped

    def renumber(self, number: int) -> None:
        """A spare taken into a slot becomes that slot's replica: its messages name it so."""
        self.number, self.name = number, f"replica {number}"

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Client requests it has not answered yet."""

    @abstractmethod
    async def start(self, bound_s: float) -> None:
        """Starts the server and returns once it answered a first ping; ReplicaFailed when it could not start,
        exited, or did not answer within `bound_s`."""

    @abstractmethod
    async def ping(self) -> None:
        """One MCP ping round trip over the server's own transport (the caller bounds its time); PingFailed."""

    @abstractmethod
    async def exited(self) -> ReplicaFailed:
        """Waits until the server is gone by itself; how it went."""

    @abstractmethod
    async def stop(self, reason: str) -> None:
        """Stops the server and ends its sessions; a request still in flight is answered with `reason`."""

    @abstractmethod
    async def open_session(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Serves the initialize request that opens `session_id`; the session exists afterwards if it succeeded."""

    @abstractmethod
    async def serve(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Serves one HTTP request of a session it holds (POST, GET or DELETE); a session that ended is forgotten."""

    async def serve_sessionless(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Serves a request that belongs to no session (a sessionless server's, or the 2026 protocol's)."""
        await json_rpc_error(send, 400, "Bad Request: Missing session ID; a session starts with initialize")


# ---------------------------------------------------------------------------------------------------------- stdio


class StdioReplica(Replica):
    transport = "stdio"

    def __init__(self, number: int, argv: Sequence[str], env: Mapping[str, str], launch: Launcher = launch_command):
        super().__init__(number)
        self.argv = list(argv)
        self.env = dict(env)
        self._launch = launch
        self.process: ServerProcess | None = None
        self.server: StdioServer | None = None
        self._reader: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def in_flight(self) -> int:
        return self.server.in_flight if self.server else 0

    @property
    def alive(self) -> bool:
        exited = self.process is None or self.process.returncode is not None
        return super().alive and not exited and self.server is not None and self.server.lost is None

    def renumber(self, number: int) -> None:
        super().renumber(number)
        if self.server is not None:
            self.server.name = self.name

    async def start(self, bound_s: float) -> None:
        self.process = await self._launch(self.argv, self.env, True)
        self.server = StdioServer(self.process.process.stdin, self.process.process.stdout, self.name)
        self._reader = asyncio.create_task(self.server.run())

        async def first_answer() -> None:
            await self.server.initialize()
            await self.server.ping()

        try:
            await asyncio.wait_for(first_answer(), bound_s)
        except asyncio.TimeoutError:
            raise ReplicaFailed(f"no answer to initialize and a first ping within {bound_s:g} s",
                                "no answer at start") from None  # fmt: skip
        except PingFailed as error:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), EXIT_REASON_SECONDS)
            if self.process.returncode is not None:
                raise ReplicaFailed(self.process.exit_reason(), self.process.exit_cause()) from None
            raise ReplicaFailed(f"its first ping failed: {error}", "failed its first ping") from None

    async def ping(self) -> None:
        await self.server.ping()

    async def exited(self) -> ReplicaFailed:
        await self.process.wait()
        return ReplicaFailed(self.process.exit_reason(), self.process.exit_cause())

    async def stop(self, reason: str) -> None:
        self.stopped = True
        if self.server is not None:
            self.server.fail(reason)  # every request in flight is answered with the reason
        for session in list(self.sessions.values()):
            await session.end()  # then its POSTs and GET stream end
        self.sessions.clear()
        if self.process is not None:
            await self.process.stop()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def open_session(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        session = self.sessions[session_id] = StdioHttpSession(self.server, self.server.open(session_id))
        status = await _serve_reporting_status(session.handle, scope, receive, send, body)
        if status is None or status >= 400:
            await session.end()
            self.sessions.pop(session_id, None)

    async def serve(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        session = self.sessions[session_id]
        await session.handle(scope, receive, send, body)
        if session.ended:  # a DELETE
            self.sessions.pop(session_id, None)


async def _serve_reporting_status(handle, scope: Scope, receive: Receive, send: Send, body: bytes) -> int | None:
    status = None

    async def watching(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await handle(scope, receive, watching, body)
    return status


# ----------------------------------------------------------------------------------------------- streamable HTTP


class HttpReplica(Replica):
    """A server the front reaches over streamable HTTP; its sessions map kiln's id to the upstream's (None when the
    upstream keeps no sessions: kiln's id still keeps the client on this replica)."""

    transport = "streamable-http"

    def __init__(self, number: int, client: httpx.AsyncClient):
        super().__init__(number)
        self._client = client
        self.url = ""
        self.upstream: HttpUpstream | None = None
        self.probe: HttpProbe | None = None
        self._in_flight = 0

    def _reach(self, url: str) -> None:
        self.url = url
        self.upstream = HttpUpstream(url, self._client)
        self.probe = HttpProbe(url)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def ping(self) -> None:
        await self.probe.ping()

    async def _first_ping(self, bound_s: float) -> None:
        """Pings until the server answers (a process needs a moment to listen); ReplicaFailed after `bound_s`."""
        deadline = time.monotonic() + bound_s
        last = "no answer"
        while True:
            try:
                await asyncio.wait_for(self.probe.ping(), max(deadline - time.monotonic(), 0.01))
                return
            except (PingFailed, asyncio.TimeoutError) as error:
                last = str(error) or "timed out"
            await self._exited_early()
            if time.monotonic() >= deadline:
                raise ReplicaFailed(f"no answer to its first ping within {bound_s:g} s (last: {last})",
                                    "no answer at start")  # fmt: skip
            await asyncio.sleep(FIRST_PING_RETRY_SECONDS)

    async def _exited_early(self) -> None:
        """Raises ReplicaFailed if the replica's process has already exited."""

    async def open_session(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._relaying(send, True) as relay:
            response = await self.upstream.send(scope, body, None)
            if response.status_code < 400:
                self.sessions[session_id] = response.headers.get(SESSION_HEADER)
            relay.response = response
            await HttpUpstream.respond(response, receive, send, session_id if response.status_code < 400 else None)

    async def serve(self, session_id: str, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        upstream_session = self.sessions[session_id]
        is_request = scope["method"] == "POST" and _is_request(body)
        async with self._relaying(send, is_request) as relay:
            response = await self.upstream.send(scope, body, upstream_session)
            if response.status_code == 404 or (scope["method"] == "DELETE" and response.status_code < 300):
                self.sessions.pop(session_id, None)  # ended, or the upstream lost it: the client must start anew
            relay.response = response
            await HttpUpstream.respond(response, receive, send, session_id)

    async def serve_sessionless(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        async with self._relaying(send, scope["method"] == "POST" and _is_request(body)) as relay:
            relay.response = await self.upstream.send(scope, body, None)
            await HttpUpstream.respond(relay.response, receive, send, None)

    @contextlib.asynccontextmanager
    async def _relaying(self, send: Send, is_request: bool):
        """Counts a relayed request as in flight until its response has streamed; an upstream that cannot be
        reached is a 502 with a JSON-RPC error saying so."""
        relay = _Relay()
        self._in_flight += is_request
        try:
            yield relay
        except httpx.HTTPError as error:
            if relay.response is None:
                await json_rpc_error(send, 502, f"{self.name} did not answer: {type(error).__name__}: {error}")
        finally:
            self._in_flight -= is_request

    async def stop(self, reason: str) -> None:
        self.stopped = True
        self.sessions.clear()
        if self.probe is not None:
            await self.probe.close()


@dataclass
class _Relay:
    response: httpx.Response | None = None


def _is_request(body: bytes) -> bool:
    """Whether a POST body is a JSON-RPC request (it has an id and a method), not a notification or an answer."""
    message = parse(body)
    return isinstance(message, dict) and "method" in message and "id" in message


class ProcessHttpReplica(HttpReplica):
    """A command over streamable-http: its own process, listening on a free loopback port."""

    def __init__(self, number: int, argv: Sequence[str], env: Mapping[str, str], client: httpx.AsyncClient,
                 launch: Launcher = launch_command):  # fmt: skip
        super().__init__(number, client)
        self.argv = list(argv)
        self.env = dict(env)
        self._launch = launch
        self.process: ServerProcess | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return super().alive and self.process is not None and self.process.returncode is None

    async def start(self, bound_s: float) -> None:
        port = free_port()
        argv = [arg.replace("{port}", str(port)) for arg in self.argv]
        self.process = await self._launch(argv, {**self.env, "PORT": str(port)}, False)
        self._reach(f"http://127.0.0.1:{port}/mcp")
        await self._first_ping(bound_s)

    async def _exited_early(self) -> None:
        if self.process.returncode is not None:
            await self.process.wait()
            raise ReplicaFailed(self.process.exit_reason(), self.process.exit_cause())

    async def exited(self) -> ReplicaFailed:
        await self.process.wait()
        return ReplicaFailed(self.process.exit_reason(), self.process.exit_cause())

    async def stop(self, reason: str) -> None:
        await super().stop(reason)
        if self.process is not None:
            await self.process.stop()


class RemoteReplica(HttpReplica):
    """A url: a server someone else runs. It never exits by itself; only its health checks can fail."""

    def __init__(self, number: int, url: str, client: httpx.AsyncClient):
        super().__init__(number, client)
        self._reach(url)

    async def start(self, bound_s: float) -> None:
        await self._first_ping(bound_s)

    async def exited(self) -> ReplicaFailed:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def free_port() -> int:
    """A loopback port free at the moment of asking (the process binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
