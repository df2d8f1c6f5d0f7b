"""The GPU job API's container jobs at /api/v1/compute/jobs: registered plugins run as plugin_exec jobs (BATCH) or
served as mcp_host deployments (PERSISTENT)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.api.jobs import cancel, job_view, submit_job
from kiln.errors import (
    Conflict,
    InputInvalid,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RateLimited,
    ServerError,
    Unauthorized,
)
from kiln.schemas.compute import (
    SECRET_FIELDS,
    SUBMITTED_VIA,
    ComputeJob,
    ComputeJobCreate,
    ComputeJobPage,
    DockerParameters,
    hide_secrets,
    tag_names,
)
from kiln.schemas.jobs import INT32
from kiln.schemas.plugins import PLUGIN_NAME
from kiln.store.models import JobRow

IMAGE = "parameters.parameters.image"


class SecretsHidden(APIRoute):
    """A route whose refused bodies come back without their secrets: pydantic reports the input of a failing object
    whole (a missing `title` echoes the body), a `secret` or `sshkey` in it included."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def hiding(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = [{**error, "input": hide_secrets(error.get("input"), _field(error["loc"]))}
                          for error in exc.errors()]  # fmt: skip
                raise RequestValidationError(errors) from None

        return hiding


def _field(loc: tuple) -> Any:
    """The name of the field an error is about, when it is a secret one."""
    return loc[-1] if loc and loc[-1] in SECRET_FIELDS else None


router = APIRouter(prefix="/api/v1", route_class=SecretsHidden, responses=error_responses(Unauthorized, ServerError))

Project = Annotated[str, Depends(project_of_caller)]


async def plugin_of(docker: DockerParameters, task: str = "BATCH"):
    """The registered plugin `image` names, at the image `tag` names; NotFound naming the field and what there is."""
    from kiln.blocks.plugin import load_plugin, registered_plugins

    plugin = await load_plugin(docker.image) if re.fullmatch(PLUGIN_NAME, docker.image) else None
    if plugin is None:
        known = sorted(await registered_plugins())
        raise NotFound(
            f"{IMAGE}: no plugin {docker.image!r} is registered (registered: {', '.join(known) or 'none'}); kiln runs "
            "registered plugins and pulls nothing from a registry: `kiln plugins add NAME --image FILE` or "
            "POST /api/v1/plugins registers one",
            details=[{"loc": IMAGE.split("."), "msg": "unknown plugin", "type": "unknown_plugin",
                      "registered": known}],
        )  # fmt: skip
    if not tag_names(docker.tag, plugin.image_digest):
        raise NotFound(
            f"parameters.parameters.tag: the plugin {docker.image!r} has one image, tagged 'latest' and "
            f"{plugin.image_digest!r} (or its first 12 or more hex digits); not {docker.tag!r}",
            details=[{"loc": ["parameters", "parameters", "tag"], "msg": "unknown tag", "type": "unknown_tag",
                      "tags": ["latest", plugin.image_digest]}],
        )  # fmt: skip
    if task == "BATCH" and plugin.input_problems(None):  # a PERSISTENT server is given no input
        raise InvalidRequest(f"{IMAGE}: the plugin {docker.image!r} needs an input matching its input_schema, and "
                             "this API has no field for one; run it with POST /api/v1/jobs (type plugin_exec, "
                             "input.input)")  # fmt: skip
    return plugin


async def compute_row(request: Request, job_id: str, project_id: str) -> JobRow:
    """The project's job `job_id`, if it came through these routes; NotFound otherwise."""
    row = await request.app.state.store.get_job(job_id, project_id, documents=True)
    if row.submitted_via != SUBMITTED_VIA:
        raise NotFound(f"job {job_id} was not submitted through /api/v1/compute/jobs; GET /api/v1/jobs/{job_id} "
                       "shows it")  # fmt: skip
    return row


async def compute_view(request: Request, row: JobRow, *, with_reason: bool = True) -> ComputeJob:
    return ComputeJob.of(await job_view(request, row, with_reason=with_reason), row.submitted_request,
                         str(request.base_url))  # fmt: skip


