"""`kiln up` end to end: one command brings the stack up and runs a job; SIGINT to its group stops it all."""

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


def test_up_runs_a_job_serves_curl_and_stops_cleanly_on_sigint(tmp_path):
    api_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "PREFECT_"))},
        "KILN_HOME": str(tmp_path / "home"),
        "KILN_API_PORT": str(api_port),
        "KILN_PREFECT_PORT": str(free_port()),
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "kiln up exited early:\n" + "".join(lines)
            lines.append(line)
            if "kiln is up" in line:
                break
        output = "".join(lines)
        assert "completed" in output and '"slept_seconds": 1.0' in output, output
        key = (tmp_path / "home" / "api-key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        job = httpx.post(f"http://127.0.0.1:{api_port}/api/v1/jobs", headers=headers,
                         json={"type": "sleep", "input": {"seconds": 0}}).json()
        for _ in range(300):
            body = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/jobs/{job['id']}", headers=headers).json()
            if body["status"] == "completed":
                break
            time.sleep(0.1)
        assert body["status"] == "completed"
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)
    assert up.returncode == 0
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
