"""Lab endpoints: the registered labs and their free slots, their signed callbacks (the one route a lab calls, with no
kiln key), the audit of those callbacks, and a person's approval of a lab_booking job that waits for one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.api.jobs import job_view
from kiln.errors import Conflict, InputInvalid, InvalidRequest, NotFound, ServerError, TooLarge, Unauthorized
from kiln.schemas import Job
from kiln.schemas.lab_booking import LAB_NAME
from kiln.schemas.labs import Callback, FINAL_CALLBACK_STATUSES, SlotList
from kiln.store import labs as booked

log = logging.getLogger("kiln.labs")

router = APIRouter(prefix="/api/v1", responses=error_responses(ServerError))

Project = Annotated[str, Depends(project_of_caller)]
KEYED = error_responses(Unauthorized)

# a callback's body is a status and results: a lab with more to hand over gives a link in its results
CALLBACK_MAX_BYTES = 1 << 20


class LabSpec(BaseModel):
    """POST /api/v1/labs: a lab to register. The key and secrets are stored as secrets and never shown again."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=LAB_NAME, description="The lab's name in kiln: lowercase letters, digits, '-'.")
    base_url: str = Field(pattern=r"^https?://\S+$", description="The lab's API (kiln calls BASE_URL/slots, …).")
    api_key: SecretStr = Field(description="The key kiln sends the lab (`Authorization: Bearer`).")
    signing_secret: SecretStr = Field(description="The whsec_… secret the lab signs its callbacks with.")
    previous_signing_secret: SecretStr | None = Field(
        None, description="The secret before a rotation, accepted until the lab is registered again without it.",
    )
    resources: list[str] = Field(min_length=1, description="The lab's resources a booking may name.")
    description: str = Field("", max_length=2000, description="What the lab is.")
    overwrite: bool = Field(False, description="Replace a lab of this name that this project registered.")


class Decision(BaseModel):
    """A person's word on a lab_booking job that waits for approval."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, min_length=1, max_length=2000, description="Why; required to reject.")


class Rejection(Decision):
    reason: str = Field(min_length=1, max_length=2000, description="Why the booking must not go to the lab.")


class LabUnavailable(ServerError):
    """The lab did not answer (or answered with a failure)."""

    status_code = 502


async def _lab(name: str):
    from kiln.blocks.lab import TABLE, unknown_lab

    labs = await TABLE.current(refresh_for=name)
    if name not in labs:
        error = unknown_lab(name, sorted(labs), field="lab")
        raise NotFound(error.message, details=error.details)
    return labs[name]


@router.get("/labs", summary="The registered labs (Prefect blocks): URL and resources, never their key or secrets",
            responses=KEYED)  # fmt: skip
async def list_labs(project_id: Project) -> list[dict]:
    from kiln.blocks.lab import TABLE

    labs = await TABLE.read()
    return [labs[name].summary(name) for name in sorted(labs)]


@router.post("/labs", status_code=201, summary="Register a lab (a Prefect block); its key and secrets are kept as "
             "secrets", responses={**KEYED, **error_responses(InvalidRequest, Conflict, InputInvalid)})  # fmt: skip
async def register_lab(spec: LabSpec, project_id: Project) -> dict:
    """409 when the name is taken (unless `overwrite`, and only for a lab this project registered: an operator's or
    another project's is never replaced)."""
    from kiln.blocks.lab import TABLE, Lab, load_lab

    existing = await load_lab(spec.name)
    if existing is not None and not spec.overwrite:
        raise Conflict(f"name: a lab called {spec.name!r} is registered; set overwrite to replace it")
    if existing is not None and existing.project_id != project_id:
        raise Conflict(f"name: the lab {spec.name!r} was registered by "
                       f"{'an operator' if existing.project_id is None else 'another project'}; only they can "
                       "replace it: choose another name")  # fmt: skip
    from kiln.webhooks import secret_key

    for field, secret in (("signing_secret", spec.signing_secret), ("previous_signing_secret",
                                                                     spec.previous_signing_secret)):
        try:
            if secret is not None:
                secret_key(secret.get_secret_value())
        except ValueError as exc:  # its message names what is wrong, never the secret
            raise InputInvalid(f"{field}: {exc}", details=[{"loc": ["body", field], "msg": str(exc),
                                                             "type": "webhook_secret"}]) from None  # fmt: skip
    try:
        lab = Lab(base_url=spec.base_url, api_key=spec.api_key, signing_secret=spec.signing_secret,
                  previous_signing_secret=spec.previous_signing_secret, resources=spec.resources,
                  description=spec.description, project_id=project_id)  # fmt: skip
    except ValidationError as exc:
        errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InputInvalid("; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors),
                           details=errors) from None  # fmt: skip
    try:
        await lab.asave(spec.name, overwrite=spec.overwrite)
    except ValueError as exc:
        raise Conflict(f"name: {spec.name!r}: {exc}; set overwrite to replace it") from None
    TABLE.forget()
    return lab.summary(spec.name)


@router.delete("/labs/{lab}", status_code=204, summary="Remove a lab this project registered",
               responses={**KEYED, **error_responses(NotFound, Conflict)})  # fmt: skip
async def remove_lab(lab: str, project_id: Project) -> None:
    """409 for a lab an operator or another project registered: `kiln labs remove` is the operator's."""
    from kiln.blocks.lab import TABLE, Lab

    found = await _lab(lab)
    if found.project_id != project_id:
        raise Conflict(f"lab: {lab!r} was registered by "
                       f"{'an operator' if found.project_id is None else 'another project'}; only they can remove "
                       "it (`kiln labs remove`)")  # fmt: skip
    await Lab.adelete(lab)
    TABLE.forget()


@router.get("/labs/{lab}/slots", summary="Free slots at a lab, as the lab answers them (no fixed look-ahead)",
            responses={**KEYED, **error_responses(NotFound, InvalidRequest, LabUnavailable)})  # fmt: skip
async def lab_slots(
    request: Request,
    lab: str,
    project_id: Project,
    resource: Annotated[str | None, Query(max_length=200, description="One of the lab's resources; all when unset.")] = None,
    start: Annotated[AwareDatetime | None, Query(alias="from", description="From (ISO 8601 with a zone); now.")] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to", description="To (ISO 8601 with a zone), any distance "
                                               "ahead; a week after `from` when unset.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most slots in the answer.")] = 100,
) -> SlotList:
    """The lab's GET /slots, proxied; 400 naming the field when the lab refuses the question, 502 when it fails."""
    from kiln.tasks.lab.client import LabAnswer, LabClient

    found = await _lab(lab)
    if resource is not None and resource not in found.resources:
        raise InvalidRequest(f"resource: {resource!r} is not a resource of lab {lab!r}; it offers "
                             f"{', '.join(found.resources)}")  # fmt: skip
    start = start or datetime.now(timezone.utc)
    end = end or start + timedelta(days=7)
    if end <= start:
        raise InvalidRequest(f"to: {end.isoformat()} is not after from ({start.isoformat()})")
    try:
        async with LabClient.of(lab, found, request.app.state.settings.lab_timeout_seconds) as client:
            return await client.slots(resource, start, end, limit=limit)
    except LabAnswer as answer:
        if answer.status is not None and 400 <= answer.status < 500:
            raise InvalidRequest(f"the lab {lab!r} refused the question: {answer.message}") from None
        raise LabUnavailable(f"the lab {lab!r} did not answer: {answer.message}") from None


