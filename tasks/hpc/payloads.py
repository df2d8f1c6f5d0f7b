"""What an hpc_submit task runs on a node: a registered callable or a command line, reporting its units done."""

from __future__ import annotations

import importlib
import os
import subprocess
import time
from typing import Any, Callable

from kiln.schemas.hpc_submit import COMMAND, callable_path

# the Dask event topic tasks report on; the flow subscribes to it
TOPIC = "kiln-task"
REPORT_INTERVAL_SECONDS = 0.5


def resolve(name: str) -> Callable[..., Any]:
    module, function = callable_path(name).split(":")
    try:
        target = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{name!r}: cannot import {module}:{function} ({exc})") from None
    if not callable(target):
        raise ValueError(f"{name!r}: {module}:{function} is not callable")
    return target


class TaskReporter:
    """progress(done, total) for a task's code: sends the task's units done to the flow, at most twice a second."""

    def __init__(self, job_name: str, task_id: int):
        self.job_name = job_name
        self.task_id = task_id
        self._last = 0.0

    def _send(self, status: str, done: int, total: int) -> None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:  # run outside Dask (a unit test): nobody listens
            return
        worker.log_event(TOPIC, {
            "job": self.job_name, "task_id": self.task_id, "status": status,
            "done_units": int(done), "requested_units": int(total), "worker": worker.name,
        })

    def start(self, total: int = 0) -> None:
        self._send("running", 0, total)

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last >= REPORT_INTERVAL_SECONDS:
            self._last = now
            self._send("running", done, total)


def run_task(job_name: str, target: str, task_id: int, ntasks: int, args: list, kwargs: dict) -> Any:
    """One task on a Dask worker of the batch cluster: the callable (or command) with this task's arguments."""
    progress = TaskReporter(job_name, task_id)
    progress.start()
    if target == COMMAND:
        return run_command(args, task_id=task_id, ntasks=ntasks, progress=progress)
    return resolve(target)(*args, task_id=task_id, ntasks=ntasks, progress=progress, **kwargs)


def run_command(argv: list[str], *, task_id: int, ntasks: int, progress: TaskReporter) -> dict:
    """A command line as one task; KILN_TASK_ID and KILN_NTASKS tell it which part is its own."""
    env = {**os.environ, "KILN_TASK_ID": str(task_id), "KILN_NTASKS": str(ntasks)}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    progress(1, 1)
    if done.returncode != 0:
        raise RuntimeError(
            f"task {task_id}: {argv[0]} exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
        )
    return {"returncode": 0, "stdout": done.stdout[-10000:], "seconds": round(time.perf_counter() - started, 3)}


def spin(seconds: float = 1.0, units: int = 10, *, task_id: int, ntasks: int, progress) -> dict:
    """Waits `seconds` in `units` steps, reporting each: the diagnostic payload of the tests and the benchmark."""
    started = time.perf_counter()
    for unit in range(1, units + 1):
        time.sleep(seconds / units)
        progress(unit, units)
    return {"task_id": task_id, "seconds": round(time.perf_counter() - started, 3), "host": os.uname().nodename}


def allocate(gigabytes: float, hold_seconds: float = 5.0, *, task_id: int, ntasks: int, progress) -> dict:
    """Holds `gigabytes` of memory for a while: shows what an out-of-memory kill looks like."""
    block = bytearray(int(gigabytes * 1e9))
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    time.sleep(hold_seconds)
    progress(1, 1)
    return {"task_id": task_id, "allocated_gb": gigabytes}
