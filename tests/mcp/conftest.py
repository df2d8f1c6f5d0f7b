"""Fixtures of the mcp tests: real MCP servers hosted by a Deployment, its front served by uvicorn on loopback, the
mcp SDK's own client, and the residue check after every test: no process any replica started may be left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from kiln.schemas.mcp_host import McpHostInput
from kiln.tasks.mcp import Deployment
from kiln.tasks.mcp.process import Launcher, ServerProcess, launch_command
from kiln.tasks.mcp.replica import free_port

SERVER = str(Path(__file__).with_name("server.py"))
PYTHON = sys.executable
STDIO = [PYTHON, SERVER, "stdio"]
HTTP = [PYTHON, SERVER, "streamable-http", "{port}"]
COMMANDS = {"stdio": STDIO, "streamable-http": HTTP}
# quick checks, so that tests of failure end in seconds; a start is bounded by 4 × (0.5 + 2) = 10 s
FAST_HEALTH = {"interval_s": 0.5, "timeout_s": 2.0, "failures": 4}
ACCEPT = "application/json, text/event-stream"


@dataclass
class Hosted:
    """A started deployment, its front's URL, the events it told (with the time each came), and its processes."""

    deployment: Deployment
    url: str
    events: list[tuple[float, str, dict[str, Any]]]
    launched: list[int]

    def told(self, kind: str) -> list[dict[str, Any]]:
        return [data for _, event, data in self.events if event == kind]

    async def until(self, condition, seconds: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {seconds} s: {what}; status: {self.deployment.status()}")
            await asyncio.sleep(0.02)


@dataclass
class Launches:
    """Every process the tests' deployments started, by `inner` (a plain process unless a test sets another
    Launcher): their pids are the process groups and sessions of all they ran."""

    pids: list[int] = field(default_factory=list)
    processes: list[ServerProcess] = field(default_factory=list)
    inner: Launcher = launch_command

    async def launch(self, argv: Sequence[str], env, stdio: bool) -> ServerProcess:
        process = await self.inner(argv, env, stdio)
        self.pids.append(process.pid)
        self.processes.append(process)
        return process


@pytest.fixture
def launches() -> Launches:
    launches = Launches()
    yield launches
    assert residue(launches.pids) == []


def residue(sessions: list[int]) -> list[str]:
    """Processes still alive in the sessions the deployments started (each replica's process leads its own)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session in sessions and state != "Z":
            left.append(f"process {pid} ({state}): {cmdline[:120]}")
    return left


@contextlib.asynccontextmanager
async def hosted(launches: Launches, spec: dict[str, Any], **options) -> AsyncIterator[Hosted]:
    """The deployment of `spec`, started, its front served on a loopback port; stopped afterwards."""
    events: list[tuple[float, str, dict[str, Any]]] = []
    spec = {"name": "test", "health": FAST_HEALTH, **spec}
    deployment = Deployment(McpHostInput.model_validate(spec), launch=launches.launch,
                            on_event=lambda kind, data: events.append((time.monotonic(), kind, data)), **options)  # fmt: skip
    port = free_port()
    config = uvicorn.Config(deployment.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1)  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await deployment.start()
        while not server.started:
            await asyncio.sleep(0.01)
        yield Hosted(deployment, f"http://127.0.0.1:{port}/mcp", events, launches.pids)
    finally:
        server.should_exit = True
        await serving
        await deployment.stop()


@contextlib.asynccontextmanager
async def mcp_session(url: str, **options) -> AsyncIterator[ClientSession]:
    """An initialized mcp SDK client session over its streamable HTTP transport."""
    async with streamable_http_client(url) as (read, write), ClientSession(read, write, **options) as session:
        await session.initialize()
        yield session


async def whoami(session: ClientSession) -> int:
    return (await session.call_tool("whoami", {})).structured_content["result"]


class RawSession:
    """An MCP session driven with plain HTTP POSTs, to choose the JSON-RPC ids ourselves."""

    def __init__(self, client: httpx.AsyncClient, url: str):
        self.client, self.url, self.id = client, url, None

    async def open(self) -> RawSession:
        response = await self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})  # fmt: skip
        assert "result" in response, response
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self

    async def post(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to the message (its JSON body, or the SSE event with its id); None for a notification."""
        headers = {"accept": ACCEPT, "content-type": "application/json", "mcp-protocol-version": "2025-11-25"}
        if self.id:
            headers["mcp-session-id"] = self.id
        async with self.client.stream("POST", self.url, json=message, headers=headers) as response:
            self.id = self.id or response.headers.get("mcp-session-id")
            self.status = response.status_code
            if "id" not in message or response.status_code >= 400:
                body = await response.aread()
                return json.loads(body) if body else None
            if response.headers["content-type"].startswith("application/json"):
                return json.loads(await response.aread())
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    answer = json.loads(line[5:])
                    if "id" in answer and "method" not in answer:
                        return answer
        raise AssertionError(f"no answer to {message}")

    async def call(self, request_id: Any, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return await self.post({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                                "params": {"name": tool, "arguments": arguments}})  # fmt: skip
