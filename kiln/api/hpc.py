"""HPC endpoints: the registered clusters (GET /api/v1/clusters) and a split job's tasks (GET …/tasks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.errors import NotFound, ServerError, Unauthorized

router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, ServerError))


@router.get("/clusters", summary="The registered HPC clusters (Prefect blocks), by name")
async def list_clusters(project_id: Annotated[str, Depends(project_of_caller)]) -> list[dict]:
    from kiln.blocks.cluster import registered_clusters

    clusters = await registered_clusters()
    return [clusters[name].summary(name) for name in sorted(clusters)]


@router.get(
    "/jobs/{job_id}/tasks", summary="Per-task status of a job split into ntasks", responses=error_responses(NotFound)
)
async def list_tasks(
    request: Request, job_id: str, project_id: Annotated[str, Depends(project_of_caller)]
) -> list[dict]:
    from kiln.store.job_tasks import job_tasks

    store = request.app.state.store
    await store.get_job(job_id, project_id)
    return await job_tasks(store, job_id)
