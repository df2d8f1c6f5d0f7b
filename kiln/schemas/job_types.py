"""The job-type contract: one object declares everything kiln needs to know of a type.

A type is declared once, beside its flow (`JOB_TYPE = JobType(...)` in flows/<type>.py, or in a lab's
own package), and registered under the `kiln.job_types` entry-point group; kiln.registry collects them.
The API's request union, `GET /api/v1/job-types`, the cache, the quota, the dispatcher's deployments and
the worker's warm imports all read from it.
"""

from __future__ import annotations

import importlib
import inspect
import importlib.util
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel

from kiln.schemas.resources import Resources

# what a job is estimated to cost when its input gives no better estimate: one hour on each of its cores
DEFAULT_ESTIMATE_HOURS = 1.0


def _has_field(model: type[BaseModel], path: str) -> bool:
    """Whether `path` (dotted: `source.files`) names a field of the model, through nested models."""
    import typing

    first, _, rest = path.partition(".")
    info = model.model_fields.get(first)
    if info is None:
        return False
    if not rest:
        return True
    nested = [arg for arg in (typing.get_args(info.annotation) or (info.annotation,))
              if isinstance(arg, type) and issubclass(arg, BaseModel)]  # fmt: skip
    return any(_has_field(candidate, rest) for candidate in nested)


def input_field(job_input: BaseModel, path: str) -> Any:
    """The value at a dotted path of a job's input (None when a model on the way is absent)."""
    value: Any = job_input
    for name in path.split("."):
        if value is None:
            return None
        value = getattr(value, name)
    return value


def with_input_field(job_input: BaseModel, path: str, value: Any) -> BaseModel:
    """A copy of the input with the dotted path set to `value`."""
    first, _, rest = path.partition(".")
    if not rest:
        return job_input.model_copy(update={first: value})
    return job_input.model_copy(update={first: with_input_field(getattr(job_input, first), rest, value)})


