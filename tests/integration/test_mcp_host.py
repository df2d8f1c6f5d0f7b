"""mcp_host jobs on the real stack: the in-repo MCP server (tests/mcp/server.py) deployed through kiln and used by the
mcp SDK's own client at the deployment's kiln URL, scaled live, closed to other projects, and gone when cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.support import JOB_TYPE_TESTS, SETTINGS, left_behind, wait_until
from tests.sandbox.mcp_image import mcp_layout  # noqa: F401  a fixture
from tests.sandbox.python_image import python_layout  # noqa: F401  a fixture

pytest.importorskip("mcp")
pytestmark = JOB_TYPE_TESTS

SERVER = Path(__file__).resolve().parents[1] / "mcp" / "server.py"


def deploy(client, name: str, **fields):
    job = client.jobs.create(type="mcp_host", input={"name": name, "server": {"command": [sys.executable, str(SERVER)]},
                                                     "transport": "stdio", **fields})  # fmt: skip
    return job


def healthy(client, job_id: str, replicas: int):
    wanted = f"{replicas} of {replicas} replica{'s' if replicas != 1 else ''} healthy"
    wait_until(lambda: client.jobs.get(job_id).status_reason == wanted, timeout=180, what=wanted)


@contextlib.asynccontextmanager
async def session(name: str, key: str):
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    url = f"{SETTINGS.api_url}/api/v1/mcp/{name}/mcp"
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30, read=60)) \
            as http, streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as mcp:  # fmt: skip
        await mcp.initialize()
        yield mcp


async def whoami(mcp) -> int:
    return (await mcp.call_tool("whoami", {})).structured_content["result"]


def test_a_deployment_serves_at_its_kiln_url_scales_live_and_ends_when_cancelled(client, api_key, other_key, http):
    name = f"tools-{uuid.uuid4().hex[:6]}"
    job = deploy(client, name)
    healthy(client, job.id, 1)

    async def use():
        async with session(name, api_key) as mcp:
            tools = {tool.name for tool in (await mcp.list_tools()).tools}
            assert {"echo", "slow", "whoami"} <= tools
            said = await mcp.call_tool("echo", {"text": "through kiln"})
            return said, await whoami(mcp)

    said, pid = asyncio.run(use())
    assert "through kiln" in str(said.content)
    # another project's key finds nothing there
    other = httpx.post(f"{SETTINGS.api_url}/api/v1/mcp/{name}/mcp", headers={"Authorization": f"Bearer {other_key}"},
                       json={"jsonrpc": "2.0", "id": 1, "method": "ping"})  # fmt: skip
    assert other.status_code == 404 and f"no MCP deployment {name!r}" in other.json()["detail"]
    # no key, or one that is no key, is refused before anything of the deployment is told
    for headers in ({}, {"Authorization": "Bearer kiln_no_such_key"}):
        refused = httpx.post(f"{SETTINGS.api_url}/api/v1/mcp/{name}/mcp", headers=headers,
                             json={"jsonrpc": "2.0", "id": 1, "method": "ping"})  # fmt: skip
        assert refused.status_code == 401 and refused.json()["detail"].startswith("Authorization: "), refused.text
    # a browser page of another origin is refused even with the key (DNS rebinding); a loopback page is served
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "browser", "version": "1"}}}
    for origin, status in (("http://evil.example.com", 403), (f"http://localhost:{SETTINGS.api_port}", 200)):
        answer = httpx.post(f"{SETTINGS.api_url}/api/v1/mcp/{name}/mcp", json=initialize,
                            headers={"Authorization": f"Bearer {api_key}", "Origin": origin,
                                     "Accept": "application/json, text/event-stream"})  # fmt: skip
        assert answer.status_code == status, (origin, answer.text)
        assert status == 200 or answer.json()["detail"].startswith("Origin: "), answer.text

    scaled = http.patch(f"/api/v1/jobs/{job.id}", json={"replicas": 2})
    assert scaled.status_code == 200, scaled.text
    assert scaled.json()["input"]["replicas"] == 2
    healthy(client, job.id, 2)

    async def two_sessions():
        async with session(name, api_key) as first, session(name, api_key) as second:
            return {await whoami(first), await whoami(second)}

    assert len(asyncio.run(two_sessions())) == 2  # a new session goes to the replica with the fewest
    kinds = {event["event"] for event in events(http, job.id)}
    assert {"starting", "healthy", "scaled"} <= kinds, kinds

    client.jobs.cancel(job.id)
    assert client.jobs.get(job.id).wait(timeout=180).status.value == "cancelled"
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=20, what="the replica to be gone")
    gone = http.post(f"/api/v1/mcp/{name}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert gone.status_code == 404


def events(http, job_id: str) -> list[dict]:
    """The job's events so far, read from its SSE stream until it has shown them all (the stream stays open)."""
    found = []
    with http.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=httpx.Timeout(10, read=3)) as stream:
        try:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    found.append({"event": line[7:]})
        except httpx.ReadTimeout:
            pass
    return found


