"""Per-task status of jobs split into `ntasks`: the /tasks endpoint's table and its progress events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select

from kiln.store.models import JobEventRow, JobTaskRow, utcnow
from kiln.store.store import lock_unfinished


async def record_task_progress(store, job_id: str, payload: dict[str, Any]) -> bool:
    """Replaces the job's task table with the flow's latest view and logs it as one progress event.

    Dropped once the job ended (False), so the terminal event stays last (as Store.add_progress does).
    """
    tasks = payload["tasks"]
    now = utcnow()
    async with store.session.begin() as s:
        if not await lock_unfinished(s, job_id):
            return False
        await s.execute(delete(JobTaskRow).where(JobTaskRow.job_id == job_id))
        s.add_all(
            JobTaskRow(
                job_id=job_id,
                task_id=int(task["task_id"]),
                status=str(task["status"]),
                done_units=int(task.get("done_units") or 0),
                requested_units=int(task.get("requested_units") or 0),
                updated_at=now,
            )
            for task in tasks
        )
        data = {"percent": payload.get("percent", 0), "message": payload.get("message"), "tasks": tasks}
        s.add(JobEventRow(job_id=job_id, event="progress", data=data, created_at=now))
    await store.notify([job_id])
    return True


async def job_tasks(store, job_id: str) -> list[dict[str, Any]]:
    """The job's tasks in order, as GET /api/v1/jobs/{id}/tasks returns them."""
    async with store.session() as s:
        rows = await s.scalars(select(JobTaskRow).where(JobTaskRow.job_id == job_id).order_by(JobTaskRow.task_id))
        return [
            {
                "task_id": row.task_id,
                "status": row.status,
                "done_units": row.done_units,
                "requested_units": row.requested_units,
            }
            for row in rows
        ]
