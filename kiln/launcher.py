"""`kiln up`: the embedded stack on loopback, each part its own process, stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kiln.prefect_env import kiln_env, prefect_env
from kiln.settings import KilnSettings


class Stack:
    """The processes of one embedded kiln: Prefect server (unless external), kiln API, kiln worker."""

    def __init__(self, settings: KilnSettings, log=print):
        self.settings = settings
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs_dir = settings.home_dir / "logs"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **kiln_env(self.settings), **prefect_env(self.settings)}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.logs_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
        if self.settings.prefect_api_url:
            self.log(f"Prefect: external server at {self.settings.prefect_api_url}")
            return
        proc = self._spawn(
            "prefect",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.settings.prefect_port)],
        )
        self._wait_http("prefect", f"{self.settings.prefect_api}/health", proc)
        self.log(f"Prefect server:  {self.settings.prefect_api.removesuffix('/api')}")

    def start_api(self) -> None:
        proc = self._spawn("api", [sys.executable, "-m", "kiln.cli", "api"])
        self._wait_http("api", f"{self.settings.api_url}/healthz", proc)
        self.log(f"kiln API:        {self.settings.api_url}  (OpenAPI at {self.settings.api_url}/docs)")

    def start_worker(self, name: str = "embedded", extra: list[str] = ()) -> None:
        proc = self._spawn("worker", [sys.executable, "-m", "kiln.cli", "worker", "start", "--name", name, *extra])
        # the API may still count a worker it has not yet seen go; wait for this one by name

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the kiln worker exited with code {proc.returncode}; see {self.logs_dir / 'worker.log'}")
            health = httpx.get(f"{self.settings.api_url}/healthz", timeout=5).json()
            if name in health["worker_names"]:
                self.log(f"kiln worker:     {health['slots']} slot(s) on a local Dask cluster")
                return
            time.sleep(0.3)
        raise RuntimeError(f"the kiln worker did not come up; see {self.logs_dir / 'worker.log'}")

    def start(self) -> None:
        try:
            self.start_prefect()
            self.start_api()
            self.start_worker()
        except BaseException:
            self.stop()
            raise

    def stop(self, *names: str, grace: float = 20, sig: int = signal.SIGTERM) -> None:
        """Stops the named parts (all by default) one by one, newest first, so each can still reach
        the ones it reports to; `sig` first, SIGKILL after the grace period."""
        for name in [n for n in reversed(list(self.procs)) if not names or n in names]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wait(self) -> int:
        """Blocks until a part exits by itself; returns its exit code."""
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.log(f"{name} exited with code {proc.returncode}; see {self.logs_dir / (name + '.log')}")
                    return proc.returncode or 1
            time.sleep(0.5)


def default_key_file(settings: KilnSettings) -> Path:
    return settings.home_dir / "api-key"
