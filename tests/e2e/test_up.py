"""`kiln up` end to end: one command brings the stack up and runs a job; SIGINT to its group stops it all.

Two stacks with their own KILN_HOME and ports run side by side.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_up(home, ports: tuple[int, int] | None = None, **settings: str) -> tuple[subprocess.Popen, int]:
    api_port, prefect_port = ports or (free_port(), free_port())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "PREFECT_"))},
        "KILN_HOME": str(home),
        "KILN_API_PORT": str(api_port),
        "KILN_PREFECT_PORT": str(prefect_port),
        **{f"KILN_{name.upper()}": value for name, value in settings.items()},
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    return up, api_port


def wait_up(up: subprocess.Popen) -> str:
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        assert line, "kiln up exited early:\n" + "".join(lines)
        lines.append(line)
        if "kiln is up" in line:
            return "".join(lines)
    raise AssertionError("kiln up did not come up:\n" + "".join(lines))


def stop(up: subprocess.Popen) -> None:
    """SIGINT to its group, as Ctrl-C in its terminal; it must end cleanly."""
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(timeout=90) == 0


def curl_a_sleep_job(home, api_port: int) -> dict:
    headers = {"Authorization": f"Bearer {(home / 'api-key').read_text().strip()}"}
    base = f"http://127.0.0.1:{api_port}/api/v1/jobs"
    job = httpx.post(base, headers=headers, json={"type": "sleep", "input": {"seconds": 0}}).json()
    for _ in range(300):
        body = httpx.get(f"{base}/{job['id']}", headers=headers).json()
        if body["status"] == "completed":
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job['id']} did not complete: {body}")


def test_two_stacks_run_side_by_side_and_stop_cleanly_on_sigint(tmp_path):
    homes = [tmp_path / "one", tmp_path / "two"]
    stacks = [start_up(home) for home in homes]
    children = []
    try:
        for (up, api_port), home in zip(stacks, homes):
            output = wait_up(up)
            assert "completed" in output and '"slept_seconds": 1.0' in output, output
            assert curl_a_sleep_job(home, api_port)["output"] == {"slept_seconds": 0.0, "children": 0}
            children += psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6
    finally:
        for up, _ in stacks:
            os.killpg(up.pid, signal.SIGINT)
        for up, _ in stacks:
            up.wait(timeout=90)
    assert [up.returncode for up, _ in stacks] == [0, 0]
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


SERVER = Path(__file__).resolve().parents[1] / "mcp" / "server.py"


def test_mcp_deployments_serve_again_at_their_urls_after_kiln_up_is_restarted(tmp_path):
    """Persistent jobs come back after the whole stack stops and starts: the same URLs answer MCP again, from new
    replica processes, and each stop left no replica behind (over stdio or streamable HTTP)."""
    pytest.importorskip("mcp")
    home = tmp_path / "home"
    servers = {"tools": ([sys.executable, str(SERVER)], "stdio"),
               "web": ([sys.executable, str(SERVER), "streamable-http", "{port}"], "streamable-http")}
    ports = (free_port(), free_port())  # the same ports after the restart: the same URLs
    up, api_port = start_up(home, ports, worker_service_slots="2")
    try:
        wait_up(up)
        key = (home / "api-key").read_text().strip()
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {key}"})
        jobs = {name: api.post("/api/v1/jobs", json={"type": "mcp_host", "input": {
            "name": name, "server": {"command": command}, "transport": transport}}).json()["id"]
            for name, (command, transport) in servers.items()}  # fmt: skip
        first = {name: serving_pid(api, name, job_id) for name, job_id in jobs.items()}
    finally:
        stop(up)
    assert not replicas_left(), replicas_left()

    up, _ = start_up(home, ports, worker_service_slots="2")
    try:
        wait_up(up)
        second = {name: serving_pid(api, name, job_id) for name, job_id in jobs.items()}
        assert all(second[name] != first[name] for name in servers), (first, second)
        assert {api.get(f"/api/v1/jobs/{job_id}").json()["status"] for job_id in jobs.values()} == {"running"}
    finally:
        stop(up)
    assert not replicas_left(), replicas_left()


def replicas_left() -> list[str]:
    """Processes of the test server still running."""
    return [" ".join(p.info["cmdline"]) for p in psutil.process_iter(["cmdline", "status"])
            if str(SERVER) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]  # fmt: skip


def serving_pid(api: httpx.Client, name: str, job_id: str) -> int:
    """The pid of the replica that answers a `whoami` call at the deployment's kiln URL, once it answers."""
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    deadline, said = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        opened = api.post(f"/api/v1/mcp/{name}/mcp", json=initialize, headers=accept)
        if opened.status_code == 200:
            session = {**accept, "Mcp-Session-Id": opened.headers["mcp-session-id"]}
            api.post(f"/api/v1/mcp/{name}/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                     headers=session)
            called = api.post(f"/api/v1/mcp/{name}/mcp", headers=session, json={
                "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}})
            return int(json.loads(sse_data(called.text))["result"]["structuredContent"]["result"])
        said = (opened.status_code, opened.text, api.get(f"/api/v1/jobs/{job_id}").json().get("status_reason"))
        time.sleep(0.5)
    raise AssertionError(f"the deployment did not serve at its URL: {said}")


def sse_data(text: str) -> str:
    """The JSON of an answer given as JSON or as one SSE event."""
    lines = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    return lines[-1] if lines else text


def test_kiln_up_brings_back_an_api_killed_mid_batch_and_leaves_no_orphan_on_sigterm(tmp_path):
    """kill -9 of the API while a batch runs: `kiln up` says what died, starts it again and the batch completes. SIGTERM to the `kiln up` process alone (as a service manager sends it) stops
    every part and everything they started."""
    from kiln.sdk import Client

    home = tmp_path / "home"
    up, api_port = start_up(home)
    said: list[str] = []
    try:
        said.append(wait_up(up))
        threading.Thread(target=lambda: said.extend(iter(up.stdout.readline, "")), daemon=True).start()
        with Client(f"http://127.0.0.1:{api_port}", (home / "api-key").read_text().strip()) as client:
            # distinct inputs: each a run of its own, no cache hit
            batch = client.submit_batch([{"type": "sleep", "input": {"seconds": 0.3 + i / 1000}} for i in range(20)])
            ids = [line.job_id for line in batch.jobs]
            assert batch.submitted == 20 and batch.cache_hits == 0
            os.kill(part_pid(up, "api"), signal.SIGKILL)
            wait_for(lambda: "api is back" in "".join(said), 180, "the API to come back", said)
            descendants = psutil.Process(up.pid).children(recursive=True)
            wait_for(lambda: all(client.jobs.get(i).status.value in ("completed", "failed", "cancelled") for i in ids),
                     600, "the batch to end", said)  # a bound on waiting under CI load, not a speed goal
            ended = [client.jobs.get(i) for i in ids]
        assert {job.status.value for job in ended} == {"completed"}, [(j.id, j.status_reason) for j in ended]
        text = "".join(said)
        assert "api exited with code -9" in text, text
    finally:
        up.send_signal(signal.SIGTERM)  # the process alone, not its group
        assert up.wait(timeout=120) == 0, "".join(said)
    time.sleep(1)
    left = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]


def part_pid(up: subprocess.Popen, part: str) -> int:
    """The pid of `kiln <part>` under this `kiln up`."""
    for child in psutil.Process(up.pid).children():
        if child.cmdline()[2:4] == ["kiln.cli", part]:  # python -m kiln.cli <part> …
            return child.pid
    raise AssertionError(f"no {part} process under kiln up")


def wait_for(condition, timeout: float, what: str, said: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s:\n" + "".join(said)
        time.sleep(0.5)
