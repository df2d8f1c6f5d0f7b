"""The step of a `batch_run` job as a Prefect task: read the batch from its file or folder on the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger

from kiln.tasks.batch_run.source import read_source
from kiln.tasks.executor import executor


@executor(name="read source", task_run_name="read {path}")
def read_batch(
    path: Path, job: dict[str, Any], compute_target: str | None, refresh: bool
) -> tuple[list[dict[str, Any]], dict[int, str], list[str]]:
    """The batch's entries, the unreadable ones by index with why, and where each came from."""
    entries, unreadable, origins = read_source(path, job, compute_target, refresh)
    get_run_logger().info(
        "read %d entries from %s, %d of them unreadable", len(entries), path, len(unreadable)
    )
    return entries, unreadable, origins
