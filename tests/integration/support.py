"""The test session's kiln settings and helpers; imported once, before anything imports Prefect.

One real kiln stack per test session: Prefect server, kiln API (dispatcher, relay) and a kiln worker.

KILN_TEST_DATABASE=postgresql puts both the job index and Prefect on the local PostgreSQL;
otherwise both are SQLite files under a temporary KILN_HOME.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from kiln.prefect_env import prefect_env
from kiln.processes import die_with_parent
from kiln.settings import KilnSettings

MODEL_DIR = Path(__file__).resolve().parents[3] / "shared" / "models"
DATABASE = os.environ.get("KILN_TEST_DATABASE", "sqlite")
# the platform's tests run on both databases; a job type's own tests on SQLite, since the database does not matter to
# them (CI time): `pytestmark = JOB_TYPE_TESTS` in their module
JOB_TYPE_TESTS = pytest.mark.skipif(DATABASE == "postgresql", reason="a job type's own tests run on SQLite only")
PG_ADMIN = os.environ.get("KILN_TEST_PG_URL", "postgresql://kiln:kiln@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_admin(statements: list[str]) -> None:
    """Runs the statements (CREATE/DROP DATABASE) on the local PostgreSQL as its admin role, outside a transaction."""
    import psycopg2

    connection = psycopg2.connect(PG_ADMIN)
    connection.autocommit = True
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    connection.close()


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
    # short, so the kill tests see a worker lost quickly; not shorter: a worker that restarts under load must
    # report the run it took before its silence counts (test_a_killed_job_with_retries_runs_again_on_a_new_worker)
    "KILN_WORKER_LOST_SECONDS": "10",
    "KILN_RECONCILE_INTERVAL_SECONDS": "5",
    # small, so that tests/integration/test_files.py crosses it quickly
    "KILN_UPLOAD_MAX_BYTES": str(4 * 1024 * 1024),
    # lab bookings whose callbacks are lost are asked for within seconds of their slot's end (test_lab_booking.py)
    "KILN_LAB_POLL_FIRST_SECONDS": "1",
    "KILN_LAB_POLL_MAX_SECONDS": "2",
    # the shipped weights beside the checkout; nothing is downloaded
    "KILN_MODEL_DIR": str(MODEL_DIR),
    "HF_HUB_OFFLINE": "1",
}
if PG_DATABASES:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    _env["KILN_DATABASE_URL"] = f"{base}/{PG_DATABASES[0]}"
    _env["KILN_PREFECT_DATABASE_URL"] = f"{base}/{PG_DATABASES[1]}"
os.environ.update(_env)
SETTINGS = KilnSettings()
os.environ.update(prefect_env(SETTINGS))
# batch jobs the dispatcher releases beyond the busy slots (KILN_RELEASE_AHEAD): the one worker's slots when unset
# the tests' clients wait this long for an answer: what the API answers through Prefect (its blocks, a run) can take
# long while CI's two lanes load the machine (a bound, not a speed goal)
REQUEST_TIMEOUT = 180
RELEASE_AHEAD = SETTINGS.worker_slots if SETTINGS.release_ahead is None else SETTINGS.release_ahead


def flow_run_state(flow_run_id: str) -> str:
    """The flow run's state type as Prefect itself has it."""
    response = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{flow_run_id}", timeout=10)
    response.raise_for_status()
    return response.json()["state"]["type"]


def wait_until(predicate, timeout: float = 180, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def wait_final(http, job_id: str, timeout: float = 180, interval: float = 0.1) -> dict:
    """The job, read over HTTP, once it has ended completed, failed or cancelled."""

    def ended():
        body = http.get(f"/api/v1/jobs/{job_id}").json()
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    return wait_until(ended, timeout=timeout, interval=interval, what=f"job {job_id} to end")


@contextmanager
def dask_cluster(workers: int, env: dict[str, str], log: Path):
    """An existing Dask cluster on loopback, started with the `dask` CLI as on machines of its own: a scheduler and
    `workers` workers of one thread each, in `env`; yields the scheduler's address once every worker has joined.
    Stops the workers, then the scheduler (SIGTERM, SIGKILL after 30 s); they die with the test session too."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    with open(log, "ab") as out:

        def start(*args: str) -> None:
            started.append(subprocess.Popen([sys.executable, "-m", "dask", *args, "--no-dashboard"], env=env,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            preexec_fn=lambda: die_with_parent(signal.SIGTERM)))  # fmt: skip

        try:
            start("scheduler", "--host", "127.0.0.1", "--port", str(port))
            for n in range(1, workers + 1):
                start("worker", address, "--nthreads", "1", "--name", f"machine-{n}")
            with Client(address, timeout=60) as client:
                client.wait_for_workers(workers, timeout=120)
            yield address
        finally:
            for process in reversed(started):
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def create_key(project: str) -> str:
    """A new API key for the project, made with the CLI as an operator would."""
    out = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "keys", "create", "--project", project],
        capture_output=True, text=True, check=True, env={**os.environ},
    )
    return out.stdout.strip().splitlines()[-1]


def left_behind(flow_run_id: str | None) -> list[str]:
    """What a plugin_exec job's sandbox left: its containers, cgroups, processes, and its folders in any worker's."""
    from tests.sandbox.conftest import residue

    return [] if flow_run_id is None else residue(flow_run_id, SETTINGS.sandbox_root)


class SlowPrefectApi:
    """A TCP relay to the Prefect API, on loopback, that holds the first request whose bytes contain `hold` for
    `seconds` before passing it on: a worker pointed here has one slow call, as under load, and no other change.

    HTTP/1.1 sends one request at a time on a connection, so holding that request's bytes holds that call only;
    the worker's other calls, and its heartbeats on the events websocket, go on other connections.
    """

    def __init__(self, upstream_port: int, hold: bytes, seconds: float):
        import asyncio
        import threading

        self.upstream_port, self.hold, self.seconds = upstream_port, hold, seconds
        self.port = free_port()
        self.holding = threading.Event()  # the held request arrived
        self.released = threading.Event()  # ...and was passed on
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
            started.set()

        threading.Thread(target=lambda: (self._loop.run_until_complete(serve()), self._loop.run_forever()),
                         name="slow-prefect-api", daemon=True).start()  # fmt: skip
        started.wait(10)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    async def _connect(self, reader, writer) -> None:
        import asyncio

        # the server end is opened at the first request, and opened afresh after the hold: Prefect's server
        # closes a connection that stays idle for 5 s, and the held request would then be retried on another
        upstream = None
        try:
            while chunk := await reader.read(65536):
                if self.hold in chunk and not self.holding.is_set():
                    self.holding.set()
                    if upstream is not None:
                        upstream[2].cancel()
                        upstream[1].close()
                        upstream = None
                    await asyncio.sleep(self.seconds)
                    self.released.set()
                if upstream is None:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                    upstream = (up_reader, up_writer, asyncio.ensure_future(self._answer(up_reader, writer)))
                upstream[1].write(chunk)
                await upstream[1].drain()
        except OSError:
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()

    @staticmethod
    async def _answer(reader, writer) -> None:
        """Passes the server's answers back; a server that closes the connection closes the client's."""
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        writer.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)


def flow_run_state_types(flow_run_id: str) -> list[str]:
    """Every state the flow run went through, oldest first, as Prefect itself recorded them."""
    response = httpx.get(f"{SETTINGS.prefect_api}/flow_run_states/", params={"flow_run_id": flow_run_id}, timeout=10)
    response.raise_for_status()
    return [state["type"] for state in sorted(response.json(), key=lambda state: state["timestamp"])]
