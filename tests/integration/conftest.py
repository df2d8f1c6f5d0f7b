"""One real kiln stack per test session: Prefect server, kiln API (dispatcher, relay) and a kiln worker.

KILN_TEST_DATABASE=postgresql puts both the job index and Prefect on the local PostgreSQL;
otherwise both are SQLite files under a temporary KILN_HOME.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid

import httpx
import pytest

from kiln.prefect_env import prefect_env
from kiln.settings import KilnSettings

DATABASE = os.environ.get("KILN_TEST_DATABASE", "sqlite")
PG_ADMIN = os.environ.get("KILN_TEST_PG_URL", "postgresql://kiln:kiln@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_databases() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"kiln_index_{suffix}", f"kiln_prefect_{suffix}"


# Prefect reads its settings at import: fix ports and URLs before any test imports it
HOME = tempfile.mkdtemp(prefix="kiln-test-")
PG_DATABASES = _pg_databases() if DATABASE == "postgresql" else ()
_env = {
    "KILN_HOME": HOME,
    "KILN_PREFECT_PORT": str(free_port()),
    "KILN_API_PORT": str(free_port()),
    "KILN_WORKER_SLOTS": "1",
    "KILN_WORKER_LOST_SECONDS": "6",
    "KILN_RECONCILE_INTERVAL_SECONDS": "5",
}
if PG_DATABASES:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    _env["KILN_DATABASE_URL"] = f"{base}/{PG_DATABASES[0]}"
    _env["KILN_PREFECT_DATABASE_URL"] = f"{base}/{PG_DATABASES[1]}"
os.environ.update(_env)
SETTINGS = KilnSettings()
os.environ.update(prefect_env(SETTINGS))


def _pg(statements: list[str]) -> None:
    import psycopg2

    connection = psycopg2.connect(PG_ADMIN)
    connection.autocommit = True
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    connection.close()


@pytest.fixture(scope="session")
def stack():
    from kiln.launcher import Stack

    if PG_DATABASES:
        _pg([f"CREATE DATABASE {name}" for name in PG_DATABASES])
    running = Stack(SETTINGS, log=lambda *_: None)
    running.start()
    yield running
    running.stop()
    if PG_DATABASES:
        _pg([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in PG_DATABASES])


def _key(project: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "keys", "create", "--project", project],
        capture_output=True, text=True, check=True, env={**os.environ},
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def api_key(stack) -> str:
    return _key("alpha")


@pytest.fixture(scope="session")
def other_key(stack) -> str:
    return _key("beta")


@pytest.fixture(scope="session")
def client(api_key):
    from kiln.sdk import Client

    with Client(SETTINGS.api_url, api_key) as c:
        yield c


@pytest.fixture(scope="session")
def other_client(other_key):
    from kiln.sdk import Client

    with Client(SETTINGS.api_url, other_key) as c:
        yield c


@pytest.fixture(scope="session")
def http(api_key):
    """Raw HTTP to the kiln API, as curl would send it."""
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as h:
        yield h


def flow_run_state(flow_run_id: str) -> str:
    """The flow run's state type as Prefect itself has it."""
    response = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{flow_run_id}", timeout=10)
    response.raise_for_status()
    return response.json()["state"]["type"]


def wait_until(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def idle(client):
    """Waits until no job of the session is unfinished, so a test starts with the worker slot free."""

    def nothing_running():
        for status in ("pending", "queued", "running"):
            if client.jobs.list(status=status, limit=1).jobs:
                return False
        return True

    wait_until(nothing_running, timeout=60, what="the previous tests' jobs to finish")
