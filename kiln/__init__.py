"""kiln: a unified compute-job platform for materials science, built on Prefect 3."""

from kiln.errors import JobFailed, KilnError
from kiln.schemas import JobStatus
from kiln.sdk import AsyncClient, Client, JobHandle

__all__ = ["AsyncClient", "Client", "JobFailed", "JobHandle", "JobStatus", "KilnError"]
