"""kiln's Python SDK: a sync and an async client for the kiln API, and handles on jobs."""

from kiln.sdk.client import AsyncClient, AsyncJobHandle, AsyncJobs, Client, JobHandle, Jobs, JobStreamEvent, Page

__all__ = ["AsyncClient", "AsyncJobHandle", "AsyncJobs", "Client", "JobHandle", "JobStreamEvent", "Jobs", "Page"]
