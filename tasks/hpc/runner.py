"""Runs a job's `ntasks` tasks on a dask-jobqueue cluster built from a cluster block, watching its batch jobs."""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from kiln.blocks.cluster import HpcCluster
from kiln.schemas.resources import Resources
from kiln.tasks.hpc.batch import batch_states, failure_reason, remove_batch_jobs
from kiln.tasks.hpc.payloads import TOPIC, run_task

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 2.0
CLOSE_TIMEOUT_SECONDS = 10.0


class BatchJobFailed(RuntimeError):
    """A batch job running the job's tasks ended abnormally (walltime, memory, node); the message says which."""


class TaskFailed(RuntimeError):
    """A task's own code raised; the message names the task and its error."""


class RunStopped(RuntimeError):
    """The job was cancelled from outside while its tasks ran (a child job cancelled on its own)."""


@dataclass
class TaskView:
    """One task as GET /api/v1/jobs/{id}/tasks shows it."""

    task_id: int
    status: str = "pending"
    done_units: int = 0
    requested_units: int = 0
    batch_job: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        view = asdict(self)
        view.pop("batch_job")
        return view


@dataclass
class SplitRun:
    """The tasks of one job and what is known of them."""

    ntasks: int
    tasks: dict[int, TaskView] = field(init=False)
    batch_jobs: dict[str, str] = field(default_factory=dict)  # Dask worker name → batch job id
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # "2 batch jobs waiting in the queue (Priority)" while the scheduler has not started them
    queue_note: str | None = None

    def __post_init__(self) -> None:
        self.tasks = {i: TaskView(i) for i in range(1, self.ntasks + 1)}

    def table(self) -> list[dict[str, Any]]:
        return [self.tasks[i].public() for i in sorted(self.tasks)]

    @property
    def percent(self) -> float:
        """Units done over units asked, each task weighing the same (a task that has not said counts as 0)."""
        parts = [
            1.0 if t.status == "completed" else (t.done_units / t.requested_units if t.requested_units else 0.0)
            for t in self.tasks.values()
        ]
        return 100 * sum(parts) / len(parts)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for task in self.tasks.values():
            counts[task.status] = counts.get(task.status, 0) + 1
        text = f"{self.ntasks} tasks: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return f"{text}; {self.queue_note}" if self.queue_note else text

    def on_event(self, event) -> None:
        _, message = event
        task = self.tasks.get(message.get("task_id"))
        if task is None or task.status in ("completed", "failed"):
            return
        task.status = message["status"]
        task.done_units = message["done_units"]
        task.requested_units = message["requested_units"] or task.requested_units
        task.batch_job = self.batch_jobs.get(message.get("worker"), task.batch_job)
        self.changed.set()


ProgressCallback = Callable[[SplitRun], Awaitable[None]]


