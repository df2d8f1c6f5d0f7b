"""plugin_exec jobs of a Python plugin against the real stack: the Debian image of tests/sandbox/python_image.py,
registered with `kiln plugins add … --entrypoint python3 --entrypoint -c`, runs a script given as the job's args.
After every job its sandbox must have left nothing behind (no container, cgroup, mount, process or bundle)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.integration.support import JOB_TYPE_TESTS, SETTINGS, left_behind
from tests.sandbox.python_image import CELL_SUMMARY, ZNO, check_cell_summary, python_layout  # noqa: F401  a fixture

# a job type's own tests: the database does not matter to them
pytestmark = JOB_TYPE_TESTS

LIMITS = {"memory_mb": 256, "pids": 32, "wall_seconds": 60, "output_mb": 1, "tmp_mb": 4}


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ))  # fmt: skip


@pytest.fixture(scope="module")
def python_plugin(stack, python_layout) -> str:  # noqa: F811
    """The Python image as a plugin whose one argument is the script to run."""
    name = f"python-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    added = kiln("plugins", "add", name, "--image", str(python_layout), "--entrypoint", "python3", "--entrypoint", "-c",
                 *[f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()])  # fmt: skip
    assert added.returncode == 0, added.stderr
    print(f"registered {name} in {time.monotonic() - started:.1f} s")
    yield name
    kiln("plugins", "remove", name)


def ended(client, plugin: str, script: str, **fields):
    """The job of `script`, ended, after checking its sandbox left nothing behind."""
    job = client.jobs.create(type="plugin_exec", input={"plugin": plugin, "args": [script], **fields}).wait(timeout=120)
    assert job.flow_run_id is not None
    assert left_behind(job.flow_run_id) == []
    return job


def best_tier() -> str:
    """The tier a run that asks for none gets: the best the (one) worker offers."""
    (tiers,) = httpx.get(f"{SETTINGS.api_url}/healthz").json()["sandbox_tiers"].values()
    return tiers[0]


# the same script on tier B (bubblewrap) must give the same output as on the best tier (runc, as root here)
@pytest.mark.parametrize("tier", [pytest.param(None, id="best-tier"), pytest.param("B", id="tier-B")])
def test_a_python_plugin_summarises_a_cell_into_output_files_and_progress(client, python_plugin, idle, tmp_path, tier):
    started = time.monotonic()
    job = ended(client, python_plugin, CELL_SUMMARY, input=ZNO, **({"tier": tier} if tier else {}))
    took = time.monotonic() - started
    assert job.status.value == "completed", job.status_reason
    out = job.output
    assert (out["ending"], out["exit_code"], out["stderr"]) == ("completed", 0, "")
    assert out["tier"] == (tier or best_tier()) and out["limits"]["memory_mb"] == LIMITS["memory_mb"]
    stored = {f.name for f in client.jobs.files(job.id)}
    assert stored == {f["name"] for f in out["files"]} == {"output.json", "sites.csv"}
    sites = client.jobs.download(job.id, "sites.csv", tmp_path).read_text()
    check_cell_summary(out["output"], out["stdout"], sites)
    progress = "\n".join(e.data.get("message") or "" for e in client.jobs.events(job.id) if e.event == "progress")
    lines = out["stdout"].splitlines()
    assert [line for line in progress.splitlines() if line in lines] == lines
    print(f"tier {out['tier']}: the Python job took {took:.2f} s from submission, {out['seconds']:.2f} s to run")


def test_a_python_memory_hog_fails_the_job_out_of_memory(client, python_plugin, idle):
    job = ended(client, python_plugin, "print('allocating'); bytearray(300_000_000); print('survived')",
                limits={"memory_mb": 128})  # fmt: skip
    assert (job.status.value, job.status_reason) == ("failed", "out of memory (limit 128 MB)")
    assert (job.output["ending"], job.output["stdout"]) == ("out_of_memory", "allocating\n")