def test_a_server_that_crashes_at_start_fails_the_job_with_each_attempts_reason(client):
    job = client.jobs.create(type="mcp_host", input={
        "name": f"broken-{uuid.uuid4().hex[:6]}", "transport": "stdio",
        "server": {"command": [sys.executable, "-c", "import sys; sys.stderr.write('no config given'); sys.exit(3)"]},
        "restart": {"max_attempts": 2, "backoff_s": 0.2},
    }).wait(timeout=120)  # fmt: skip
    assert job.status.value == "failed"
    assert "attempt 1:" in job.status_reason and "attempt 2:" in job.status_reason, job.status_reason
    assert "no config given" in job.status_reason
    assert job.attempt == 1  # it failed by itself: not served again


def test_scaling_a_job_that_is_no_running_deployment_is_a_409(client, http):
    done = client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180)
    refused = http.patch(f"/api/v1/jobs/{done.id}", json={"replicas": 2})
    assert refused.status_code == 409 and "no running mcp_host job" in refused.json()["detail"]
    assert http.patch(f"/api/v1/jobs/{done.id}", json={}).status_code == 422


def test_the_cli_and_the_sdk_deploy_list_scale_and_stop(client, api_key):
    import os
    import subprocess

    name = f"cli-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "KILN_API_KEY": api_key}

    def kiln(*args):
        return subprocess.run([sys.executable, "-m", "kiln.cli", "mcp", *args], capture_output=True, text=True,
                              timeout=120, env=env)  # fmt: skip

    deployed = kiln("deploy", name, "--command", f"{sys.executable} {SERVER}")
    assert deployed.returncode == 0, deployed.stderr
    job_id, url = deployed.stdout.split()
    assert url == client.mcp.url(name) == f"{SETTINGS.api_url}/api/v1/mcp/{name}/mcp"
    healthy(client, job_id, 1)
    assert name in kiln("list").stdout and "1 of 1 replica healthy" in kiln("list").stdout
    assert client.mcp.get(name).id == job_id
    scaled = kiln("scale", name, "2")
    assert scaled.returncode == 0, scaled.stderr
    healthy(client, job_id, 2)
    assert kiln("stop", name).stdout.strip() == f"{name}: cancelled"
    missing = kiln("scale", name, "1")
    assert missing.returncode == 1 and f"no MCP deployment {name!r}" in missing.stderr


# ------------------------------------------------------------------------------ a plugin image, in the sandbox


# the tools of tests/fixtures/mcp_stdio_server.py
TINY_TOOLS = ["echo", "whoami", "getenv", "alloc", "crash"]


def kiln_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ))  # fmt: skip


@pytest.fixture(scope="module")
def mcp_plugin(stack, mcp_layout) -> str:  # noqa: F811
    """The MCP server image (tests/sandbox/mcp_image.py: Debian's python3 and a standard-library stdio MCP server)
    registered as a plugin, as a user registers one: what it runs is its image's own Cmd."""
    name = f"tiny-mcp-{uuid.uuid4().hex[:6]}"
    added = kiln_cli("plugins", "add", name, "--image", str(mcp_layout), "--memory-mb", "64", "--pids", "32")
    assert added.returncode == 0, added.stderr
    yield name
    kiln_cli("plugins", "remove", name)


