"""kiln's Python SDK: a sync and an async client for the kiln API, handles on jobs, and LLM calls through kiln."""

from kiln.sdk.client import AsyncClient, AsyncJobHandle, AsyncJobs, Client, JobHandle, Jobs, JobStreamEvent, Page
from kiln.sdk.llm import AsyncLlm, ChatResult, Llm

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncJobs",
    "AsyncLlm",
    "ChatResult",
    "Client",
    "JobHandle",
    "JobStreamEvent",
    "Jobs",
    "Llm",
    "Page",
]
