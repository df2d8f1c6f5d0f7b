"""The batch contract: POST /api/v1/jobs/submit-batch and the /api/v1/batches views."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_serializer

from kiln.schemas.jobs import JobCreate
from kiln.schemas.strict import StrictRequest


class Hardware(StrictRequest):

    cpu: int | None = Field(None, ge=1, description="CPU cores each job of the batch needs (its cpu_count).")
    memory_gb: float | None = Field(None, gt=0, description="Memory each job needs, in GB (its min_ram_gb).")
    filesystems: list[str] = Field(default_factory=list, description="Filesystems the jobs need mounted.")


class BatchEntry(StrictRequest):

    job: JobCreate = Field(description="The job, as for POST /api/v1/jobs.")
    compute_target: str | None = Field(
        None,
        description="Where to run: null or 'managed' (kiln chooses), 'local' (the embedded Dask cluster), "
        "or a registered cluster's name. Overrides job.compute_target.",
    )
    refresh: bool = Field(False, description="Run again even when a finished job with the same input exists.")


class BatchCreate(StrictRequest):

    # the entries are read one by one, so one bad entry fails alone
    jobs: list[dict[str, Any]] = Field(description="The jobs, each {job, compute_target, refresh}.")
    hardware: Hardware | None = Field(None, description="Hardware applied to every job of the batch.")


class BatchEntryResult(BaseModel):
    job_id: str | None = Field(None, description="The job's id; null when the entry failed.")
    status: Literal["submitted", "cache_hit", "failed"] = Field(description="What became of the entry.")
    state: str | None = Field(None, description="The job's status right after submission.")
    error: str | None = Field(None, description="Why the entry failed, naming its index and field.")


class BatchResult(BaseModel):
    batch_id: str
    total: int
    submitted: int
    cache_hits: int
    failed: int
    jobs: list[BatchEntryResult] = Field(description="One line per entry, in request order.")


class Batch(BaseModel):
    id: str
    size: int = Field(description="Entries sent, the failed ones included.")
    submitted: int = Field(description="Entries that became jobs (cache hits included).")
    hardware: Hardware | None = None
    parent_id: str | None = Field(None, description="The job that submitted it, for a scheduled batch run.")
    created_at: datetime
    counts: dict[str, int] | None = Field(
        None,
        description="Jobs per status; `failed` includes entries refused at submission, so the counts add up to "
        "`size`. Only in GET /api/v1/batches/{id}.",
    )

    @field_serializer("created_at")
    def _iso(self, value: datetime) -> str:
        return value.isoformat()
