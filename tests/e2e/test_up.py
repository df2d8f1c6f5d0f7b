"""`kiln up` end to end: one command brings the stack up and runs a job; SIGINT to its group stops it all.

Two stacks with their own KILN_HOME and ports run side by side.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_up(home) -> tuple[subprocess.Popen, int]:
    api_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "PREFECT_"))},
        "KILN_HOME": str(home),
        "KILN_API_PORT": str(api_port),
        "KILN_PREFECT_PORT": str(free_port()),
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
