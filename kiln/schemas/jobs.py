"""The jobs contract shared by the API and the SDK."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_serializer, model_validator

from kiln.schemas.resources import Resources
from kiln.schemas.strict import StrictRequest
from kiln.schemas.statuses import JobStatus


# priorities and ids are 32-bit integers in the job index
INT32 = {"ge": -(2**31), "le": 2**31 - 1}


def iso(value: datetime | None) -> str | None:
    """ISO 8601 with microseconds, always in UTC."""
    return value.isoformat(timespec="microseconds") if value else None


class JobFields(StrictRequest):
    """What every job request carries besides its type and input."""

    project_id: str | None = Field(None, description="The project; the API key's project when omitted.")
    priority: int = Field(0, **INT32, description="Higher runs first; FIFO among jobs of the same priority.")
    resources: Resources | None = Field(None, description="What the job needs, and its timeouts and retries.")
    compute_target: str | None = Field(None, description="Where to run: 'local' or a registered cluster name.")
    parent_id: str | None = Field(None, description="The job this one is a child of.")
    refresh: bool = Field(False, description="Run again even when a finished job with the same input exists.")


MODEL_SHORTHAND = Field(None, description="Shorthand for input.model, as in the SDK call jobs.create(type=…, model=…).")


class JobCreate(JobFields):
    """A job request as the API reads it first: any type, its input still unread (read_job checks it)."""

    type: str = Field(description="The job type, e.g. 'sleep' or 'ml_predict'.")
    input: dict[str, Any] = Field(default_factory=dict, description="The job type's input.")
    model: str | None = MODEL_SHORTHAND


def job_request_union(job_types: Mapping[str, Any]) -> Any:
    """The job request as the OpenAPI document states it: a union discriminated on `type`, one branch per job type
    with that type's input model, from the registry `job_types` (name → JobType; its name, description and
    input_model are read).

    The API reads a request as JobCreate then the type's input model, which accepts exactly what this
    union describes; a branch offers the `model` shorthand only when its input has a `model` field.
    """
    branches = []
    for name, job_type in job_types.items():
        input_model = job_type.input_model
        fields: dict[str, Any] = {
            "type": (Literal[name], Field(description=job_type.description)),
            # an input whose every field has a default may be left out
            "input": (input_model, Field(description=f"The {name} job's input.")
                      if any(f.is_required() for f in input_model.model_fields.values())
                      else Field(default_factory=dict, description=f"The {name} job's input.")),
        }  # fmt: skip
        if "model" in input_model.model_fields:
            fields["model"] = (str | None, MODEL_SHORTHAND)
        title = "".join(part.title() for part in name.split("_"))
        branches.append(create_model(f"{title}JobCreate", __base__=JobFields, **fields))
    return Annotated[Union[tuple(branches)], Field(discriminator="type")]  # noqa: UP007 - built from a tuple


def _no_default(schema: dict) -> None:
    """A field left out is unchanged: its absence, not a null the schema would have to allow, says so."""
    schema.pop("default", None)


class JobPatch(StrictRequest):
    """What to change: at least one of the two (null is not a value of either)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    priority: int = Field(None, **INT32, json_schema_extra=_no_default,
                          description="The new priority; only a pending job can change it.")  # fmt: skip
    replicas: int = Field(
        None, ge=1, le=32, json_schema_extra=_no_default, description="The replicas of a running mcp_host job, changed live: new ones start, "
        "extra ones drain (they take no new session and stop when their calls are done).",
    )

    @model_validator(mode="after")
    def _something(self) -> JobPatch:
        if self.priority is None and self.replicas is None:
            raise ValueError("give priority, or replicas")
        return self


class Job(BaseModel):
    id: str = Field(description="The job's id.")
    type: str = Field(description="The job type.")
    project_id: str = Field(description="The project the job belongs to.")
    status: JobStatus = Field(description="Where the job is in its life.")
    priority: int = Field(description="Higher runs first.")
    input: dict[str, Any] = Field(description="The input as accepted.")
    resources: Resources = Field(description="What the job needs, and its limits.")
    compute_target: str | None = Field(None, description="Where the job runs.")
    parent_id: str | None = Field(None, description="The parent job, for a child job.")
    output: Any = Field(None, description="The result, once the job completed; for a failed plugin_exec job, what "
                       "its run left (exit code, stdout, stderr).")
    status_reason: str | None = Field(
        None, description="Why the job is not progressing or did not succeed, in words a user can act on."
    )
    attempt: int = Field(1, description="Which run of the job this is (retries count up).")
    created_at: datetime = Field(description="When the job was submitted.")
    queued_at: datetime | None = Field(None, description="When it was released to Prefect.")
    started_at: datetime | None = Field(None, description="When it started running.")
    completed_at: datetime | None = Field(None, description="When it reached its final status.")
    flow_run_id: str | None = Field(None, description="The Prefect flow run executing the job.")
    flow_run_url: str | None = Field(None, description="The flow run in the Prefect UI.")

    @field_serializer("created_at", "queued_at", "started_at", "completed_at")
    def _iso(self, value: datetime | None) -> str | None:
        return iso(value)


class JobPage(BaseModel):
    jobs: list[Job] = Field(description="The jobs, newest first.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


# `delta`: a piece of an llm_proxy job's streamed text, {"text": "…"}
EventKind = Literal["status", "progress", "delta", "completed", "failed", "cancelled",
                    # a persistent job's health while it serves (kiln.runtime.report_health)
                    "starting", "healthy", "unhealthy", "restarting", "scaled"]


class JobEvent(BaseModel):
    id: int = Field(description="Increasing event id; send it back as Last-Event-ID to resume.")
    job_id: str = Field(description="The job the event belongs to.")
    event: EventKind = Field(description="What happened.")
    data: dict[str, Any] = Field(description="The event's payload, e.g. {'status': 'running'}.")
    created_at: datetime = Field(description="When kiln recorded it.")

    @property
    def is_terminal(self) -> bool:
        return self.event in ("completed", "failed", "cancelled")

    @field_serializer("created_at")
    def _iso(self, value: datetime) -> str | None:
        return iso(value)


class TaskReport(StrictRequest):
    """One task of a job split into `ntasks`, as its flow sees it."""

    task_id: int = Field(ge=0, le=INT32["le"], description="The task's number within the job.")
    status: str = Field(min_length=1, max_length=200, description="pending, running, completed, failed, …")
    done_units: int = Field(0, ge=0, le=INT32["le"], description="Units of work the task has done.")
    requested_units: int = Field(0, ge=0, le=INT32["le"], description="Units of work the task was given.")


class ProgressReport(StrictRequest):
    """How far a running job is, as its own flow reports it (kiln.runtime.report_progress, report_tasks)."""

    percent: float = Field(ge=0, le=100, description="How far the job is, 0 to 100.")
    message: str | None = Field(None, max_length=2000, description="What it is doing, in words.")
    tasks: list[TaskReport] | None = Field(
        None, max_length=100_000, description="A split job's tasks: they replace its task table (GET …/tasks)."
    )


class ProgressRecorded(BaseModel):
    recorded: bool = Field(description="False when the job had already ended: its end stays its last event.")


class RunEndedMirrored(BaseModel):
    mirrored: bool = Field(description="Whether the job took its flow run's state from Prefect now: false when the run "
                           "has not ended there, or is not the job's current attempt.")


class JobTypeInfo(BaseModel):
    type: str = Field(description="The job type's name.")
    description: str = Field(description="What the job type does.")
    available: bool = Field(description="Whether this installation can run it.")
    input_schema: dict[str, Any] = Field(description="JSON schema of the job type's input.")