@router.get("/labs/{lab}/callbacks", summary="A lab's callbacks: those taken (with what each did) and those "
            "refused with 401 (the audit)", responses={**KEYED, **error_responses(NotFound)})  # fmt: skip
async def lab_callbacks(
    request: Request, lab: str, project_id: Project,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most of each, newest first.")] = 100,
) -> dict:
    await _lab(lab)
    taken, refused = await booked.callbacks(request.app.state.store, lab, limit)
    return {
        "taken": [{"id": r.id, "webhook_id": r.webhook_id, "booking": r.booking_id, "sequence": r.sequence,
                   "status": r.status, "effect": r.effect, "received_at": r.received_at.isoformat()} for r in taken],
        "refused": [{"id": r.id, "webhook_id": r.webhook_id, "reason": r.reason, "message": r.message,
                     "client": r.client, "body_sha256": r.body_sha256, "body_bytes": r.body_bytes,
                     "received_at": r.received_at.isoformat()} for r in refused],
    }  # fmt: skip


@router.post(
    "/hooks/labs/{lab}",
    summary="A lab's signed callback (Standard Webhooks): no kiln key, the signature is the authentication",
    responses=error_responses(Unauthorized, NotFound, InputInvalid, TooLarge),
    openapi_extra={"security": []},
)
async def lab_callback(request: Request, lab: str) -> dict:
    """401 (and kept for audit: GET /api/v1/labs/{lab}/callbacks) for a callback unsigned, signed with no secret of
    the lab's, altered after signing, or signed more than 5 minutes from now. A verified callback is taken once: a
    second delivery (same webhook-id, or same booking and sequence) answers 200 and changes nothing, so the lab
    stops retrying."""
    from kiln.blocks.lab import TABLE
    from kiln.webhooks import WebhookSignatureError, verify

    store = request.app.state.store
    body = await request.body()
    if len(body) > CALLBACK_MAX_BYTES:
        raise TooLarge(f"body: {len(body)} bytes; a callback has at most {CALLBACK_MAX_BYTES} (put a link to large "
                       "results in `results`)")  # fmt: skip
    found = await _lab(lab)
    try:
        try:
            webhook_id = verify(found.signing_secrets(), body, request.headers)
        except WebhookSignatureError as exc:
            if exc.reason != "bad_signature" or TABLE.age <= 1.0:
                raise
            # a secret rotated a moment ago: read the lab again once before refusing
            found = (await TABLE.read()).get(lab) or found
            webhook_id = verify(found.signing_secrets(), body, request.headers)
    except WebhookSignatureError as exc:
        await booked.record_refusal(store, lab, webhook_id=request.headers.get("webhook-id"), reason=exc.reason,
                                    message=exc.message, client=request.client.host if request.client else None,
                                    body_sha256=hashlib.sha256(body).hexdigest(), body_bytes=len(body))  # fmt: skip
        log.warning("refused a callback for lab %s: %s", lab, exc.message)
        raise
    try:
        callback = Callback.model_validate_json(body)
    except ValidationError as exc:
        errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InputInvalid("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
                           details=errors) from None  # fmt: skip
    taken = await booked.take_callback(store, lab, webhook_id, callback)
    if taken.job_id is not None and callback.status in FINAL_CALLBACK_STATUSES:
        try:
            await request.app.state.labs.deliver(taken.job_id)
        except Exception:  # noqa: BLE001 - the lab watch hands it over on its next round
            log.exception("could not hand the outcome of job %s to its run now", taken.job_id)
    return {"taken": not taken.duplicate, "effect": taken.effect}