def server_in(flow_run_id: str) -> int | None:
    """The pid of the MCP server inside the run's one sandboxed replica, found by its pids cgroup; None while there
    is none (a restart under way)."""
    from kiln.tasks.plugin.cgroups import hierarchies

    (pids,) = [h for h in hierarchies() if "pids" in h.controllers]
    found = []
    for folder, names, _ in os.walk(pids.mount):
        for name in names:
            if not name.startswith(f"kiln-{flow_run_id}-"):
                continue
            try:  # a replica going as we look
                for pid in (Path(folder) / name / "cgroup.procs").read_text().split():
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if argv[:2] == [b"python3", b"/opt/kiln-test/mcp_stdio_server.py"]:
                        found.append(int(pid))
            except OSError:
                continue
    assert len(found) <= 1, found
    return found[0] if found else None


def test_a_plugin_image_serves_sandboxed_at_its_kiln_url_restarts_when_killed_and_leaves_nothing(client, api_key,
                                                                                                 mcp_plugin):
    name = f"boxed-{uuid.uuid4().hex[:6]}"
    job = client.jobs.create(type="mcp_host", input={"name": name, "server": {"plugin": mcp_plugin},
                                                     "restart": {"max_attempts": 3, "backoff_s": 0}})  # fmt: skip
    try:
        serves_sandboxed(client, api_key, job.id, name)
    finally:  # a persistent job holds the worker's one service slot until it is cancelled
        client.jobs.cancel(job.id)
    assert client.jobs.get(job.id).wait(timeout=180).status.value == "cancelled"
    flow_run_id = client.jobs.get(job.id).flow_run_id
    wait_until(lambda: left_behind(flow_run_id) == [], timeout=20, what="the sandbox to be gone")


def serves_sandboxed(client, api_key, job_id: str, name: str) -> None:
    healthy(client, job_id, 1)
    flow_run_id = client.jobs.get(job_id).flow_run_id

    async def use() -> dict:
        async with session(name, api_key) as mcp:
            assert [tool.name for tool in (await mcp.list_tools()).tools] == TINY_TOOLS
            assert (await mcp.call_tool("echo", {"text": "boxed"})).structured_content == {"text": "boxed"}
            return (await mcp.call_tool("whoami", {})).structured_content

    who = asyncio.run(use())
    assert (who["uid"], who["hostname"]) == (65534, "kiln")  # nobody, in the sandbox
    first = server_in(flow_run_id)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{first}").exists(), timeout=10, what="the killed server to go")
    healthy(client, job_id, 1)
    wait_until(lambda: server_in(flow_run_id) not in (None, first), timeout=180, what="a new replica")
    assert asyncio.run(use())["uid"] == 65534  # serving again, at the same URL
    wait_until(lambda: len(replicas_held(flow_run_id)) == 1, timeout=10, what="only the live replica to be left")


def replicas_held(flow_run_id: str) -> set[str]:
    """The sandboxed replicas of the run anything is left of (a container, cgroup, mount, process or folder), by id."""
    return {m for entry in left_behind(flow_run_id) for m in re.findall(rf"kiln-{flow_run_id}-[0-9a-f]{{6}}", entry)}


def test_a_plugin_server_is_refused_at_submission_when_unknown_or_asked_for_streamable_http(http, mcp_plugin):
    unknown = http.post("/api/v1/jobs", json={"type": "mcp_host", "input": {"name": "x", "server": {"plugin": "nope"}}})
    assert unknown.status_code == 422 and unknown.json()["detail"].startswith("input.server.plugin: no plugin 'nope'")
    over_http = http.post("/api/v1/jobs", json={"type": "mcp_host", "input": {
        "name": "x", "server": {"plugin": mcp_plugin}, "transport": "streamable-http"}})  # fmt: skip
    assert over_http.status_code == 422
    assert over_http.json()["detail"].startswith("input.transport: Value error, a plugin's server runs in the sandbox")
