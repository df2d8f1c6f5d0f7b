"""The `plugin_exec` job: a registered plugin (a container image) run once in the worker's sandbox, with enforced limits.

Its output says how the run ended; a run that did not complete ends the job failed with that reason ("out of
memory (limit 256 MB)", "exited with code 3: <stderr's end>") and keeps the same output, stdout and stderr
included. The files it wrote to /out are the job's files (GET /api/v1/jobs/{id}/files).
"""

from __future__ import annotations

from prefect import flow
from prefect.states import Failed

from kiln.errors import KilnError
from kiln.schemas.job_types import JobType
from kiln.schemas.plugin_exec import PluginExecInput


@flow(name="plugin_exec", persist_result=True, result_serializer="json")
async def plugin_exec(input: PluginExecInput):
    from kiln.tasks.plugin.execute import run_plugin

    try:
        output = await run_plugin(input)
    except KilnError as exc:  # refused before it started (a tier or limit this worker cannot give): say only why
        return Failed(message=exc.message)
    if output["ending"] != "completed":
        return Failed(message=output["reason"], data=output)
    return output


JOB_TYPE = JobType(
    name="plugin_exec",
    description="A registered plugin (a container image, `kiln plugins add`) run in a sandbox: runc with cgroup "
    "limits, or bubblewrap; its input, uploaded files and limits in, its output JSON, stdout, stderr and /out's "
    "files back. Stdout lines stream as `progress` events.",
    input_model=PluginExecInput,
    flow=plugin_exec,
    check="kiln.blocks.plugin:check_run",
    # a container may read the clock, a random source or the files it is given: every run runs
    cacheable=False,
    input_files="files",
    tags=("plugin",),
)
