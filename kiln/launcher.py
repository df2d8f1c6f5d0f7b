"""`kiln up`: the embedded stack on loopback, each part its own process, supervised, stopped together.

Each part runs in a process group of its own, so that stopping it takes what it started (uvicorn under `prefect
server start`, the worker's Dask processes), and dies with `kiln up` even when `kiln up` is killed outright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from kiln.prefect_env import kiln_env, prefect_env
from kiln.processes import die_with_parent
from kiln.settings import KilnSettings


# a part that dies is started again after 1, 2, 4 … s, at most RESTART_MAX_SECONDS; after RESTART_GIVE_UP starts in a
# row that did not come up, the stack stops; a part that has served RESTART_RESET_SECONDS starts from 1 s again
RESTART_MAX_SECONDS = 30.0
RESTART_GIVE_UP = 5
RESTART_RESET_SECONDS = 60.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `kiln up` dies, however it dies."""
    die_with_parent(signal.SIGTERM)


class Stack:
    """The processes of one embedded kiln: Prefect server (unless external), kiln API, kiln worker."""

    def __init__(self, settings: KilnSettings, log=print):
        self.settings = settings
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.starters: dict[str, Callable[[], None]] = {}  # how each part is started again
        self.logs_dir = settings.home_dir / "logs"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **kiln_env(self.settings), **prefect_env(self.settings)}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.logs_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        self.procs[name] = proc
        return proc

    def _wait_http(self, name: str, url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.logs_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting:\n{tail}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{name} did not answer at {url} within {timeout:g} s; see {self.logs_dir / (name + '.log')}")

    def start_prefect(self) -> None:
        self.starters["prefect"] = self.start_prefect
        if self.settings.prefect_api_url:
            self.log(f"Prefect: external server at {self.settings.prefect_api_url}")
            return
        proc = self._spawn(
            "prefect",
            [sys.executable, "-m", "kiln.prefect_server", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.settings.prefect_port)],
        )
        self._wait_http("prefect", f"{self.settings.prefect_api}/health", proc)
        self.log(f"Prefect server:  {self.settings.prefect_api.removesuffix('/api')}")

    def start_api(self) -> None:
        self.starters["api"] = self.start_api
        proc = self._spawn("api", [sys.executable, "-m", "kiln.cli", "api"])
        self._wait_http("api", f"{self.settings.api_url}/healthz", proc)
        self.log(f"kiln API:        {self.settings.api_url}  (OpenAPI at {self.settings.api_url}/docs)")

    def start_worker(self, name: str = "embedded", extra: list[str] = ()) -> None:
        self.starters["worker"] = lambda: self.start_worker(name, extra)
        # the API may still count a worker of that name that is gone (killed, or stopped a moment ago): wait for a
        # heartbeat of this process, a new instance under the name
        before = self._health()["worker_instances"].get(name)
        proc = self._spawn("worker", [sys.executable, "-m", "kiln.cli", "worker", "start", "--name", name, *extra])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the kiln worker exited with code {proc.returncode}; see {self.logs_dir / 'worker.log'}")
            health = self._health()
            if health["worker_instances"].get(name) not in (None, before):
                self.log(f"kiln worker:     {health['slots']} slot(s) on a local Dask cluster")
                return
            time.sleep(0.3)
        raise RuntimeError(f"the kiln worker did not come up; see {self.logs_dir / 'worker.log'}")

    def _health(self) -> dict:
        """The API's /healthz; while the API does not answer (restarting too), as if it knew no worker."""
        try:
            return httpx.get(f"{self.settings.api_url}/healthz", timeout=5).json()
        except httpx.HTTPError:
            return {"worker_instances": {}}

    def start(self) -> None:
        try:
            self.start_prefect()
            self.start_api()
            self.start_worker()
        except BaseException:
            self.stop()
            raise

    def stop(self, *names: str, grace: float = 20, sig: int = signal.SIGTERM) -> None:
        """Stops the named parts (all by default) one by one, newest first, so each can still reach the ones it
        reports to: `sig` first, SIGKILL after the grace period, then SIGKILL to whatever is left of its process group.
        `sig=SIGKILL` stands for a crash (kill -9): that process alone dies, what it started is left as a crash
        leaves it."""
        for name in [n for n in reversed(list(self.procs)) if not names or n in names]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if sig != signal.SIGKILL:
                _kill_group(proc.pid)

    def supervise(self, stopping: Callable[[], bool] = lambda: False) -> int:
        """Keeps the parts running until `stopping()`: a part that exits is started again with backoff, with a line
        saying what died and how it came back. Returns non-zero when a part cannot be brought back."""
        restarts: dict[str, int] = {}  # since the part last served RESTART_RESET_SECONDS
        started_at = {name: time.monotonic() for name in self.procs}
        while not stopping():
            for name, proc in list(self.procs.items()):
                if proc.poll() is None or stopping():
                    continue
                self.log(f"{name} exited with code {proc.returncode}; see {self.logs_dir / (name + '.log')}")
                self.procs.pop(name)
                _kill_group(proc.pid)  # what it started goes with it
                if time.monotonic() - started_at[name] > RESTART_RESET_SECONDS:
                    restarts[name] = 0
                delay = min(2.0 ** restarts.get(name, 0), RESTART_MAX_SECONDS)
                restarts[name] = restarts.get(name, 0) + 1
                died_at = time.monotonic()
                for attempt in range(1, RESTART_GIVE_UP + 1):
                    self.log(f"restarting {name} in {delay:g} s (attempt {attempt} of {RESTART_GIVE_UP})")
                    time.sleep(delay)
                    if stopping():
                        return 0
                    try:
                        self.starters[name]()
                    except RuntimeError as error:
                        self.log(f"{name} did not come back: {str(error).splitlines()[0]}")
                        delay = min(delay * 2, RESTART_MAX_SECONDS)
                        continue
                    started_at[name] = time.monotonic()
                    self.log(f"{name} is back, {started_at[name] - died_at:.1f} s after it exited")
                    break
                else:
                    self.log(f"{name} did not come back after {RESTART_GIVE_UP} starts; stopping kiln")
                    return 1
            time.sleep(0.5)
        return 0


def _kill_group(pid: int) -> None:
    """SIGKILL to every process left in the process group `pid` led (a part's own, see _spawn)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    # reaped by their new parent; wait a moment so a port they held is free for the part started next
    psutil.wait_procs([p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pid], timeout=5)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def default_key_file(settings: KilnSettings) -> Path:
    return settings.home_dir / "api-key"
