"""The `lab_booking` job: books a slot on a registered lab, then waits — suspended, holding no worker slot and no
process — for the lab's signed callback (or kiln's ask of the lab, or the deadline), and ends with the lab's results.

Prefect re-runs a suspended flow from its start when it is resumed: the approval is read back from the first
suspension's input, the booking from the booking task's cache (kiln.tasks.lab.booking.book_slot), so nothing is sent
to the lab twice. The outcome comes as the second suspension's input: the kiln API (kiln.dispatch.labs) resumes the
run with the one outcome the job index settled on.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.events import emit_event
from prefect.flow_runs import suspend_flow_run
from prefect.input.actions import aread_flow_run_input
from prefect.input.run_input import keyset_from_base_key
from prefect.states import Cancelled, Failed
from pydantic import BaseModel, Field

from kiln.runtime import current_job, report_health
from kiln.schemas.job_types import JobType
from kiln.schemas.lab_booking import LabBookingInput

# the keys of the two suspensions; the kiln API reads them from the run's Paused state (what it waits for)
APPROVAL_KEY = "approval"
OUTCOME_KEY = "outcome"


class Approval(BaseModel):
    """A person's word on a booking that waits for approval (POST /api/v1/jobs/{id}/approve or /reject)."""

    approved: bool = Field(description="Whether the booking may go to the lab.")
    reason: str | None = Field(None, description="Why (required to reject).")
    by: str | None = Field(None, description="The API key prefix that decided.")


class LabOutcome(BaseModel):
    """How the booking ended, as the job index settled it (kiln.store.labs): the first final word wins."""

    status: Literal["completed", "failed", "cancelled", "expired"] = Field(description="How it ended.")
    results: dict[str, Any] | None = Field(None, description="The lab's results (completed).")
    message: str | None = Field(None, description="The lab's words, or kiln's reason (expired).")
    source: str = Field(description="callback, poll (kiln asked the lab), deadline or user.")


async def wait_for(model: type[BaseModel], key: str):
    """The input the run is resumed with under `key`: suspends it (holding nothing) until then. A run that ends
    (crashed) after its resume and runs again has its input at once: Prefect forgets a pause that fired once a run
    is re-run from a final state, and a second suspension with the key would fail (the input exists)."""
    given = await aread_flow_run_input(keyset_from_base_key(key)["response"])
    if given is not None:
        return model.model_validate(given)
    return await suspend_flow_run(wait_for_input=model, key=key)


def callback_url(lab: str) -> str:
    from kiln.settings import get_settings

    return f"{get_settings().callback_base_url}/api/v1/hooks/labs/{lab}"


@flow(name="lab_booking", persist_result=True, result_serializer="json")
async def lab_booking(input: LabBookingInput):
    from kiln.settings import get_settings
    from kiln.tasks.lab.booking import BOOKED_EVENT, NoSlot, book_slot
    from kiln.tasks.lab.client import LabAnswer

    job_id, _, flow_run_id = current_job()
    if input.approval:
        report_health(f"awaiting approval: POST /api/v1/jobs/{job_id}/approve (or /reject with a reason); nothing "
                      f"has been sent to {input.lab} yet", "awaiting_approval")  # fmt: skip
        decision = await wait_for(Approval, APPROVAL_KEY)
        if not decision.approved:
            return Cancelled(message=f"rejected{f' by {decision.by}' if decision.by else ''}: {decision.reason}")
    try:
        booking = await book_slot(input, job_id, callback_url(input.lab), get_settings().lab_timeout_seconds)
    except NoSlot as exc:
        return Failed(message=str(exc))
    except LabAnswer as exc:
        return Failed(message=f"could not book at {input.lab}: {exc.message} (HTTP {exc.status}, {exc.code})"
                      if exc.status else f"could not book at {input.lab}: {exc.message}")  # fmt: skip
    # the kiln API enters the booking in the job index (its status_reason, its polling, its callbacks): told again
    # on every re-run, which changes nothing there
    emit_event(BOOKED_EVENT, resource={"prefect.resource.id": f"kiln.job.{job_id}"},
               related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}],
               payload=booking)  # fmt: skip
    outcome = await wait_for(LabOutcome, OUTCOME_KEY)
    return ending(booking, outcome)


def ending(booking: dict, outcome: LabOutcome):
    """The job's output, or its Failed / Cancelled state with the lab's words."""
    output = {**{k: booking[k] for k in ("lab", "booking", "resource", "start", "end")}, "status": outcome.status,
              "results": outcome.results, "message": outcome.message, "source": outcome.source}  # fmt: skip
    where = f"{booking['lab']} (booking {booking['booking']})"
    if outcome.status == "completed":
        return output
    if outcome.status == "cancelled":
        return Cancelled(message=f"cancelled by the lab {where}: {outcome.message or 'no reason given'}", data=output)
    if outcome.status == "failed":
        return Failed(message=f"the lab {where} reports the run failed: {outcome.message or 'no reason given'}",
                      data=output)  # fmt: skip
    return Failed(message=outcome.message or f"no result from {where} by the deadline", data=output)


JOB_TYPE = JobType(
    name="lab_booking",
    description="Books a slot on a registered lab (`kiln labs add`) and waits, holding no worker, for the lab's "
    "signed callback with the results; asks the lab when the callback does not come, fails past the deadline. "
    "Optionally waits for a person's approval before anything is sent.",
    input_model=LabBookingInput,
    flow=lab_booking,
    check="kiln.blocks.lab:check_booking",
    on_cancel="kiln.dispatch.labs:cancel_booking",
    # a worker lost mid-booking or while the resumed run ends: the next attempt books with the same Idempotency-Key
    # (the lab answers the booking it made) and is handed the outcome the job index keeps
    crash_reruns=3,
    # a lab run is an experiment: every submission books
    cacheable=False,
    tags=("lab",),
)
