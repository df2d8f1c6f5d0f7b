"""Fixtures of the integration tests: one real kiln stack per session (see support.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.support import HOME, PG_DATABASES, REQUEST_TIMEOUT, SETTINGS, create_key, pg_admin, wait_until


def install_echo_job_type() -> None:
    """A lab's own job type (tests/fixtures/echo_job_type), installed beside the stack as a lab would install it."""
    target = Path(HOME) / "plugins"
    # built from a copy: pip builds a local folder in place, and the SQLite and PostgreSQL sessions of `make test`
    # install it at the same moment
    source = Path(HOME) / "echo_job_type"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "echo_job_type", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
                   check=True, capture_output=True)  # fmt: skip
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def stack():
    from kiln.launcher import Stack

    install_echo_job_type()
    if PG_DATABASES:
        pg_admin([f"CREATE DATABASE {name}" for name in PG_DATABASES])
    running = Stack(SETTINGS, log=lambda *_: None)
    running.start()
    yield running
    running.stop()
    if PG_DATABASES:
        pg_admin([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in PG_DATABASES])


def _key_without_cache_hits(project: str) -> str:
    # the platform tests submit the same inputs again and again and mean each as a run;
    # the cache has tests of its own, in projects where it is on (the default)
    key = create_key(project)
    subprocess.run([sys.executable, "-m", "kiln.cli", "projects", "cache", project, "--off"], check=True,
                   capture_output=True)  # fmt: skip
    return key


@pytest.fixture(scope="session")
def api_key(stack) -> str:
    return _key_without_cache_hits("alpha")


@pytest.fixture(scope="session")
def other_key(stack) -> str:
    return _key_without_cache_hits("beta")


@pytest.fixture(scope="session")
def client(api_key):
    from kiln.sdk import Client

    with Client(SETTINGS.api_url, api_key, timeout=REQUEST_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="session")
def other_client(other_key):
    from kiln.sdk import Client

    with Client(SETTINGS.api_url, other_key, timeout=REQUEST_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="session")
def http(api_key):
    """Raw HTTP to the kiln API, as curl would send it."""
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=REQUEST_TIMEOUT) as h:
        yield h


@pytest.fixture
def idle(client):
    """Waits until no job of the session is unfinished, so a test starts with the worker slot free."""

    def nothing_running():
        for status in ("pending", "queued", "running"):
            if client.jobs.list(status=status, limit=1).jobs:
                return False
        return True

    wait_until(nothing_running, timeout=180, what="the previous tests' jobs to finish")


@pytest.fixture(scope="session")
def shell_plugin(stack, tmp_path_factory) -> str:
    """A busybox plugin whose args are one shell script, with small limits and a schema: an object with an
    integer `n`, or nothing."""
    import json
    import uuid

    from tests.sandbox.busybox_image import write_layout

    name = f"shell-{uuid.uuid4().hex[:6]}"
    folder = tmp_path_factory.mktemp("shell-plugin")
    schema = folder / "schema.json"
    schema.write_text(json.dumps({"type": ["object", "null"], "properties": {"n": {"type": "integer"}}}))
    added = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "plugins", "add", name, "--image", str(write_layout(folder / "layout")),
         "--entrypoint", "sh", "--entrypoint", "-c", "--input-schema", str(schema), "--memory-mb", "64",
         "--pids", "32", "--wall-seconds", "20", "--output-mb", "1", "--tmp-mb", "4"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    return name
