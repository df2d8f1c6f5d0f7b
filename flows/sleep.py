"""The `sleep` job: sleeps, reporting progress; the platform's own diagnostic of its overhead."""

from __future__ import annotations

import asyncio

from prefect import flow

from kiln.runtime import areport_progress, run_child_job
from kiln.schemas.job_types import JobType
from kiln.schemas.sleep import SleepInput


@flow(name="sleep", persist_result=True, result_serializer="json")
async def sleep(input: SleepInput) -> dict:
    seconds = input.seconds
    steps = min(10, max(1, int(seconds * 2))) if seconds > 0 else 0
    for step in range(1, steps + 1):
        await asyncio.sleep(seconds / steps)
        await areport_progress(100 * step / steps, f"slept {seconds * step / steps:.2f} of {seconds:g} s")
    child_outputs = [await run_child_job(sleep, input=SleepInput(seconds=seconds)) for _ in range(input.children)]
    if input.fail:
        raise RuntimeError(f"the sleep job was asked to fail after {seconds:g} s (fail=true)")
    return {"slept_seconds": seconds, "children": len(child_outputs)}


JOB_TYPE = JobType(
    name="sleep",
    description="Sleeps, reporting progress: the platform's own diagnostic for overhead and failure paths.",
    input_model=SleepInput,
    flow=sleep,
)
