"""tools/call round trips direct to an MCP server vs through kiln's MCP front, and kill -9 of a replica → serving again.

The server is tests/mcp/server.py (the mcp SDK's MCPServer), over stdio and over streamable HTTP. Direct, the
mcp SDK's client talks to it over its own transport; through the front, the same client talks streamable HTTP to
a Deployment served by uvicorn in a process of its own (as the kiln API would host it), which reaches the server
over that transport. Each round trip is one `echo` call, timed in the client, after a warm-up.

Then, through the front over stdio, a replica is killed with kill -9 several times, each time after it served
healthily for a while (so that each is a first failure, restarted at once rather than after a backoff): the
figures are the time to the replica's next successful ping (the front's `healthy` event; with a warm spare, its adoption)
and to a new session's answered tool call. Then the same with a warm spare (Deployment(spare=True)).

    python bench/mcp_front.py [--calls 200] [--kills 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from common import percentile

REPO = Path(__file__).resolve().parents[1]
SERVER = str(REPO / "tests" / "mcp" / "server.py")
COMMANDS = {"stdio": [sys.executable, SERVER, "stdio"], "streamable-http": [sys.executable, SERVER, "streamable-http", "{port}"]}


def serve_front(transport: str, port: int, spare: bool = False) -> None:
    """The child: one Deployment of the test server, its front on `port`; its events as JSON lines on stdout."""
    import uvicorn

    from kiln.schemas.mcp_host import McpHostInput
    from kiln.tasks.mcp import Deployment

    def told(kind, data):
        print(json.dumps({"at": time.time(), "kind": kind, **data}), flush=True)

    async def main():
        spec = McpHostInput.model_validate({"name": "bench", "server": {"command": COMMANDS[transport]},
                                            "transport": transport, "health": {"interval_s": 0.5}})  # fmt: skip
        # healthy for 1 s, a replica counts as recovered: each kill -9 below is a first failure, restarted at once
        deployment = Deployment(spec, on_event=told, stable_s=1.0, spare=spare)
        await deployment.start()
        server = uvicorn.Server(uvicorn.Config(deployment.app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="off", timeout_graceful_shutdown=1))  # fmt: skip
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        print(json.dumps({"at": time.time(), "kind": "ready"}), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin to stop us
        server.should_exit = True
        await serving
        await deployment.stop()

    asyncio.run(main())


@asynccontextmanager
async def front(transport: str, spare: bool = False):
    """A child process serving the front; yields its URL and the events it printed so far (a growing list)."""
    from kiln.tasks.mcp.replica import free_port

    port = free_port()
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--front", transport, str(port),
                                                 *(["--spare"] if spare else []), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, cwd=REPO)  # fmt: skip
    events: list[dict] = []

    async def read():
        while line := await child.stdout.readline():
            events.append(json.loads(line))

    reader = asyncio.create_task(read())
    while not any(event["kind"] == "ready" for event in events):
        if child.returncode is not None or reader.done():
            raise SystemExit("the front did not start")
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/mcp", events
    finally:
        child.stdin.close()
        await child.wait()
        await reader


@asynccontextmanager
async def session_at(url: str):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def direct(transport: str):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    from kiln.tasks.mcp.replica import free_port

    if transport == "stdio":
        params = StdioServerParameters(command=COMMANDS["stdio"][0], args=COMMANDS["stdio"][1:])
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, SERVER, "streamable-http", str(port)], stderr=subprocess.DEVNULL)
    try:
        while True:  # until it listens
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        async with session_at(f"http://127.0.0.1:{port}/mcp") as session:
            yield session
    finally:
        server.terminate()
        server.wait()


async def round_trips(session, calls: int, warmup: int = 20) -> list[float]:
    times = []
    for n in range(warmup + calls):
        started = time.perf_counter()
        result = await session.call_tool("echo", {"text": f"call {n}"})
        elapsed = time.perf_counter() - started
        assert result.content[0].text == f"call {n}"
        if n >= warmup:
            times.append(elapsed)
    return times


async def whoami_at(url: str) -> int:
    async with session_at(url) as session:
        return (await session.call_tool("whoami", {})).structured_content["result"]


async def in_process(calls: int, warmup: int = 20) -> list[float]:
    """The front's own work on an stdio round trip: its ASGI app called in this process (httpx's ASGI transport), no
    server socket, no second process."""
    import httpx

    from kiln.schemas.mcp_host import McpHostInput
    from kiln.tasks.mcp import Deployment

    deployment = Deployment(McpHostInput.model_validate({"name": "bench", "server": {"command": COMMANDS["stdio"]}}))
    await deployment.start()
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=deployment.app), base_url="http://front") as client:
            opened = await client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                       "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                                  "clientInfo": {"name": "bench", "version": "0"}}})  # fmt: skip
            headers["mcp-session-id"] = opened.headers["mcp-session-id"]
            times = []
            for n in range(warmup + calls):
                started = time.perf_counter()
                answer = await client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": n + 1,
                                           "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}})  # fmt: skip
                elapsed = time.perf_counter() - started
                assert answer.json()["result"]["content"][0]["text"] == "x"
                if n >= warmup:
                    times.append(elapsed)
            return times
    finally:
        await deployment.stop()


async def kills(count: int, spare: bool = False) -> list[tuple[float, float]]:
    """(kill → next successful ping, kill → a new session's answered call) for `count` kill -9s through the front."""
    figures = []
    async with front("stdio", spare) as (url, events):
        if spare:
            await asyncio.sleep(8.0)  # the spare started alongside the first replica: let it be ready
        for _ in range(count):
            async with session_at(url) as session:
                pid = (await session.call_tool("whoami", {})).structured_content["result"]
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            while True:
                try:
                    new = await asyncio.wait_for(whoami_at(url), 5)
                    if new != pid:
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.01)
            served_at = time.time()
            healthy_at = next(e["at"] for e in events if e["kind"] == "healthy" and e["pid"] == new)
            figures.append((healthy_at - killed_at, served_at - killed_at))
            # past stable_s and a ping, so the next kill is a first failure again; with a spare, time for a new one
            await asyncio.sleep(8.0 if spare else 2.5)
    return figures


