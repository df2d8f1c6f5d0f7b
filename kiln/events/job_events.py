"""kiln job transitions as Prefect events, so a Prefect automation or deployment trigger can start work when a job ends.

A job's end is emitted as `kiln.job.<status>` (kiln.job.completed, kiln.job.failed, kiln.job.cancelled;
kiln.job.pending when a failed attempt goes back for a retry)
with the job as its resource, labelled with its type and its project's name, and with the scalar fields
of its input and output in the payload: a trigger matches on the labels and templates its run's
parameters from the payload (`{{ event.payload.input.structure }}`).
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from kiln.schemas.statuses import FINAL_STATUSES, JobStatus

JOB_EVENT_PREFIX = "kiln.job."
# the names this module emits, which the relay does not read back
JOB_STATUS_EVENTS = [f"{JOB_EVENT_PREFIX}{status.value}" for status in JobStatus]


def scalars(document: Any) -> dict[str, Any]:
    """The top-level fields of a JSON object that are text, numbers, booleans or null."""
    if not isinstance(document, dict):
        return {}
    return {k: v for k, v in document.items() if v is None or isinstance(v, (str, int, float, bool))}


async def emit_job_event(store, row) -> None:
    """A transition listener of the job index (Store.transition_listeners): a job's end, and a retry, as an event.

    The steps between (queued, running) are not sent: Prefect's own flow-run events carry them, and every
    event is a write to Prefect's database, which on SQLite already stalls under load.
    """
    status = JobStatus(row.status)
    if status not in FINAL_STATUSES and status is not JobStatus.PENDING:
        return
    if status in FINAL_STATUSES:
        row = await store.get_job(row.id, documents=True)
    project = await store.project_name(row.project_id)
    resource = {
        "prefect.resource.id": f"kiln.job.{row.id}",
        "prefect.resource.name": f"{row.type}-{row.id[:8]}",
        "kiln.job.type": row.type,
        "kiln.project": project,
    }
    related = [{"prefect.resource.id": f"prefect.flow-run.{row.flow_run_id}", "prefect.resource.role": "flow-run"}]
    payload: dict[str, Any] = {"status": status.value, "reason": row.status_reason, "attempt": row.attempt}
    if status in FINAL_STATUSES:
        payload.update(input=scalars(row.input), output=scalars(row.output))
    emit_event(
        f"{JOB_EVENT_PREFIX}{status.value}",
        resource=resource,
        related=related if row.flow_run_id else [],
        payload=payload,
    )