@router.post(
    "/compute/jobs",
    status_code=202,
    response_model=ComputeJob,
    summary="Submit a GPU job API container job: a registered plugin run as a plugin_exec job (BATCH) or served as "
    "an mcp_host deployment (PERSISTENT)",
    responses=error_responses(InvalidRequest, NotFound, InputInvalid, QuotaExceeded, RateLimited),
)
async def create_compute_job(request: Request, body: ComputeJobCreate, project_id: Project) -> ComputeJob:
    """Takes the GPU job API's job request verbatim and runs it as an ordinary kiln job, through the same submission
    as POST /api/v1/jobs (rate limit, quota, events, checks), at GET /api/v1/jobs/{uuid} and in the Prefect UI.
    Answers in that API's job shape.

    - `task` BATCH is a `plugin_exec` job: the container runs once to its end.
    - `task` PERSISTENT is an `mcp_host` job of `{"server": {"plugin": image}}`: kiln's one kind of job that runs
      until cancelled. The container serves until DELETE cancels it, in the same sandbox, its process speaking MCP
      over stdio (the sandbox has no network, so stdio is the one way in); kiln restarts it when it dies or stops
      answering MCP pings (5 failed attempts in a row fail the job, with each attempt's reason), and serves it at
      /api/v1/mcp/{name}/mcp, the URL the job's `container_access_tokens` give (name: the image's name and a suffix
      of its own), with the kiln key as bearer. It takes a worker's service slot, not a batch slot;
      `status_reason` is its health ("1 of 1 replica healthy"); `max_timeout_run_ms` is not applied.

    - `parameters.parameters.image` names a registered plugin (GET /api/v1/plugins); kiln pulls nothing from a
      registry: another name is a 404 listing the registered ones. `tag` is absent, `latest` or the plugin's image
      digest (or 12+ hex digits of it); another is a 404. A BATCH job of a plugin with an input_schema needs an
      input this API cannot give: 400.
    - `parameters.type` other than `docker`, and fields the sandbox cannot honour — non-empty `ports`,
      `allowed_ips`, `volumes`, `host`,
      `imagesrc`, `secret`, `sshkey`, `user`, and `gpu_registry_uuid` (no network, uid 65534, no registry) — are
      400s naming the field and why. `secret` and `sshkey` are never echoed, stored or logged: a refused body's
      error hides them, an answer shows `<hidden>`.
    - `env` is the container's environment over the plugin's. A BATCH container's wall time (limits.wall_seconds)
      is `max_timeout_run_ms`; the flow's timeout 30 s more. `cpu_count` > 0 and `min_ram_gb` > 0 raise the plugin's
      `limits.cpus` and `limits.memory_mb` to them (never lower them). The resource fields are the job's resources:
      a worker must offer them, and past `max_timeout_assign_ms` (default 5 minutes) unpicked the job fails.
    - What the GPU job API's document forbids (max_timeout_run_ms < 60000, max_timeout_assign_ms < 300000,
      max_timeout_start_ms < 120000, a negative count) and kiln's bounds (cpu_count ≤ 64, max_retry_count ≤ 10,
      timeouts ≤ a year) are 422s naming the field.

    Statuses: pending → PENDING, queued → ASSIGNED, running and merging → RUNNING, completed (and cache_hit) →
    COMPLETED, failed → FAILED, cancelled → CANCELLED; a BATCH container that exits non-zero fails the job with
    status_reason 'exited with code N: <stderr's end>'. A PERSISTENT job is RUNNING while it serves (status_reason
    its health, "replica 1 restarting after exit code 1, attempt 2 of 5, next in 1 s" while a restart waits),
    PENDING again after its worker or kiln restarted until it serves again, CANCELLED once DELETE stopped it, and
    FAILED only when its container failed 5 attempts in a row."""
    docker = body.parameters.parameters
    refused = body.refusals()
    if refused:
        raise InvalidRequest("; ".join(f"{'.'.join(r['loc'])}: {r['msg']}" for r in refused), details=refused)
    plugin = await plugin_of(docker, body.task)
    from kiln.tasks.plugin.images import image_size

    kept = body.record(plugin.image_digest, image_size(plugin.image_path))
    row = await submit_job(request, project_id, body.kiln_job(plugin.limits), submitted_via=SUBMITTED_VIA,
                           submitted_request=kept)  # fmt: skip
    return await compute_view(request, row)


@router.get(
    "/compute/jobs/{job_id}",
    response_model=ComputeJob,
    summary="A container job in the GPU job API's shape",
    responses=error_responses(NotFound),
)
async def get_compute_job(request: Request, job_id: str, project_id: Project) -> ComputeJob:
    """A job submitted through POST /api/v1/compute/jobs; any other job of the project is a 404 pointing to
    GET /api/v1/jobs/{job_id}."""
    return await compute_view(request, await compute_row(request, job_id, project_id))


@router.delete(
    "/compute/jobs/{job_id}",
    response_model=ComputeJob,
    summary="Cancel a container job; answers the job",
    responses=error_responses(NotFound, Conflict),
)
async def cancel_compute_job(request: Request, job_id: str, project_id: Project) -> ComputeJob:
    """Cancels the job as POST /api/v1/jobs/{id}/cancel does: a pending one at once, a running one through Prefect
    (its container is killed; a PERSISTENT job's replicas are stopped and its URL answers 404), so the answer may
    still say RUNNING until it is CANCELLED. A job that has ended is a 409."""
    return await compute_view(request, await cancel(request, await compute_row(request, job_id, project_id)))


@router.get(
    "/compute/jobs",
    response_model=ComputeJobPage,
    summary="The project's container jobs, newest first",
)
async def list_compute_jobs(
    request: Request,
    project_id: Project,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[int | None, Query(ge=0, le=INT32["le"], description="The previous page's "
                                        "next_cursor; the first page when absent.")] = None,
) -> ComputeJobPage:
    """The project's jobs submitted through POST /api/v1/compute/jobs, newest first, a page at a time."""
    rows, next_cursor = await request.app.state.store.list_jobs(project_id, submitted_via=SUBMITTED_VIA, limit=limit,
                                                                cursor=cursor)  # fmt: skip
    return ComputeJobPage(jobs=[await compute_view(request, r, with_reason=False) for r in rows],
                          next_cursor=next_cursor)  # fmt: skip
