"""The lab simulator as a real server for tests (`kiln labs simulate` in a subprocess), and a real callback receiver
that checks signatures with kiln.webhooks.verify. The lab tests use both; so can any test of kiln's lab_booking.

    with simulator(duplicate_rate=1) as lab, CallbackReceiver(lab.secret) as hooks:
        booking = lab.book("xrd-1", start, end, hooks.url).json()
        hooks.wait_until(lambda: hooks.statuses(booking["id"])[-1:] == ["completed"])
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from kiln.lab_simulator import DEFAULT_API_KEY, DEFAULT_SECRET
from kiln.schemas.labs import IDEMPOTENCY_KEY_HEADER, Callback
from kiln.webhooks import WebhookSignatureError, verify

# SimConfig's fields whose CLI option has another name
OPTIONS = {"callback_delay_s": "callback-delay", "callback_jitter_s": "callback-jitter", "stale_by_s": "stale-by",
           "retry_base_s": "retry-base"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """condition()'s first true value, polled every 20 ms; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


@dataclass
class Simulator:
    """A running `kiln labs simulate`: its URL, its credentials, and calls to its protocol and /_sim endpoints."""

    url: str
    api_key: str
    secret: str
    process: subprocess.Popen
    client: httpx.Client = field(repr=False)

    def __str__(self) -> str:
        return self.url

    def book(self, resource: str, start: datetime, end: datetime, callback_url: str, *, key: str | None = None,
             protocol: dict | None = None, reference: str = "job-1") -> httpx.Response:  # fmt: skip
        """POST /bookings (a fresh Idempotency-Key unless one is given)."""
        body = {"resource": resource, "start": iso(start), "end": iso(end), "protocol": protocol or {},
                "callback_url": callback_url, "reference": reference}  # fmt: skip
        return self.client.post("/bookings", json=body, headers={IDEMPOTENCY_KEY_HEADER: key or uuid.uuid4().hex})

    def booking(self, booking_id: str) -> dict:
        response = self.client.get(f"/bookings/{booking_id}")
        response.raise_for_status()
        return response.json()

    def slots(self, resource: str | None, start: datetime, end: datetime, **params: Any) -> httpx.Response:
        query = {"from": iso(start), "to": iso(end), **params} | ({"resource": resource} if resource else {})
        return self.client.get("/slots", params=query)

    def wait_for(self, booking_id: str, *statuses: str, timeout: float = 10.0) -> dict:
        """The booking once its status is one of `statuses` (GET /bookings/{id}, polled)."""
        return wait_until(lambda: (b := self.booking(booking_id))["status"] in statuses and b, timeout,
                          f"booking {booking_id} {' or '.join(statuses)}")  # fmt: skip

    def configure(self, **switches: Any) -> dict:
        """POST /_sim/config: these switches, every other one back to its default."""
        response = self.client.post("/_sim/config", json=switches)
        assert response.status_code == 200, response.text
        return response.json()

    def deliveries(self, booking_id: str | None = None) -> list[dict]:
        params = {"booking": booking_id} if booking_id else {}
        return self.client.get("/_sim/deliveries", params=params).json()["deliveries"]

    def lab_cancel(self, booking_id: str) -> httpx.Response:
        return self.client.post(f"/_sim/bookings/{booking_id}/cancel")


def _arguments(switches: dict[str, Any]) -> list[str]:
    arguments = []
    for name, value in switches.items():
        option = "--" + OPTIONS.get(name, name.replace("_", "-"))
        if name == "blocked":
            arguments += [part for slot in value
                          for part in (option, f"{slot['resource']},{slot['start']},{slot['end']}")]  # fmt: skip
        elif value is not None:
            arguments += [option, str(value)]
    return arguments


