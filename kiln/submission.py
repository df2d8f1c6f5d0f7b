"""Reading submitted jobs: validated against their type, hashed for the cache, priced for the quota, rate-limited.

One path serves POST /api/v1/jobs (one job; its error is the response), POST
/api/v1/jobs/submit-batch and a batch_run job's batch (many; an entry's error is that entry's line).
`state` is whatever holds the settings, the job index and the dispatcher: the API's app state, or
the event relay.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections import defaultdict, deque
from dataclasses import replace
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, ValidationError

from kiln.errors import (
    InputInvalid,
    InvalidRequest,
    KilnError,
    NotFound,
    RateLimited,
)
from kiln.files import FileStore
from kiln.registry import job_type as registered_type
from kiln.schemas import JobCreate, JobType, Resources
from kiln.schemas.batches import BatchEntry, BatchEntryResult, BatchResult, Hardware
from kiln.schemas.job_types import input_field, with_input_field
from kiln.schemas.strict import integral_floats
from kiln.schemas.statuses import JobStatus
from kiln.store import batches as store_batches
from kiln.store.batches import NewJob

# names a batch entry's compute_target may take besides a registered cluster
KILN_CHOOSES = ("managed", "local")
UNLIMITED = 10**9


def field_errors(exc: ValidationError, prefix: str) -> str:
    """'input.seconds: Input should be greater than or equal to 0; …' from a pydantic error."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


@lru_cache(maxsize=1)
def code_version() -> str:
    """kiln's version: part of every cache key, so a new release never reuses an old release's results."""
    try:
        return version("kiln")
    except PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