def line(name: str, values: list[float]) -> str:
    return f"{name:<44} n={len(values)}  p50={percentile(values, 50) * 1000:7.2f} ms  p95={percentile(values, 95) * 1000:7.2f} ms"


async def main(calls: int, kill_count: int) -> None:
    print(f"tools/call round trips (echo), {calls} each after a warm-up, 2-core machine, mcp {mcp_version()}")
    for transport in ("stdio", "streamable-http"):
        async with direct(transport) as session:
            alone = await round_trips(session, calls)
        async with front(transport) as (url, _):
            async with session_at(url) as session:
                fronted = await round_trips(session, calls)
        print(line(f"{transport}: direct ({'stdio' if transport == 'stdio' else 'HTTP'})", alone))
        print(line(f"{transport}: through kiln's front (HTTP)", fronted))
        added = [percentile(fronted, q) - percentile(alone, q) for q in (50, 95)]
        print(f"{transport}: added by the front: p50 {added[0] * 1000:+.2f} ms, p95 {added[1] * 1000:+.2f} ms "
              f"(goal p95 ≤ 5 ms: {'met' if added[1] <= 0.005 else 'NOT met'})")
    print(line("stdio: the front in process (ASGI, raw httpx)", await in_process(calls)))
    for spare in (False, True):
        figures = await kills(kill_count, spare)
        pings, calls_ = [f[0] for f in figures], [f[1] for f in figures]
        print(f"kill -9 of an stdio replica (1 replica{', a warm spare' if spare else ''}), {len(figures)} times:")
        print(f"  → the replica healthy again: {', '.join(f'{p:.2f}' for p in pings)} s (p50 {percentile(pings, 50):.2f} s; "
              f"goal ≤ 2 s: {'met' if percentile(pings, 50) <= 2 else 'NOT met'})")
        print(f"  → a new session's tool call answered: {', '.join(f'{c:.2f}' for c in calls_)} s")


def mcp_version() -> str:
    from importlib.metadata import version

    return version("mcp")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--front":
        serve_front(sys.argv[2], int(sys.argv[3]), spare="--spare" in sys.argv)
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--calls", type=int, default=200, help="timed round trips per case")
        parser.add_argument("--kills", type=int, default=5, help="kill -9s of a replica")
        args = parser.parse_args()
        asyncio.run(main(args.calls, args.kills))