@dataclass(frozen=True)
class JobType:
    """A job type: its name and description, its input model, its flow and how kiln treats its jobs."""

    name: str
    description: str
    # strict pydantic (extra="forbid", a description on every field); the API validates against it
    input_model: type[BaseModel]
    # the Prefect @flow that runs a job of this type; it takes the input's fields as its parameters
    flow: Any
    # libraries the flow needs beyond kiln's own; a type whose libraries are missing is not offered
    requires: tuple[str, ...] = ()
    # "module:function" called (or, when async, awaited) with (input, settings) at submission; raises a
    # KilnError when the input names something this installation does not have (a model, a cluster, a plugin)
    check: str | None = None
    # the flow takes the job's `compute_target` and `resources` as parameters and may run on a
    # registered HPC cluster; other types run only on kiln's own workers
    runs_on_clusters: bool = False
    # the job must name a registered cluster as its compute_target
    needs_cluster: bool = False
    # a finished job answers later ones with the same input; not for a job whose result depends on
    # more than its input (a batch run reads files that change between runs). An input model may also say
    # so per input, with a `cacheable` property (an LLM call samples above temperature 0)
    cacheable: bool = True
    # "module:function" called with the input: the versions of what decides a result besides the input (a
    # model's weights), as a dict; part of the cache key, so new weights never reuse old results
    versions: str | None = None
    # "module:function" awaited with the input at submission: the USD the project's LLM budget holds for
    # the job until it ends and is charged its output's `cost_usd` (an LLM call's most possible cost);
    # raises a KilnError when the input cannot be priced
    usd_hold: str | None = None
    # the input field (a list of kiln.schemas.files.InputFile) that names files uploaded with POST /api/v1/files;
    # submission pins each item to the project's upload it names (kiln.files.FileStore.pin_uploads), so an
    # unknown one is a 422 naming input.<field>.<index>, and the flow gets StoredFiles (kiln.files.upload_path)
    input_files: str | None = None
    # the input field (a job id, dotted like `source.job`) naming an earlier job of the project whose files the job
    # reads: submission pins that job's files (kiln.files.FileStore.pin_job_files) into the `input_files` field, so
    # the cache key covers their contents; an unknown or unfinished job is a 422 naming the field
    input_job: str | None = None
    # the flow runs tasks of its own on the worker's Dask cluster (dataset_process's partitions): while it waits
    # for them its Dask thread is handed back (distributed.secede), so they can run in its own process too
    fans_out: bool = False
    # the job serves until it is cancelled (an MCP deployment): it takes one of a worker's service slots, never
    # a batch slot, reports its health as its status_reason while it runs, and runs again whenever its run
    # crashes (a worker killed, kiln restarted); it fails only when its flow says so
    persistent: bool = False
    # "module:function" awaited with (store, job row, reason) in the kiln API when a job of this type is cancelled,
    # before its run is stopped: it tells the outside world (a lab_booking job's lab gets DELETE /bookings/{id}) and
    # returns words added to the job's cancel reason (whether that worked), or None
    on_cancel: str | None = None
    # runs again this many times after a crash (its worker or process died), beyond the job's max_retry_count: for a
    # flow that is safe to run again whatever it had done (a lab booking books once per job by its Idempotency-Key
    # and takes its outcome from the job index); failures by the flow itself are not run again for it
    crash_reruns: int = 0
    # what a job of this type needs when its submission does not say
    default_resources: Resources = field(default_factory=Resources)
    # tags of the type's deployment besides `kiln` and `type:<name>`, shown in the Prefect UI
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for role in ("input_files", "input_job"):
            path = getattr(self, role)
            if path is not None and not _has_field(self.input_model, path):
                raise ValueError(f"job type {self.name!r}: {role} names {path!r}, which is no field of "
                                 f"{self.input_model.__name__}")  # fmt: skip
        if self.input_job is not None and self.input_files is None:
            raise ValueError(f"job type {self.name!r}: input_job needs input_files, where the job's files are pinned")

    @property
    def module(self) -> str:
        return self.flow.fn.__module__

    @property
    def entrypoint(self) -> str:
        """The flow as `module:function`, what the type's deployment and the worker load."""
        return f"{self.module}:{self.flow.fn.__name__}"

    @property
    def deployment_tags(self) -> tuple[str, ...]:
        return ("kiln", f"type:{self.name}", *self.tags)

    @cached_property
    def available(self) -> bool:
        """Whether the libraries the flow needs are installed here: looked for once a process. The search on disk,
        made for every entry of a batch, was 78 % of the API's time accepting 1000 jobs (bench/batch_submit.py,
        py-spy); a library installed later needs the process started again, as the type's deployment does."""
        return all(importlib.util.find_spec(name) is not None for name in self.requires)

    async def check_input(self, job_input: BaseModel, settings) -> None:
        if self.check:
            module, function = self.check.split(":")
            checked = getattr(importlib.import_module(module), function)(job_input, settings)
            if inspect.isawaitable(checked):
                await checked

    async def cancelled(self, store, job, reason: str) -> str | None:
        """What `on_cancel` says it did outside kiln for the cancelled job, to add to its reason."""
        if not self.on_cancel:
            return None
        module, function = self.on_cancel.split(":")
        return await getattr(importlib.import_module(module), function)(store, job, reason)

    def versions_of(self, job_input: BaseModel) -> dict[str, Any]:
        if not self.versions:
            return {}
        module, function = self.versions.split(":")
        return getattr(importlib.import_module(module), function)(job_input)

    async def usd_hold_for(self, job_input: BaseModel) -> float:
        if not self.usd_hold:
            return 0.0
        module, function = self.usd_hold.split(":")
        return await getattr(importlib.import_module(module), function)(job_input)

    def cacheable_for(self, job_input: BaseModel) -> bool:
        """Whether this job may answer, and be answered by, another with the same input."""
        return self.cacheable and getattr(job_input, "cacheable", True)

    def resources_for(self, requested: Resources | None) -> Resources:
        """The job's resources: what it asked for, over the type's defaults."""
        if requested is None:
            return self.default_resources.model_copy()
        return Resources.model_validate(
            {**self.default_resources.model_dump(exclude_unset=True), **requested.model_dump(exclude_unset=True)}
        )

    def core_hours(self, job_input: BaseModel, resources: Resources) -> float:
        """A conservative estimate of what the job will cost: the input's own estimate, or an hour, per core."""
        cores = max(resources.cpu_count, 1)
        estimate = getattr(job_input, "estimated_hours", None)
        return (estimate() if estimate else DEFAULT_ESTIMATE_HOURS) * cores