def _normal(value: Any) -> Any:
    """JSON with floats written one way: 12 significant digits, so 1.0, 1.00000000000001 and 1e0 agree."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def input_hash(job_type: str, job_input: BaseModel, versions: dict[str, Any] | None = None) -> str:
    """sha256 of the type, the canonical input, the versions of what else decides the result, and kiln's version.

    The canonical input is the validated input with its defaults filled in (`canonical()` where the
    input model has one: ml_predict writes every structure encoding as one pymatgen dict), keys sorted
    and floats normalised; `versions` are the job type's (a model's version).
    """
    # looked up on the class: pydantic's __getattr__ for a field a model lacks was a third of accepting a batch
    canonical = job_input.canonical() if hasattr(type(job_input), "canonical") else job_input.model_dump(mode="json")
    text = json.dumps({"type": job_type, "input": _normal(canonical), "versions": versions or {},
                       "code": code_version()}, sort_keys=True, separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


async def read_job(
    state, project_id: str, body: JobCreate, *, prefix: str = "", validate_in_thread: bool = True
) -> NewJob:
    """The job checked as the API takes it, or a KilnError whose message starts with `prefix` and the field."""
    try:
        return await _read_job(state, project_id, body, validate_in_thread)
    except KilnError as exc:
        if prefix:
            exc.message = f"{prefix}{exc.message}"
            exc.args = (exc.message,)
        raise


async def _read_job(state, project_id: str, body: JobCreate, in_thread: bool) -> NewJob:
    if body.project_id is not None and body.project_id not in (project_id, await state.store.project_name(project_id)):
        raise NotFound(f"project_id: project {body.project_id} not found")
    job_type = registered_type(body.type, offered=set(state.dispatcher.deployments))
    raw_input = dict(body.input)
    if body.model is not None:
        raw_input.setdefault("model", body.model)

    def validate_and_pin() -> BaseModel:
        job_input = read_input(job_type, raw_input)
        if job_type.input_files:
            # before the hash: the cache key covers the uploads' contents, not only their names
            field = job_type.input_files
            refs = input_field(job_input, field)
            if refs is not None and not (job_type.input_job and input_field(job_input, job_type.input_job)):
                pinned = FileStore.of(state.settings).pin_uploads(project_id, refs, f"input.{field}")
                job_input = with_input_field(job_input, field, pinned)
        return job_input

    def hash_input(job_input: BaseModel) -> str:
        return input_hash(body.type, job_input, job_type.versions_of(job_input))

    async def run(function, *args):
        # parsing thousands of structures takes seconds: keep it off the event loop that serves SSE
        return await asyncio.to_thread(function, *args) if in_thread else function(*args)

    try:
        job_input = await run(validate_and_pin)
    except ValidationError as exc:
        raise InputInvalid(field_errors(exc, "input"), details=json.loads(exc.json())) from exc
    if job_type.input_job and (earlier := input_field(job_input, job_type.input_job)) is not None:
        job_input = await _pin_job_files(state, project_id, job_type, job_input, earlier)
    digest = await run(hash_input, job_input)
    resources = job_type.resources_for(body.resources)
    cacheable = job_type.cacheable_for(job_input)
    await job_type.check_input(job_input, state.settings)
    held_usd = await job_type.usd_hold_for(job_input)
    await check_compute_target(job_type, body.compute_target, resources)
    if body.parent_id is not None:
        try:
            await state.store.get_job(body.parent_id, project_id)
        except NotFound:
            raise InvalidRequest(f"parent_id: no job {body.parent_id} in this project") from None
    return NewJob(
        type=body.type,
        input=job_input.model_dump(mode="json"),
        resources=resources.model_dump(mode="json"),
        # a job that is not cacheable never answers, nor is answered by, another job
        input_hash=digest if cacheable else None,
        core_hours=job_type.core_hours(job_input, resources),
        priority=body.priority,
        compute_target=body.compute_target,
        parent_id=body.parent_id,
        refresh=body.refresh or not cacheable,
        held_usd=held_usd,
        persistent=job_type.persistent,
    )


async def _pin_job_files(state, project_id: str, job_type: JobType, job_input: BaseModel, job_id: str) -> BaseModel:
    """The input with the earlier job's files pinned into its `input_files` field; InputInvalid naming the field
    when the project has no such job or it has not completed."""
    field = f"input.{job_type.input_job}"
    try:
        row = await state.store.get_job(job_id, project_id)
    except NotFound:
        raise InputInvalid(f"{field}: no job {job_id!r} in this project") from None
    if row.status not in (JobStatus.COMPLETED.value, JobStatus.CACHE_HIT.value):
        raise InputInvalid(f"{field}: job {job_id} is {row.status}; a job's files are a dataset once it has completed")
    owner = await store_batches.files_owner(state.store, job_id, project_id)
    pinned = await asyncio.to_thread(FileStore.of(state.settings).pin_job_files, owner, field)
    return with_input_field(job_input, job_type.input_files, pinned)


def read_input(job_type: JobType, raw_input: dict[str, Any]) -> BaseModel:
    """The input validated strictly, as the OpenAPI document describes it: JSON types are not coerced (0 is no
    boolean, "1" no number; 2.0 is an integer, kiln.schemas.strict). `read` where the input model has one: it
    keeps what it parsed for canonical()."""
    text = json.dumps(integral_floats(raw_input))
    reader = getattr(job_type.input_model, "read", None)
    return reader(text) if reader else job_type.input_model.model_validate_json(text, strict=True)


async def check_compute_target(job_type: JobType, compute_target: str | None, resources: Resources) -> None:
    """Whether `compute_target` suits the type and names a registered cluster that can meet the job's resources."""
    if compute_target in (None, "local"):
        if job_type.needs_cluster:
            raise InvalidRequest(
                f"compute_target: a {job_type.name} job runs on a registered HPC cluster; name one "
                "(GET /api/v1/clusters lists them, `kiln clusters add` registers one)"
            )
        return
    if not job_type.runs_on_clusters:
        raise InvalidRequest(
            f"compute_target: {job_type.name} jobs run only on kiln's own workers ('local'), "
            f"not on the cluster {compute_target!r}"
        )
    from kiln.blocks.cluster import load_cluster, registered_clusters

    cluster = await load_cluster(compute_target)
    if cluster is None:
        names = ", ".join(sorted(await registered_clusters())) or "none"
        raise InvalidRequest(
            f"compute_target: no cluster named {compute_target!r} is registered (registered: {names}); "
            "`kiln clusters add` registers one"
        )
    unmet = cluster.unmet(resources, compute_target)
    if unmet:
        raise InvalidRequest(unmet)


