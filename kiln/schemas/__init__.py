"""The pydantic contract shared by the kiln API and the SDK."""

from kiln.schemas.job_types import JobType
from kiln.schemas.jobs import Job, JobCreate, JobEvent, JobPage, JobPatch, JobTypeInfo
from kiln.schemas.resources import Resources
from kiln.schemas.statuses import FINAL_STATUSES, IN_FLIGHT_STATUSES, JobStatus

__all__ = [
    "FINAL_STATUSES",
    "IN_FLIGHT_STATUSES",
    "Job",
    "JobCreate",
    "JobEvent",
    "JobPage",
    "JobPatch",
    "JobStatus",
    "JobType",
    "JobTypeInfo",
    "Resources",
]
