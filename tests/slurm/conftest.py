"""Fixtures of the SLURM tests: a real single-node SLURM (scripts/slurm-up.sh) and the session's kiln stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# simulations above the local cost limit go to this cluster (registered by the `cluster` fixture);
# set before the session's settings are read
os.environ["KILN_SIMULATION_CLUSTER"] = "slurm-local"

from tests.integration.conftest import api_key, client, http, idle, stack  # noqa: E402,F401 - the shared stack
from tests.integration.support import SETTINGS  # noqa: E402,F401 - sets the environment before Prefect loads

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.slurm)


def squeue(name: str) -> list[str]:
    """Job ids SLURM still lists (pending, running or completing) under this job name."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def sacct(name: str) -> dict[str, str]:
    """SLURM's accounting record of the batch jobs under this job name: job id → state."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--name", name, "-o", "jobid,state", "-S", "now-1hour"],
                         capture_output=True, text=True, check=True)
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if line)


def kiln_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          env={**os.environ}, check=check)


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM on localhost; started (and installed) by the same script `make test` runs."""
    subprocess.run([str(ROOT / "scripts" / "slurm-up.sh")], check=True, capture_output=True)
    yield "debug"
    # a test that failed half-way may leave batch jobs of a job it never cancelled: not in the next run
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    leftover = [line.split()[0] for line in out.splitlines() if line.split()[1].startswith("kiln-")]
    if leftover:
        subprocess.run(["scancel", *leftover], check=False)


@pytest.fixture(scope="session")
def cluster(stack, slurm) -> str:  # noqa: F811 - the shared stack fixture
    """A SLURM cluster registered the way an operator would, with the CLI."""
    kiln_cli("clusters", "add", "slurm-local", "--scheduler", "slurm", "--queue", slurm, "--cores", "1",
             "--memory", "1GB", "--walltime", "00:10:00", "--max-jobs", "4", "--overwrite")
    return "slurm-local"


@pytest.fixture(scope="session")
def short_cluster(stack, slurm) -> str:  # noqa: F811 - the shared stack fixture
    """The same SLURM with a one-minute walltime, for the walltime-kill test."""
    kiln_cli("clusters", "add", "slurm-1min", "--scheduler", "slurm", "--queue", slurm, "--cores", "1",
             "--memory", "1GB", "--walltime", "00:01:00", "--max-jobs", "2", "--overwrite")
    return "slurm-1min"