async def accept_batch(
    state,
    project_id: str,
    entries: list[dict[str, Any]],
    hardware: Hardware | None = None,
    *,
    unreadable: dict[int, str] | None = None,
    parent_id: str | None = None,
    batch_id: str | None = None,
    key_prefix: str | None = None,
) -> BatchResult:
    """Reads each entry on its own and stores the good ones as one batch; a bad entry fails alone.

    `unreadable` holds entries already known bad (a line of a file that is not JSON), by index. A
    batch_run job's batch has the job as `parent_id` of the batch and of every job in it.
    """
    errors: dict[int, str] = dict(unreadable or {})
    accepted: list[tuple[int, NewJob]] = []
    slots = _TargetSlots(state)
    for index, raw in enumerate(entries):
        if index in errors:
            continue
        prefix = f"jobs.{index}."
        try:
            entry = BatchEntry.model_validate(raw)
        except ValidationError as exc:
            errors[index] = field_errors(exc, f"jobs.{index}")
            continue
        target = entry.compute_target if entry.compute_target is not None else entry.job.compute_target
        job = _with_hardware(entry.job, hardware)
        job = job.model_copy(update={"compute_target": None if target in KILN_CHOOSES else target,
                                     "refresh": job.refresh or entry.refresh})  # fmt: skip
        try:
            new_job = await read_job(state, project_id, job, prefix=prefix + "job.", validate_in_thread=False)
            if new_job.compute_target is not None:
                await slots.take(new_job.compute_target, prefix)
        except KilnError as exc:
            errors[index] = exc.message
            continue
        accepted.append((index, new_job if new_job.parent_id else replace(new_job, parent_id=parent_id)))

    batch_id, stored = await store_batches.add_jobs(
        state.store, project_id, [job for _, job in accepted], batch_size=len(entries), batch_id=batch_id,
        hardware=hardware.model_dump(mode="json") if hardware else None, parent_id=parent_id, key_prefix=key_prefix,
    )  # fmt: skip
    if any(item.status is JobStatus.PENDING for item in stored):
        state.dispatcher.wake()
    lines: list[BatchEntryResult | None] = [None] * len(entries)
    for (index, _), item in zip(accepted, stored):
        hit = item.status is JobStatus.CACHE_HIT
        lines[index] = BatchEntryResult(job_id=item.job_id, status="cache_hit" if hit else "submitted",
                                        state=item.status.value)  # fmt: skip
    for index, error in errors.items():
        lines[index] = BatchEntryResult(status="failed", error=error)
    hits = sum(1 for item in stored if item.status is JobStatus.CACHE_HIT)
    return BatchResult(batch_id=batch_id, total=len(entries), submitted=len(stored) - hits, cache_hits=hits,
                       failed=len(errors), jobs=lines)  # fmt: skip


def _with_hardware(job: JobCreate, hardware: Hardware | None) -> JobCreate:
    if hardware is None:
        return job
    resources = (job.resources or Resources()).model_copy()
    if hardware.cpu is not None:
        resources.cpu_count = hardware.cpu
    if hardware.memory_gb is not None:
        resources.min_ram_gb = hardware.memory_gb
    return job.model_copy(update={"resources": resources})


class _TargetSlots:
    """The free slots of each named compute target, counted through one batch."""

    def __init__(self, state):
        self.state = state
        self.free: dict[str, int] = {}
        self.at_start: dict[str, int] = {}

    async def take(self, target: str, prefix: str) -> None:
        """One slot for this entry, or InvalidRequest naming the target and its free slots."""
        if target not in self.free:
            from kiln.blocks.cluster import load_cluster

            cluster = await load_cluster(target)  # there: read_job checked the name
            unfinished = await store_batches.unfinished_on_target(self.state.store, target)
            self.free[target] = UNLIMITED if cluster.slots is None else cluster.slots - unfinished
            self.at_start[target] = self.free[target]
        if self.free[target] <= 0:
            raise InvalidRequest(
                f"{prefix}compute_target: {target!r} has no free slot left for this entry "
                f"(free slots when the batch arrived: {max(self.at_start[target], 0)})"
            )
        self.free[target] -= 1


class RateLimiter:
    """Requests of one kind per API key in any 60 s, or tokens of them; the one over the limit gets a 429 with
    Retry-After."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], deque[tuple[float, int]]] = defaultdict(deque)

    def take(self, key: str, kind: str, per_minute: int, amount: int = 1) -> None:
        """Counts `amount` (0 checks only: tokens are counted once a call has used them) against the limit."""
        now = time.monotonic()
        seen = self._seen[(key, kind)]
        while seen and now - seen[0][0] >= self.WINDOW:
            seen.popleft()
        used = sum(n for _, n in seen)
        if used >= per_minute or used + amount > per_minute:
            # until enough of the window has passed for this one to fit
            freed, until = 0, seen[-1][0] if seen else now
            for at, n in seen:
                freed += n
                if used - freed < per_minute and used - freed + amount <= per_minute:
                    until = at
                    break
            retry_after = max(1, math.ceil(self.WINDOW - (now - until)))
            raise RateLimited(
                f"{kind}: at most {per_minute} per minute per API key; try again in {retry_after} s",
                retry_after=retry_after,
            )
        if amount:
            seen.append((now, amount))

    def spend(self, key: str, kind: str, amount: int) -> None:
        """Counts what was used without checking: the tokens of a call that was let through."""
        if amount:
            self._seen[(key, kind)].append((time.monotonic(), amount))
