"""The job statuses, in one enum, with the groups the rest of kiln asks about."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    # a split job whose tasks all finished, while their outputs are merged
    MERGING = "merging"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CACHE_HIT = "cache_hit"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


# the Prefect state (type Running) of a flow run whose job is merging; kiln.dispatch.runs maps it
MERGING_STATE_NAME = "Merging"

FINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.CACHE_HIT})
# released to Prefect and holding (or about to hold) a worker slot
IN_FLIGHT_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.MERGING})
CANCELLABLE_STATUSES = frozenset({JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.MERGING})
