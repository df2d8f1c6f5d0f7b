"""kiln's Python SDK: a sync and an async client for the kiln API, handles on jobs, and LLM calls through kiln."""

from kiln.sdk.client import (
    AsyncClient,
    AsyncFiles,
    AsyncJobHandle,
    AsyncJobs,
    Client,
    Files,
    JobHandle,
    Jobs,
    JobStreamEvent,
    Mcp,
    Page,
)
from kiln.sdk.llm import AsyncLlm, ChatResult, Llm

__all__ = [
    "AsyncClient",
    "AsyncFiles",
    "AsyncJobHandle",
    "AsyncJobs",
    "AsyncLlm",
    "ChatResult",
    "Client",
    "Files",
    "JobHandle",
    "JobStreamEvent",
    "Jobs",
    "Llm",
    "Mcp",
    "Page",
]
