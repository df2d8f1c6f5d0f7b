"""The job index's tables: what Prefect has no place for, and a mirror of job state for fast listing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the job index")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # core-hours the project may use; None is no limit. Usage is charged from jobs' real run time.
    budget_core_hours: Mapped[float | None] = mapped_column(Float, default=None)
    used_core_hours: Mapped[float] = mapped_column(Float, default=0.0)
    # whether a job repeating a finished one is answered from its result (a cache hit)
    reuse_results: Mapped[bool] = mapped_column(Boolean, default=True)
    # USD the project may spend on LLM calls; None is no limit (kiln.store.llm). `held` is what calls
    # under way have reserved: max_tokens × price each, until they end and are charged their real cost
    llm_budget_usd: Mapped[float | None] = mapped_column(Float, default=None)
    llm_spent_usd: Mapped[float] = mapped_column(Float, default=0.0)
    llm_held_usd: Mapped[float] = mapped_column(Float, default=0.0)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    # sha256 of the key; the key itself is shown once and never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # LLM calls through the drop-in endpoints, per minute: how many, and how many tokens; None is no limit
    llm_calls_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    llm_tokens_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # the dispatcher's query: pending jobs by priority desc, then submission order
        Index("ix_jobs_status_priority_seq", "status", "priority", "seq"),
        Index("ix_jobs_project_seq", "project_id", "seq"),
    )

    # submission order: FIFO within one priority, and the cursor for listing
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # input and output can be megabytes (1000 structures): loaded only where asked for, with DOCUMENTS
    input: Mapped[dict[str, Any]] = mapped_column(JSON, deferred=True, deferred_raiseload=True)
    resources: Mapped[dict[str, Any]] = mapped_column(JSON)
    compute_target: Mapped[str | None] = mapped_column(String(200), default=None)
    parent_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)
    # a child run as a subflow inside its parent's flow run; every other job is released by the
    # dispatcher and takes a worker slot of its own (a batch_run job's children among them)
    in_parent_run: Mapped[bool] = mapped_column(Boolean, default=False)
    # it serves until cancelled (JobType.persistent): it takes a worker's service slot, not a batch slot
    persistent: Mapped[bool] = mapped_column(Boolean, default=False)
    output: Mapped[Any] = mapped_column(JSON, nullable=True, default=None, deferred=True, deferred_raiseload=True)
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    flow_run_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    input_hash: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    # what the quota holds for the job until it ends and is charged its real run time
    estimated_core_hours: Mapped[float] = mapped_column(Float, default=0.0)
    # what the project's LLM budget holds for the job until it ends and is charged its output's cost_usd
    held_usd: Mapped[float] = mapped_column(Float, default=0.0)
    # the first characters of the API key that submitted it (ApiKey.prefix), for usage by key
    key_prefix: Mapped[str | None] = mapped_column(String(16), default=None)
    batch_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)
    # a job submitted through another API's routes, to be answered in that API's shape: which ('compute',
    # /api/v1/compute/jobs), and its request as taken (secrets masked) with what kiln resolved from it
    submitted_via: Mapped[str | None] = mapped_column(String(32), default=None)
    submitted_request: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True,
                                                                      default=None)
    # when its flow run suspended itself (Prefect Paused: a lab booking waiting for the lab), until a worker takes it
    # again; a suspended job holds no worker slot (kiln.store.policy.SuspendedRunHoldsNoSlot)
    suspended_at: Mapped[datetime | None] = mapped_column(default=None)
    # the time it spent suspended, not charged as run time
    suspended_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    picked_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)


class BatchRow(Base):
    """Jobs submitted together in one request; `rejected` counts the entries refused at submission."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    size: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    # cpu, memory, filesystems applied to the batch's jobs
    hardware: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)
    # the job that submitted it, for a scheduled batch run
    parent_id: Mapped[str | None] = mapped_column(String(36), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CacheEntryRow(Base):
    """A completed job whose result answers later jobs with the same type, canonical input and code version."""

    __tablename__ = "cache_entries"

    project_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    input_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LlmUsageRow(Base):
    """One LLM call's usage, as the provider reported it, and its cost: what GET /api/v1/llm/usage sums."""

    __tablename__ = "llm_usage"
    __table_args__ = (Index("ix_llm_usage_project_at", "project_id", "at"),)

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(36))
    key_prefix: Mapped[str | None] = mapped_column(String(16), default=None)
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str | None] = mapped_column(String(200), default=None)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    # the call failed (a refused request, a stream cut short); its usage is what was reported before
    failed: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEventRow(Base):
    __tablename__ = "job_events"

    # global and increasing: the SSE event id, and Last-Event-ID's meaning
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    event: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobTaskRow(Base):
    """One task of a job split into `ntasks` (hpc_submit, simulation): its status and units done."""

    __tablename__ = "job_tasks"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    done_units: Mapped[int] = mapped_column(Integer, default=0)
    requested_units: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkerRow(Base):
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # changes at every start of the worker process: a new one under the same name is a restart
    instance: Mapped[str] = mapped_column(String(36))
    slots: Mapped[int] = mapped_column(Integer)
    # persistent jobs it hosts besides its slots
    service_slots: Mapped[int] = mapped_column(Integer, default=0)
    # what the worker's machine offers: cpu_count, gpu_count, ram_gb, …
    offers: Mapped[dict[str, Any]] = mapped_column(JSON)
    # flow run ids the worker said it runs at its last heartbeat
    running: Mapped[list[Any]] = mapped_column(JSON)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    lost: Mapped[bool] = mapped_column(Boolean, default=False)