# approval of a lab_booking job prepared by someone (an agent) for a person to check


async def _decide(request: Request, job_id: str, project_id: str, approved: bool, reason: str | None) -> Job:
    from uuid import UUID

    from prefect.client.schemas.objects import StateType

    from kiln.dispatch.labs import APPROVAL_KEY, resume_with_input

    store = request.app.state.store
    job = await store.get_job(job_id, project_id)
    verb = "approve" if approved else "reject"
    if job.type != "lab_booking":
        raise Conflict(f"job {job_id} is a {job.type} job: only a lab_booking job submitted with approval: true "
                       f"waits for approval")  # fmt: skip
    waiting = False
    if job.flow_run_id is not None and job.status == "running":
        # the flow says it awaits approval (its awaiting_approval event) just before it suspends: give it that moment
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            flow_run = await request.app.state.prefect.client.read_flow_run(UUID(job.flow_run_id))
            state = flow_run.state
            waiting = (state is not None and state.type is StateType.PAUSED
                       and state.state_details.pause_key == APPROVAL_KEY)  # fmt: skip
            decisions = [e.event for e in await store.events_after(job_id)
                         if e.event in ("awaiting_approval", "approved", "rejected")]  # fmt: skip
            announced = decisions[-1:] == ["awaiting_approval"]
            late = asyncio.get_running_loop().time() > deadline
            if waiting or not announced or state is None or state.is_final() or late:
                break
            await asyncio.sleep(0.2)
    if not waiting:
        now = f"{job.status}" + (f": {job.status_reason}" if job.status_reason else "")
        raise Conflict(f"job {job_id} is not awaiting approval (it is {now}); only a lab_booking job submitted with "
                       f"approval: true can be approved or rejected, once, while it waits")  # fmt: skip
    by = getattr(request.state, "caller", None)
    decision = {"approved": approved, "reason": reason, "by": by.key_prefix if by else None}
    try:
        await resume_with_input(job.flow_run_id, decision)
    except Exception as exc:  # noqa: BLE001 - decided a moment ago by another request
        raise Conflict(f"job {job_id} is not awaiting approval any more: {exc}") from None
    words = ("approved" if approved else "rejected") + (f" by {decision['by']}" if decision["by"] else "")
    await store.add_health(job_id, words + (f": {reason}" if reason else ""), "approved" if approved else "rejected",
                           {"reason": reason})
    log.info("job %s: %sd", job_id, verb)
    return await job_view(request, await store.get_job(job_id, project_id, documents=True))


@router.post("/jobs/{job_id}/approve", response_model=Job, summary="Approve a lab_booking job that waits for "
             "approval: it books its slot now", responses={**KEYED, **error_responses(InvalidRequest, NotFound, Conflict,
                                                                          InputInvalid)})  # fmt: skip
async def approve_job(request: Request, job_id: str, project_id: Project, body: Decision | None = None) -> Job:
    """409 with the job's status when it is not awaiting approval (not a lab_booking job, submitted without
    approval, already decided, or ended)."""
    return await _decide(request, job_id, project_id, True, body.reason if body else None)


@router.post("/jobs/{job_id}/reject", response_model=Job, summary="Reject a lab_booking job that waits for "
             "approval: it ends cancelled with the reason, nothing sent to the lab",
             responses={**KEYED, **error_responses(InvalidRequest, NotFound, Conflict, InputInvalid)})  # fmt: skip
async def reject_job(request: Request, job_id: str, project_id: Project, body: Rejection) -> Job:
    """409 with the job's status when it is not awaiting approval."""
    return await _decide(request, job_id, project_id, False, body.reason)


