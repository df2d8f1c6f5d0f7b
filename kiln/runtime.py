"""Helpers for code running inside a job's flow: the job it belongs to, progress, child jobs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable

from prefect import tags
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.utilities.asyncutils import run_coro_as_sync

log = logging.getLogger(__name__)

PROGRESS_EVENT = "kiln.job.progress"
# a piece of an llm_proxy job's streamed text (kiln.tasks.llm.call sends it)
DELTA_EVENT = "kiln.job.delta"
# a running job's status_reason changed: a persistent job's health ("3 of 3 replicas healthy")
HEALTH_EVENT = "kiln.job.health"

# pieces of a job's text are sent at most this often: one Prefect event per token or per line would be thousands
TEXT_INTERVAL_SECONDS = 0.1

# longest a flow waits for the kiln API to take one progress report before sending it as a Prefect event
REPORT_TIMEOUT_SECONDS = 10.0

# where the running flow reports progress on kiln's own path: (the kiln API's URL, the run's token), or None
_report_to: ContextVar[tuple[str, str] | None] = ContextVar("kiln_report_to", default=None)

# flow run id → its progress artifact, so each job shows one bar in the Prefect UI
_progress_artifacts: dict[str, uuid.UUID] = {}


# the scheduler of the Dask cluster this process is a worker of (the kiln worker's), for flows that fan out
_dask_scheduler: str | None = None


def set_dask_scheduler(address: str | None) -> None:
    """Records the scheduler of the Dask cluster this process works for (kiln.worker.executor does, per run)."""
    global _dask_scheduler
    _dask_scheduler = address


def dask_scheduler_address() -> str | None:
    """The address of the kiln worker's Dask scheduler when this flow runs on it, else None (a flow called directly)."""
    return _dask_scheduler


@contextmanager
def reporting_to(api_url: str | None, token: str | None):
    """While a flow run (and its subflows, child jobs) runs in this context, its progress goes to the kiln API at
    `api_url` with the run token `token` (kiln.run_reports); the kiln worker's executor sets it per run."""
    reset = _report_to.set((api_url, token)) if api_url and token else None
    try:
        yield
    finally:
        if reset is not None:
            _report_to.reset(reset)


def _report(job_ids: list[str], flow_run_id: str, payload: dict[str, Any]) -> None:
    """Sends a progress report for each job: straight to the kiln API when the run has a token (kiln's own path,
    ahead of the run's end), else as a Prefect event the relay records. A report the API cannot take goes as a
    Prefect event too (the API down, a child job it does not know yet, a worker with another run key); one it
    refuses as wrong (an earlier attempt's, a malformed one) is dropped with a warning."""
    target = _report_to.get()
    for job_id in job_ids:
        if target is not None and _post_report(*target, job_id, payload):
            continue
        emit_event(
            PROGRESS_EVENT,
            resource={"prefect.resource.id": f"kiln.job.{job_id}"},
            related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}],
            payload=payload,
        )


def _post_report(api_url: str, token: str, job_id: str, payload: dict[str, Any]) -> bool:
    """POST /api/v1/jobs/{job_id}/progress; False when the report should go the Prefect way instead."""
    import httpx

    from kiln.run_reports import RUN_TOKEN_HEADER

    try:
        response = httpx.post(f"{api_url}/api/v1/jobs/{job_id}/progress", json=payload,
                              headers={RUN_TOKEN_HEADER: token}, timeout=REPORT_TIMEOUT_SECONDS)  # fmt: skip
    except httpx.HTTPError as exc:
        log.warning("the kiln API did not answer job %s's progress report (%s); sending it as a Prefect event",
                    job_id, type(exc).__name__)  # fmt: skip
        return False
    if response.status_code in (409, 422):
        log.warning("the kiln API refused job %s's progress report: %s", job_id, response.text[:500])
        return True
    if response.status_code != 200:
        log.warning("the kiln API could not take job %s's progress report (%s); sending it as a Prefect event",
                    job_id, response.status_code)  # fmt: skip
        return False
    return True


def _tag_value(prefix: str, tag_list) -> str | None:
    for tag in tag_list or ():
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return None