class LabBookingRow(Base):
    """A lab_booking job's booking at its lab, and the one outcome it ends with (the first final word wins)."""

    __tablename__ = "lab_bookings"
    __table_args__ = (UniqueConstraint("lab", "booking_id", name="uq_lab_bookings_lab_booking"),)

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    lab: Mapped[str] = mapped_column(String(63))
    booking_id: Mapped[str] = mapped_column(String(200))
    resource: Mapped[str] = mapped_column(String(200))
    slot_start: Mapped[datetime] = mapped_column()
    slot_end: Mapped[datetime] = mapped_column()
    # past it, with no result from the lab, the job fails naming the booking and what the lab last said
    deadline: Mapped[datetime] = mapped_column()
    # the highest callback sequence taken: a lower one arriving later was reordered on the way and changes nothing
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)
    # the last thing the lab said of the booking (a callback, or its answer when asked), in words
    last_said: Mapped[str | None] = mapped_column(Text, default=None)
    last_said_at: Mapped[datetime | None] = mapped_column(default=None)
    # completed | failed | cancelled | expired: set once, by one conditional UPDATE (kiln.store.labs.claim_outcome)
    outcome_status: Mapped[str | None] = mapped_column(String(16), default=None)
    # {"status", "results", "message", "source": callback | poll | deadline | user}
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True, default=None)
    outcome_at: Mapped[datetime | None] = mapped_column(default=None)
    # the flow run the outcome was handed to (resumed with it); a later attempt's run gets it again
    delivered_run: Mapped[str | None] = mapped_column(String(36), default=None)
    # when kiln next asks the lab for the booking (GET /bookings/{id}), and how often it has asked
    next_poll_at: Mapped[datetime | None] = mapped_column(index=True, default=None)
    polls: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabCallbackRow(Base):
    """A verified callback from a lab, kept once: a second delivery of a webhook-id, or of a booking's sequence, is
    refused by the unique constraints and changes nothing."""

    __tablename__ = "lab_callbacks"
    __table_args__ = (
        UniqueConstraint("lab", "webhook_id", name="uq_lab_callbacks_webhook_id"),
        UniqueConstraint("lab", "booking_id", "sequence", name="uq_lab_callbacks_booking_sequence"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lab: Mapped[str] = mapped_column(String(63))
    webhook_id: Mapped[str] = mapped_column(String(200))
    booking_id: Mapped[str] = mapped_column(String(200))
    sequence: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    # what it did: "progress 40%", "the job's outcome (completed)", "none: the booking had ended (completed)" …
    effect: Mapped[str | None] = mapped_column(String(200), default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabRefusalRow(Base):
    """A callback refused with 401 (unsigned, wrongly signed, altered, stale), kept for audit; it changed nothing."""

    __tablename__ = "lab_refusals"
    __table_args__ = (Index("ix_lab_refusals_lab_id", "lab", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lab: Mapped[str] = mapped_column(String(63))
    # as the request claimed it: a forged copy may carry a real one
    webhook_id: Mapped[str | None] = mapped_column(String(200), default=None)
    # missing_header, bad_timestamp, stale, bad_signature, unknown_lab
    reason: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    client: Mapped[str | None] = mapped_column(String(200), default=None)
    body_sha256: Mapped[str] = mapped_column(String(64))
    body_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
