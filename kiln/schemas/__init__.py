"""The pydantic contract shared by the kiln API and the SDK."""

from kiln.schemas.job_types import JOB_TYPES, JobType, available_job_types
from kiln.schemas.jobs import Job, JobCreate, JobEvent, JobPage, JobPatch, JobTypeInfo
from kiln.schemas.resources import Resources
from kiln.schemas.statuses import FINAL_STATUSES, IN_FLIGHT_STATUSES, JobStatus

__all__ = [
    "FINAL_STATUSES",
    "IN_FLIGHT_STATUSES",
    "JOB_TYPES",
    "Job",
    "JobCreate",
    "JobEvent",
    "JobPage",
    "JobPatch",
    "JobStatus",
    "JobType",
    "JobTypeInfo",
    "Resources",
    "available_job_types",
]