async def run_split(
    block: HpcCluster,
    resources: Resources,
    *,
    job_name: str,
    target: str,
    ntasks: int,
    args: list,
    task_kwargs: list[dict],
    on_progress: ProgressCallback,
    stop_reason: Callable[[], Awaitable[str | None]] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Runs task i (1-based) with task_kwargs[i-1] on the cluster's batch jobs; returns outputs in task order.

    Raises BatchJobFailed or TaskFailed with a message naming the cause, RunStopped when
    `stop_reason` (asked every WATCH_INTERVAL_SECONDS) gives one. However it ends — finished,
    failed or cancelled — the batch jobs are removed from the queue before it returns.
    """
    from distributed import Client

    split = SplitRun(ntasks)
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    options = block.job_options(resources, job_name)
    cluster = block.dask_cluster(resources, job_name=job_name)
    client = None
    job_ids: set[str] = set()
    try:
        await cluster
        jobs = min(ntasks, block.max_jobs)
        cluster.scale(jobs=jobs)
        client = await Client(cluster, asynchronous=True, set_as_default=False)
        client.subscribe_topic(TOPIC, lambda event: _for_job(event, job_name, split))
        futures = [
            client.submit(run_task, job_name, target, i, ntasks, args, task_kwargs[i - 1],
                          key=f"{job_name}-task-{i}", pure=False)
            for i in range(1, ntasks + 1)
        ]
        waiting = {asyncio.ensure_future(_outcome(future)): i for future, i in zip(futures, range(1, ntasks + 1))}
        outputs: dict[int, Any] = {}
        await on_progress(split)
        last_watch = 0.0
        while waiting:
            done, _ = await asyncio.wait(waiting, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                task_id = waiting.pop(finished)
                ok, value = finished.result()
                task = split.tasks[task_id]
                if ok:
                    outputs[task_id] = value
                    task.status = "completed"
                    task.done_units = task.requested_units = max(task.requested_units, task.done_units, 1)
                    split.changed.set()
                    continue
                task.status = "failed"
                await on_progress(split)
                # a dead worker is most often a batch job the scheduler killed: say which, and why
                await asyncio.sleep(1)
                reason = await _batch_failure(block, options, cluster, split, job_ids)
                if reason:
                    raise BatchJobFailed(f"task {task_id}: {reason}")
                if type(value).__name__ == "KilledWorker":
                    # the batch job lives on, but Dask's nanny killed its worker: past its memory limit
                    where = f"batch job {task.batch_job}" if task.batch_job else "its batch job"
                    raise BatchJobFailed(
                        f"task {task_id}: the Dask worker on {where} was killed for using more than its memory "
                        f"({options['memory']} per batch job); ask for more min_ram_gb"
                    )
                raise TaskFailed(f"task {task_id} failed: {type(value).__name__}: {value}")
            if time.perf_counter() - last_watch >= WATCH_INTERVAL_SECONDS:
                last_watch = time.perf_counter()
                if stop_reason is not None and (why := await stop_reason()):
                    raise RunStopped(why)
                reason = await _batch_failure(block, options, cluster, split, job_ids)
                if reason:
                    running = [t.task_id for t in split.tasks.values() if t.status not in ("completed",)]
                    raise BatchJobFailed(f"task {running[0] if running else '?'}: {reason}")
                if "first_task_s" not in timings and any(t.status != "pending" for t in split.tasks.values()):
                    timings["first_task_s"] = round(time.perf_counter() - started, 3)
            if split.changed.is_set():
                split.changed.clear()
                await on_progress(split)
        await on_progress(split)
        timings["tasks_s"] = round(time.perf_counter() - started, 3)
        _collect_job_ids(cluster, split, job_ids)
        return [outputs[i] for i in range(1, ntasks + 1)], {
            "batch_jobs": sorted(job_ids, key=lambda j: int(j) if j.isdigit() else j),
            "timings": timings,
        }
    finally:
        _collect_job_ids(cluster, split, job_ids)
        await _shut_down(block, cluster, client, job_ids, job_name)


def _for_job(event, job_name: str, split: SplitRun) -> None:
    if event[1].get("job") == job_name:
        split.on_event(event)


async def _outcome(future) -> tuple[bool, Any]:
    try:
        return True, await future
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - the task's own error, reported with its task id
        return False, exc


def _collect_job_ids(cluster, split: SplitRun, job_ids: set[str]) -> None:
    for name, job in list(getattr(cluster, "workers", {}).items()):
        job_id = getattr(job, "job_id", None)
        if job_id:
            job_ids.add(str(job_id))
            split.batch_jobs[str(name)] = str(job_id)


async def _batch_failure(
    block: HpcCluster, options: dict[str, Any], cluster, split: SplitRun, job_ids: set[str]
) -> str | None:
    _collect_job_ids(cluster, split, job_ids)
    try:
        states = await batch_states(block.scheduler, sorted(job_ids))
    except Exception as exc:  # noqa: BLE001 - a slow scheduler is not the job's failure; look again
        log.warning("could not read the states of batch jobs %s: %s", sorted(job_ids), exc)
        return None
    waiting = [state for state in states.values() if state.waiting]
    reasons = ", ".join(sorted({state.reason for state in waiting if state.reason}))
    note = None
    if waiting:
        note = f"{len(waiting)} batch job(s) waiting in the queue" + (f" ({reasons})" if reasons else "")
    if note != split.queue_note:
        split.queue_note = note
        split.changed.set()
    for state in states.values():
        reason = failure_reason(block.scheduler, state, walltime=options["walltime"], memory=options["memory"])
        if reason:
            return reason
    return None


async def _shut_down(block: HpcCluster, cluster, client, job_ids: set[str], job_name: str) -> None:
    """Removes the batch jobs first (scancel/qdel, at once), then lets Dask close what it holds."""
    await remove_batch_jobs(block.scheduler, sorted(job_ids), job_name)
    for closing in (client.close() if client is not None else None, cluster.close()):
        if closing is None:
            continue
        try:
            await asyncio.wait_for(closing, CLOSE_TIMEOUT_SECONDS)
        except BaseException as exc:  # noqa: BLE001 - the jobs are gone already; a slow close is only logged
            log.info("closing the batch cluster: %s", exc)


def merge_outputs(outputs: list[Any]) -> dict[str, Any]:
    """Mean and spread of every numeric field the task outputs share (dicts), beside the outputs themselves."""
    merged: dict[str, Any] = {}
    if outputs and all(isinstance(o, dict) for o in outputs):
        for key in outputs[0]:
            if key == "task_id":
                continue
            values = [o.get(key) for o in outputs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                merged[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                }
    return merged