def current_job() -> tuple[str | None, str | None, str | None]:
    """(job id, project name, flow run id) of the job whose flow is running here, from its run's tags."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None, None, None
    run = context.flow_run
    return _tag_value("job:", run.tags), _tag_value("project:", run.tags), str(run.id)


async def areport_progress(percent: float, message: str | None = None) -> None:
    """Reports how far the job is, from an async flow: a Prefect progress artifact and a kiln progress event.

    Progress is advisory: a failure to report it is logged and never fails the job.
    """
    job_id, _, flow_run_id = current_job()
    if job_id is None:
        return
    percent = max(0.0, min(100.0, float(percent)))
    await asyncio.to_thread(_report, [job_id], flow_run_id, {"percent": percent, "message": message})
    try:
        artifact_id = _progress_artifacts.get(flow_run_id)
        if artifact_id is None:
            _progress_artifacts[flow_run_id] = await acreate_progress_artifact(progress=percent, description=message)
        else:
            await aupdate_progress_artifact(artifact_id, progress=percent, description=message)
    except Exception as exc:  # noqa: BLE001 - progress must never fail the job
        log.warning("could not update the progress artifact of job %s: %s", job_id, exc)
    if percent >= 100:
        _progress_artifacts.pop(flow_run_id, None)


def report_progress(percent: float, message: str | None = None) -> None:
    """Reports how far the job is, from a synchronous flow; see areport_progress."""
    run_coro_as_sync(areport_progress(percent, message))


def report_health(reason: str, event: str | None = None, data: dict[str, Any] | None = None) -> None:
    """Says how a running job (a persistent one: a service) is: `reason` becomes its status_reason, and `event`
    (starting, healthy, unhealthy, restarting, scaled) with `data` an event on its SSE stream."""
    job_id, _, flow_run_id = current_job()
    if job_id is None:
        return
    emit_event(
        HEALTH_EVENT,
        resource={"prefect.resource.id": f"kiln.job.{job_id}"},
        related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}],
        payload={"reason": reason, "event": event, "data": data or {}},
    )


async def run_child_job(flow, **parameters: Any) -> Any:
    """Runs `flow` as a child job of the current one: a subflow in Prefect, a child under the parent in kiln."""
    parent_id, project, _ = current_job()
    child_id = str(uuid.uuid4())
    child_tags = ["kiln", f"job:{child_id}", f"parent:{parent_id}", f"project:{project}", f"type:{flow.name}"]
    with tags(*child_tags):
        return await flow.with_options(flow_run_name=f"{flow.name}-{child_id[:8]}-child")(**parameters)


async def areport_tasks(
    tasks: list[dict], percent: float, message: str | None = None, *, mirror_to_parent: bool = False
) -> None:
    """report_tasks, from async code."""
    await asyncio.to_thread(report_tasks, tasks, percent, message, mirror_to_parent=mirror_to_parent)


def report_tasks(
    tasks: list[dict], percent: float, message: str | None = None, *, mirror_to_parent: bool = False
) -> None:
    """Reports a split job's tasks ([{task_id, status, done_units, requested_units}, …]) with its overall progress.

    The relay keeps them as the job's task table (GET /api/v1/jobs/{id}/tasks) and as a progress
    event on the job's SSE stream. With `mirror_to_parent` the parent job gets the same: a child
    that runs its parent's tasks (hpc_submit under a simulation) shows them on the parent too.
    """
    job_id, _, flow_run_id = current_job()
    if job_id is None:
        return
    job_ids = [job_id]
    if mirror_to_parent:
        context = FlowRunContext.get()
        parent_id = _tag_value("parent:", context.flow_run.tags) if context and context.flow_run else None
        job_ids += [parent_id] if parent_id else []
    _report(job_ids, flow_run_id, {"percent": max(0.0, min(100.0, float(percent))), "message": message,
                                   "tasks": tasks})  # fmt: skip


async def areport_merging(message: str) -> None:
    """Marks the job `merging`: its tasks are done and their outputs are being combined.

    A Running state named Merging, so the Prefect UI shows it too; kiln.dispatch.runs maps it.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from kiln.schemas.statuses import MERGING_STATE_NAME

    _, _, flow_run_id = current_job()
    if flow_run_id is None:
        return
    try:
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Running(name=MERGING_STATE_NAME, message=message))
    except Exception as exc:  # noqa: BLE001 - the status is advisory; merging goes on
        log.warning("could not mark flow run %s merging: %s", flow_run_id, exc)


class TextEvents:
    """Pieces of a running job's text (an LLM's tokens, a plugin's stdout lines) sent as events of one kind,
    the pieces that arrive within TEXT_INTERVAL_SECONDS joined into one; `payload` makes an event's payload
    of the joined text. A piece is never held longer than that: a timer on the running loop sends it."""

    def __init__(self, event: str, payload: Callable[[str], dict], joiner: str = ""):
        self.job_id, _, self.flow_run_id = current_job()
        self.event, self.payload, self.joiner = event, payload, joiner
        self.pending: list[str] = []
        self.sent_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        self.pending.append(text)
        wait = self.sent_at + TEXT_INTERVAL_SECONDS - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(wait, self.flush)
            except RuntimeError:  # no loop here: the next piece, or the last flush, sends it
                pass

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.pending and self.job_id is not None:
            emit_event(self.event, resource={"prefect.resource.id": f"kiln.job.{self.job_id}"},
                       related=[{"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                                 "prefect.resource.role": "flow-run"}],
                       payload=self.payload(self.joiner.join(self.pending)))  # fmt: skip
        self.pending, self.sent_at = [], time.monotonic()