@contextlib.contextmanager
def simulator(port: int | None = None, *, api_key: str = DEFAULT_API_KEY, secret: str = DEFAULT_SECRET,
              resources: Sequence[str] = ("xrd-1", "furnace-1", "synth-1"), **switches: Any) -> Iterator[Simulator]:
    """`kiln labs simulate` on a loopback port with these switches (SimConfig's names), stopped on exit.

    The key and secrets go in through the environment, not the command line, as a real deployment would pass them.
    """
    env = {**os.environ, "KILN_LAB_SIM_API_KEY": api_key, "KILN_LAB_SIM_SECRET": secret}
    if switches.get("rotation_secret"):
        env["KILN_LAB_SIM_ROTATION_SECRET"] = switches.pop("rotation_secret")
    port = port or free_port()
    command = [sys.executable, "-m", "kiln.cli", "labs", "simulate", "--port", str(port),
               "--resources", ",".join(resources), *_arguments(switches)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise RuntimeError(f"kiln labs simulate exited {process.returncode}: {output.read().decode()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/_sim/health").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kiln labs simulate did not answer on {url} within 30 s")
                time.sleep(0.05)
            yield Simulator(url=url, api_key=api_key, secret=secret, process=process, client=client)
        finally:
            client.close()
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class CallbackReceiver:
    """A real HTTP server on loopback that takes a lab's callbacks as kiln would: the signature checked with
    kiln.webhooks.verify (401 when it fails), then 2xx. `fail_first` answers 503 to that many attempts of each
    webhook-id first, to make the lab retry.
    """

    def __init__(self, secrets: str | Sequence[str], *, fail_first: int = 0):
        self.secrets = secrets
        self.fail_first = fail_first
        self.accepted: list[tuple[str, Callback]] = []  # (webhook-id, callback), in the order they came
        self.rejected: list[tuple[str | None, str]] = []  # (webhook-id, reason)
        self.answers: list[tuple[str | None, int]] = []  # every request: (webhook-id, the status answered)
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver._answer(self, body)

            def log_message(self, *args):  # the test output stays clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/hooks/labs/sim"
        # a short poll, so that shutting it down at the end of a test takes no half second
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = dict(handler.headers.items())
        msg_id = headers.get("webhook-id") or headers.get("Webhook-Id")
        try:
            verify(self.secrets, body, headers)
        except WebhookSignatureError as exc:
            status, reply = 401, {"detail": str(exc)}
            with self.lock:
                self.rejected.append((msg_id, exc.reason))
        else:
            with self.lock:
                self.attempts[msg_id] = self.attempts.get(msg_id, 0) + 1
                if self.attempts[msg_id] <= self.fail_first:
                    status, reply = 503, {"detail": "busy"}
                else:
                    status, reply = 200, {"ok": True}
                    self.accepted.append((msg_id, Callback.model_validate_json(body)))
        with self.lock:
            self.answers.append((msg_id, status))
        payload = json.dumps(reply).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def callbacks(self, booking_id: str) -> list[Callback]:
        with self.lock:
            return [callback for _, callback in self.accepted if callback.booking == booking_id]

    def statuses(self, booking_id: str) -> list[str]:
        return [callback.status.value for callback in self.callbacks(booking_id)]

    def wait_until(self, condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        return wait_until(condition, timeout, what or "the callbacks expected")

    def __enter__(self) -> CallbackReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class Windows:
    """Consecutive windows of each resource, so that the tests of one simulator never overlap: soon ones (they run
    within a second or two at the tests' time scale) and far ones, 30 days ahead (they never start during a test).
    """

    def __init__(self):
        self.cursors: dict[tuple[str, bool], datetime] = {}

    def next(self, resource: str = "xrd-1", minutes: float = 1, *, far: bool = False) -> tuple[datetime, datetime]:
        earliest = datetime.now(timezone.utc) + (timedelta(days=30) if far else timedelta(seconds=30))
        start = max(self.cursors.get((resource, far), earliest), earliest)
        end = start + timedelta(minutes=minutes)
        self.cursors[(resource, far)] = end
        return start, end
