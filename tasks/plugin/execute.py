"""The plugin_exec job's executor: the registered plugin run once in this worker's sandbox, its files kept."""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path
from typing import Any

from kiln.blocks.plugin import plugin_for_run
from kiln.errors import InvalidRequest
from kiln.files import FileStore
from kiln.runtime import PROGRESS_EVENT, TextEvents, current_job
from kiln.schemas.plugin_exec import PluginExecInput
from kiln.settings import get_settings
from kiln.tasks.executor import executor
from kiln.tasks.plugin.images import open_image
from kiln.tasks.plugin.sandbox import PREFIX, PluginRun
from kiln.tasks.plugin.tiers import TierCheck, detect_tier

# the folder a kiln worker claimed for its runs (kiln.tasks.plugin.claim_work_dir), handed to its Dask processes
WORK_DIR_ENV = "KILN_SANDBOX_WORK_DIR"
# a progress event's message is the end of the lines it joins
PROGRESS_MESSAGE_CHARS = 4000


@cache
def offered_tiers() -> TierCheck:
    """What this process's sandbox offers; it does not change while the process lives."""
    return detect_tier()


def work_dir() -> Path:
    """Where this process runs plugins: its kiln worker's folder; a folder of its own under a Dask cluster kiln did
    not start."""
    return Path(os.environ.get(WORK_DIR_ENV) or get_settings().sandbox_root / f"dask-{os.getpid()}")


def choose_tier(asked: str | None, offered: TierCheck) -> str:
    """The tier a run gets: the one it (or its plugin) asks for, else the best here; InvalidRequest when this worker
    does not offer what it asks."""
    if offered.tier is None:
        raise InvalidRequest(f"tier: this worker offers no sandbox ({'; '.join(offered.notes)})")
    if asked is None:
        return offered.tier
    if asked not in offered.tiers:
        why = "; ".join(n for n in offered.notes if n.startswith(f"tier {asked}"))
        raise InvalidRequest(f"tier: the run needs sandbox tier {asked}, and this worker offers only "
                             f"{', '.join(offered.tiers)} ({why})")  # fmt: skip
    return asked


def file_name(path: str) -> str:
    """A job file's name for a file the plugin wrote at /out/<path>: one segment, folders joined by '__'."""
    return path.replace("/", "__")


@executor(name="plugin-run")
async def run_plugin(job_input: PluginExecInput) -> dict[str, Any]:
    """Runs the plugin once and stores what it left in /out as the job's files; the output says how it ended
    (`ending`, `reason`) whether or not it completed."""
    plugin = await plugin_for_run(job_input.plugin)
    job_id, _, flow_run_id = current_job()
    tier = choose_tier(job_input.tier or plugin.tier, offered_tiers())
    limits = plugin.limits_for(job_input.limits)
    store = FileStore.of(get_settings())
    run_id = flow_run_id or "local"
    folder = work_dir()
    results = folder / f"{PREFIX}{run_id}.results"
    lines = TextEvents(PROGRESS_EVENT, lambda text: {"percent": None, "message": text[-PROGRESS_MESSAGE_CHARS:]},
                       joiner="\n")  # fmt: skip
    run = PluginRun(open_image(Path(plugin.image_path)), run_id=run_id, work_dir=folder, results_dir=results,
                    limits=limits, command=[*plugin.entrypoint, *(plugin.args if job_input.args is None else
                                                                 job_input.args)],
                    input=job_input.input, files={f.name: store.upload_path(f) for f in job_input.files},
                    env={**plugin.env, **job_input.env}, on_stdout=lines.add, tier=tier)  # fmt: skip
    try:
        outcome = await run.run()
        lines.flush()
        stored = store.store_job_files(job_id, {file_name(f): results / f for f in outcome.files}) if job_id else []
    finally:
        shutil.rmtree(results, ignore_errors=True)
    return {
        "plugin": job_input.plugin, "image_digest": plugin.image_digest, "ending": outcome.ending.value,
        "reason": outcome.reason, "exit_code": outcome.exit_code, "output": outcome.output,
        "files": [{**s.model_dump(), "path": f"/out/{f}"} for s, f in zip(stored, outcome.files)],
        "stdout": outcome.stdout, "stderr": outcome.stderr, "seconds": round(outcome.seconds, 3),
        "tier": outcome.tier, "limits": limits.model_dump(), "enforcement": outcome.enforcement,
    }  # fmt: skip
