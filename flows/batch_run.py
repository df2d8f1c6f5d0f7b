"""The `batch_run` job: reads a batch from a JSONL file or a directory of structures, submitted as its children.

Run from a deployment with a cron schedule in prefect.yaml, it is a scheduled batch run. The flow
reads on the worker, where the files are; its result is the batch's entries, and the kiln API takes
them as one batch whose jobs are this job's children (the job's output is that batch's answer).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from kiln.schemas.batch_run import BatchRunInput
from kiln.schemas.job_types import JobType
from kiln.settings import get_settings
from kiln.tasks.batch_run.executors import read_batch
from kiln.tasks.batch_run.source import SourceError, resolve_source


@flow(name="batch_run", persist_result=True, result_serializer="json")
async def batch_run(input: BatchRunInput) -> dict[str, Any]:
    settings = get_settings()
    path = resolve_source(input.source, settings.home_dir)
    entries, unreadable, origins = read_batch(path, input.job.model_dump(mode="json"), input.compute_target,
                                              input.refresh)  # fmt: skip
    if len(entries) > settings.batch_max_jobs:
        raise SourceError(
            f"source: {path} holds {len(entries)} entries; a batch takes at most {settings.batch_max_jobs} "
            "(KILN_BATCH_MAX_JOBS); split it over several batch runs"
        )
    get_run_logger().info("submitting %d entries from %s as this job's batch", len(entries), path)
    return {
        "source": str(path),
        "entries": entries,
        # JSON keys are text
        "unreadable": {str(index): why for index, why in unreadable.items()},
        "origins": origins,
        "hardware": input.hardware.model_dump(mode="json") if input.hardware else None,
    }


JOB_TYPE = JobType(
    name="batch_run",
    description="Reads a batch from a JSONL file or a directory of structure files and submits it; the "
    "batch's jobs are this job's children. With a cron schedule in prefect.yaml, a scheduled batch run.",
    input_model=BatchRunInput,
    flow=batch_run,
    cacheable=False,
)
