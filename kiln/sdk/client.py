"""kiln's Python SDK: Client and AsyncClient over the /api/v1 endpoints, and handles on the jobs they return."""

from __future__ import annotations

import builtins
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar
from urllib.parse import quote

import anyio
import httpx
from pydantic import BaseModel, Field, TypeAdapter

from kiln.errors import (
    ErrorBody,
    InvalidRequest,
    JobFailed,
    KilnError,
    NotFound,
    RateLimited,
    ServerError,
    error_for_status,
)
from kiln.schemas import FINAL_STATUSES, Job, JobPage, JobStatus, Resources
from kiln.schemas.batches import Batch, BatchResult
from kiln.schemas.files import StoredFile, name_problem
from kiln.schemas.jobs import EventKind
from kiln.sdk.llm import AsyncLlm, Llm
from kiln.sdk.sse import ServerSentEvent, SSEParser

T = TypeVar("T")
H = TypeVar("H", "JobHandle", "AsyncJobHandle")

# the server sends a keepalive every 15 s, so this long without a line means the stream dropped
STREAM_READ_TIMEOUT = 45.0
# the pause before each reconnect of a dropped event stream; their count is how many drops in a row are retried
RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
# how often wait() asks for the job when it cannot follow the event stream
FALLBACK_POLL_SECONDS = 1.0

_TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
_FINAL_VALUES = frozenset(status.value for status in FINAL_STATUSES)
_SUCCEEDED = frozenset({JobStatus.COMPLETED, JobStatus.CACHE_HIT})
_JOB_LIST = TypeAdapter(list[Job])
_BATCH_LIST = TypeAdapter(list[Batch])
_PROVIDER_LIST = TypeAdapter(list[dict[str, Any]])
_FILE_LIST = TypeAdapter(list[StoredFile])


class JobStreamEvent(BaseModel):
    """One of a job's events as its stream delivers it: a JobEvent without created_at, which the stream omits."""

    id: int = Field(description="Increasing event id; pass it as last_event_id to resume after it.")
    job_id: str = Field(description="The job the event belongs to.")
    event: EventKind = Field(description="What happened.")
    data: dict[str, Any] = Field(description="The event's payload, e.g. {'status': 'running'}.")

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended; a cache hit ends with a status event rather than a terminal one."""
        return self.event in _TERMINAL_EVENTS or (self.event == "status" and self.data.get("status") in _FINAL_VALUES)


# one request/response layer: both clients build their requests and read their answers here


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request to kiln and how its JSON answer becomes a model."""

    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    params: dict[str, Any] | None = None
    # multipart parts as httpx takes them: [(field, (filename, file object or bytes)), …]
    files: list[tuple[str, Any]] | None = None


def _http_options(base_url: str, api_key: str, timeout: float) -> dict[str, Any]:
    return {"base_url": base_url, "headers": {"Authorization": f"Bearer {api_key}"}, "timeout": timeout}


def _job_path(job_id: str, suffix: str = "") -> str:
    return f"/api/v1/jobs/{quote(job_id, safe='')}{suffix}"


def _job_file_path(job_id: str, name: str) -> str:
    return _job_path(job_id, f"/files/{quote(name, safe='')}")


def _unreachable(base_url: str, exc: httpx.TransportError) -> ServerError:
    return ServerError(f"could not reach kiln at {base_url}: {str(exc) or type(exc).__name__}")


def _error_from(response: httpx.Response) -> KilnError:
    """The kiln exception for a non-2xx response, carrying the server's message; the body must have been read."""
    try:
        body = ErrorBody.model_validate_json(response.content)
        message, details = body.detail, body.errors
    except ValueError:  # not kiln's answer: a proxy's error page, or no body at all
        request = response.request
        message, details = f"{response.status_code} {response.reason_phrase} from {request.method} {request.url}", None
    retry_after = int(response.headers.get("retry-after", "1"))
    return error_for_status(response.status_code, message, details=details, retry_after=retry_after)


def _answer(response: httpx.Response, call: _Call[T]) -> T:
    if response.is_error:
        raise _error_from(response)
    if response.status_code == 204:
        return call.parse(None)
    try:
        return call.parse(response.json())
    except ValueError as exc:  # pydantic's ValidationError and JSONDecodeError are both ValueErrors
        raise ServerError(f"kiln answered {call.method} {call.path} with a body this SDK cannot read: {exc}") from exc


class _JobCalls:
    """The /api/v1/jobs endpoints as calls; Jobs and AsyncJobs send them."""

    @staticmethod
    def create(
        type: str,
        input: dict[str, Any] | None,
        priority: int,
        resources: Resources | dict[str, Any] | None,
        compute_target: str | None,
        parent_id: str | None,
        project_id: str | None,
        model: str | None,
        input_fields: dict[str, Any],
        refresh: bool = False,
    ) -> _Call[Job]:
        repeated = set(input or {}) & set(input_fields)
        if repeated:
            raise TypeError(f"create() got {', '.join(sorted(repeated))} both in input and as a keyword argument")
        body = {
            "type": type,
            "input": {**(input or {}), **input_fields},
            "priority": priority,
            "resources": resources.model_dump(mode="json") if isinstance(resources, Resources) else resources,
            "compute_target": compute_target,
            "parent_id": parent_id,
            "project_id": project_id,
            # top-level: the server puts it into input.model unless the input names one itself
            "model": model,
            "refresh": refresh or None,
        }
        body = {key: value for key, value in body.items() if value is not None}
        return _Call("POST", "/api/v1/jobs", Job.model_validate, json=body)

    @staticmethod
    def get(job_id: str) -> _Call[Job]:
        return _Call("GET", _job_path(job_id), Job.model_validate)

    @staticmethod
    def list(
        type: str | None, status: JobStatus | str | None, parent_id: str | None, limit: int, cursor: str | None
    ) -> _Call[JobPage]:
        params = {
            "type": type,
            # str(JobStatus.RUNNING) is 'JobStatus.RUNNING': send the value
            "status": status.value if isinstance(status, JobStatus) else status,
            "parent_id": parent_id,
            "limit": limit,
            "cursor": cursor,
        }
        params = {key: value for key, value in params.items() if value is not None}
        return _Call("GET", "/api/v1/jobs", JobPage.model_validate, params=params)

    @staticmethod
    def cancel(job_id: str) -> _Call[Job]:
        return _Call("POST", _job_path(job_id, "/cancel"), Job.model_validate)

    @staticmethod
    def approve(job_id: str, reason: str | None = None) -> _Call[Job]:
        return _Call("POST", _job_path(job_id, "/approve"), Job.model_validate, json={"reason": reason})

    @staticmethod
    def reject(job_id: str, reason: str) -> _Call[Job]:
        return _Call("POST", _job_path(job_id, "/reject"), Job.model_validate, json={"reason": reason})

    @staticmethod
    def children(job_id: str) -> _Call[builtins.list[Job]]:
        return _Call("GET", _job_path(job_id, "/children"), _JOB_LIST.validate_python)

    @staticmethod
    def set_priority(job_id: str, priority: int) -> _Call[Job]:
        return _Call("PATCH", _job_path(job_id), Job.model_validate, json={"priority": priority})

    @staticmethod
    def set_replicas(job_id: str, replicas: int) -> _Call[Job]:
        return _Call("PATCH", _job_path(job_id), Job.model_validate, json={"replicas": replicas})

    @staticmethod
    def files(job_id: str) -> _Call[builtins.list[StoredFile]]:
        return _Call("GET", _job_path(job_id, "/files"), _FILE_LIST.validate_python)


class _FileCalls:
    """The /api/v1/files endpoints as calls; Files and AsyncFiles send them."""

    @staticmethod
    def upload(name: str, content: IO[bytes] | bytes) -> _Call[StoredFile]:
        return _Call("POST", "/api/v1/files", lambda body: _FILE_LIST.validate_python(body)[0],
                     files=[("files", (name, content))])  # fmt: skip

    @staticmethod
    def list() -> _Call[builtins.list[StoredFile]]:
        return _Call("GET", "/api/v1/files", _FILE_LIST.validate_python)


def _upload_source(
    source: str | os.PathLike | bytes, name: str | None
) -> tuple[str, AbstractContextManager[IO[bytes] | bytes]]:
    """The name an upload goes under and its content to open: a file's own name unless `name` is given."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if name is None:
            raise TypeError("upload(bytes) needs name=: the name a job's input will use for the file")
        return name, nullcontext(bytes(source))
    return name or Path(source).name, Path(source).open("rb")


class _Download:
    """One job file being saved: into a hidden file beside its target, renamed into place once whole."""

    def __init__(self, job_id: str, name: str, dest: str | os.PathLike):
        problem = name_problem(name)
        if problem:  # the server never names a file so; a file name given here must not leave `dest`
            raise InvalidRequest(f"name: {name!r}: {problem}")
        self.path = _job_file_path(job_id, name)
        dest = Path(dest)
        self.target = dest / name if dest.is_dir() else dest
        self._file = tempfile.NamedTemporaryFile(dir=self.target.parent, prefix=".kiln-download-", delete=False)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def __enter__(self) -> _Download:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        self._file.close()
        if exc_type is None:
            os.replace(self._file.name, self.target)
        else:
            os.unlink(self._file.name)


class _BatchCalls:
    """The HTTP calls behind the batch methods of Client and AsyncClient."""

    @staticmethod
    def submit(payloads: Iterable[dict[str, Any]], hardware: dict[str, Any] | None) -> _Call[BatchResult]:
        # a payload is an entry {job, compute_target, refresh} or just the job {type, input, ...}
        entries = [p if "job" in p else {"job": p} for p in payloads]
        body: dict[str, Any] = {"jobs": entries}
        if hardware is not None:
            body["hardware"] = hardware
        return _Call("POST", "/api/v1/jobs/submit-batch", BatchResult.model_validate, json=body)

    @staticmethod
    def get(batch_id: str) -> _Call[Batch]:
        return _Call("GET", f"/api/v1/batches/{quote(batch_id, safe='')}", Batch.model_validate)

    @staticmethod
    def list() -> _Call[builtins.list[Batch]]:
        return _Call("GET", "/api/v1/batches", _BATCH_LIST.validate_python)

    @staticmethod
    def delete(batch_id: str) -> _Call[None]:
        return _Call("DELETE", f"/api/v1/batches/{quote(batch_id, safe='')}", lambda _: None)


# the registered LLM providers, from which client.llm learns the protocol of each model
_LLM_PROVIDERS = _Call("GET", "/api/v1/llm/providers", _PROVIDER_LIST.validate_python)


def _chunks(payloads: Iterable[dict[str, Any]], chunk: int) -> Iterator[builtins.list[dict[str, Any]]]:
    batch: builtins.list[dict[str, Any]] = []
    for payload in payloads:
        batch.append(payload)
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch


class _Deadline:
    """When a sync wait() gives up."""

    def __init__(self, job_id: str, timeout: float):
        self.job_id, self.timeout, self.at = job_id, timeout, time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left; raises TimeoutError when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {self.job_id} did not finish within {self.timeout:g} s")
        return left


class _EventStream:
    """Following one job's events across reconnects; both clients drive it from their own I/O loop."""

    def __init__(self, base_url: str, job_id: str, last_event_id: int | None, deadline: _Deadline | None = None):
        self.base_url, self.job_id, self.last_event_id, self.deadline = base_url, job_id, last_event_id, deadline
        self.path = _job_path(job_id, "/events")
        self.ended = False
        self._drops = 0
        self._parser = SSEParser()

    def request_options(self, timeout: httpx.Timeout) -> dict[str, Any]:
        """The headers and timeout of the next connection."""
        # a partial event from a dropped connection is discarded; the server sends it again after last_event_id
        self._parser = SSEParser()
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        read = STREAM_READ_TIMEOUT if self.deadline is None else min(STREAM_READ_TIMEOUT, self.deadline.remaining())
        return {
            "headers": headers,
            "timeout": httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool),
        }

    def receive(self, line: str) -> JobStreamEvent | None:
        """The event this line completes, or None; sets `ended` after the job's last event."""
        if self.deadline is not None:
            self.deadline.remaining()
        sse = self._parser.feed(line)
        if sse is None:
            return None
        event = self._read(sse)
        self.last_event_id, self.ended, self._drops = event.id, event.is_terminal, 0
        return event

    def dropped(self, error: httpx.TransportError | None) -> float:
        """Seconds to pause before reconnecting after the stream ended early; raises once it keeps dropping."""
        if self.deadline is not None:
            self.deadline.remaining()
        if self._drops >= len(RECONNECT_DELAYS):
            why = _unreachable(self.base_url, error).message if error else "the stream closed before the job ended"
            raise ServerError(
                f"could not follow the events of job {self.job_id} ({len(RECONNECT_DELAYS)} reconnects failed): {why}"
            )
        delay = RECONNECT_DELAYS[self._drops]
        self._drops += 1
        return delay if self.deadline is None else min(delay, self.deadline.remaining())

    def _read(self, sse: ServerSentEvent) -> JobStreamEvent:
        try:
            data = json.loads(sse.data)
            return JobStreamEvent(id=sse.id, job_id=self.job_id, event=sse.event, data=data)
        except ValueError as exc:
            raise ServerError(f"kiln sent an event for job {self.job_id} this SDK cannot read: {exc}") from exc


@dataclass
class Page(Generic[H]):
    """One page of jobs.list(): the jobs, newest first, and the cursor of the next page (None on the last)."""

    jobs: builtins.list[H]
    next_cursor: str | None


# handles


class _HandleBase:
    """What both handles share: the Job they wrap, whose fields read as the handle's own."""

    data: Job

    def __getattr__(self, name: str) -> Any:
        # reached only for names the handle lacks, so its methods win over the job's fields
        data = self.__dict__.get("data")
        if data is not None and name in Job.model_fields:
            return getattr(data, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # set, it would hide the job's field for good: refresh() replaces `data`, not the attribute
        if name in Job.model_fields:
            raise AttributeError(f"{name} is the job's own; ask kiln to change it (set_priority, cancel)")
        super().__setattr__(name, value)

    def __dir__(self) -> builtins.list[str]:
        return sorted({*super().__dir__(), *Job.model_fields})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.data.id} {self.data.type} {self.data.status.value}>"

    def _outcome(self) -> Any:
        if self.data.status in _SUCCEEDED:
            return self.data.output
        raise JobFailed(self)


class JobHandle(_HandleBase):
    """A job on kiln: its fields (`job.id`, `job.status`, `job.output` …) and what can be done with it."""

    def __init__(self, data: Job, jobs: Jobs):
        self.data = data
        self._jobs = jobs

    def refresh(self) -> JobHandle:
        """Fetches the job again; returns this handle."""
        self.data = self._jobs.get(self.data.id).data
        return self

    def wait(self, timeout: float | None = None, poll: float | None = None) -> JobHandle:
        """Blocks until the job has ended and returns this handle, refreshed; it does not raise if the job failed.

        It follows the job's event stream, or asks for the job every `poll` seconds when given (and when the
        stream fails). Raises TimeoutError after `timeout` seconds; the deadline is checked as lines arrive,
        so it can be overrun by up to the server's keepalive interval (15 s).
        """
        if self.data.status.is_final:
            return self
        deadline = _Deadline(self.data.id, timeout) if timeout is not None else None
        if poll is None:
            try:
                for _ in self._jobs._follow(self.data.id, None, deadline):
                    pass
                return self.refresh()
            except ServerError:
                poll = FALLBACK_POLL_SECONDS
        while True:
            self.refresh()
            if self.data.status.is_final:
                return self
            time.sleep(poll if deadline is None else min(poll, deadline.remaining()))

    @property
    def result(self) -> Any:
        """The job's output, waiting (no timeout) until it ends; raises JobFailed if it failed or was cancelled."""
        if not self.data.status.is_final:
            self.wait()
        return self._outcome()

    def events(self, last_event_id: int | None = None) -> Iterator[JobStreamEvent]:
        """The job's events, from the first (or after `last_event_id`) until its last."""
        return self._jobs.events(self.data.id, last_event_id)

    def cancel(self) -> JobHandle:
        """Cancels the job and its children; returns this handle, refreshed."""
        self.data = self._jobs.cancel(self.data.id).data
        return self

    def set_priority(self, priority: int) -> JobHandle:
        """Changes a pending job's priority; returns this handle, refreshed."""
        self.data = self._jobs.set_priority(self.data.id, priority).data
        return self

    def children(self) -> builtins.list[JobHandle]:
        """The job's child jobs, oldest first."""
        return self._jobs.children(self.data.id)

    def files(self) -> builtins.list[StoredFile]:
        """The files the job produced, by name."""
        return self._jobs.files(self.data.id)

    def download(self, name: str, dest: str | os.PathLike = ".") -> Path:
        """Saves the job's file `name` into the folder `dest` (or as `dest`, when that is no folder); the path."""
        return self._jobs.download(self.data.id, name, dest)


class AsyncJobHandle(_HandleBase):
    """A job on kiln, for AsyncClient: its fields (`job.id`, `job.status` …) and awaitable methods."""

    def __init__(self, data: Job, jobs: AsyncJobs):
        self.data = data
        self._jobs = jobs

    async def refresh(self) -> AsyncJobHandle:
        """Fetches the job again; returns this handle."""
        self.data = (await self._jobs.get(self.data.id)).data
        return self

    async def wait(self, timeout: float | None = None, poll: float | None = None) -> AsyncJobHandle:
        """Waits until the job has ended and returns this handle, refreshed; it does not raise if the job failed.

        It follows the job's event stream, or asks for the job every `poll` seconds when given (and when the
        stream fails). Raises TimeoutError after `timeout` seconds.
        """
        if self.data.status.is_final:
            return self
        try:
            with anyio.fail_after(timeout):
                await self._until_final(poll)
        except TimeoutError:
            if timeout is None:
                raise
            raise TimeoutError(f"job {self.data.id} did not finish within {timeout:g} s") from None
        return self

    async def _until_final(self, poll: float | None) -> None:
        if poll is None:
            try:
                async with aclosing(self._jobs.events(self.data.id)) as events:
                    async for _ in events:
                        pass
                await self.refresh()
                return
            except ServerError:
                poll = FALLBACK_POLL_SECONDS
        while True:
            await self.refresh()
            if self.data.status.is_final:
                return
            await anyio.sleep(poll)

    async def result(self) -> Any:
        """The job's output, waiting (without a timeout) until it ends; raises JobFailed if it failed or was cancelled.

        A method rather than the sync handle's property, since it may have to wait: `await job.result()`.
        """
        if not self.data.status.is_final:
            await self.wait()
        return self._outcome()

    def events(self, last_event_id: int | None = None) -> AsyncIterator[JobStreamEvent]:
        """The job's events, from the first (or after `last_event_id`) until its last: `async for`."""
        return self._jobs.events(self.data.id, last_event_id)

    async def cancel(self) -> AsyncJobHandle:
        """Cancels the job and its children; returns this handle, refreshed."""
        self.data = (await self._jobs.cancel(self.data.id)).data
        return self

    async def set_priority(self, priority: int) -> AsyncJobHandle:
        """Changes a pending job's priority; returns this handle, refreshed."""
        self.data = (await self._jobs.set_priority(self.data.id, priority)).data
        return self

    async def children(self) -> builtins.list[AsyncJobHandle]:
        """The job's child jobs, oldest first."""
        return await self._jobs.children(self.data.id)

    async def files(self) -> builtins.list[StoredFile]:
        """The files the job produced, by name."""
        return await self._jobs.files(self.data.id)

    async def download(self, name: str, dest: str | os.PathLike = ".") -> Path:
        """Saves the job's file `name` into the folder `dest` (or as `dest`, when that is no folder); the path."""
        return await self._jobs.download(self.data.id, name, dest)


# client.jobs


class Jobs:
    """`client.jobs`: submit, find and control jobs."""

    def __init__(self, client: Client):
        self._client = client

    def create(
        self,
        type: str,
        input: dict[str, Any] | None = None,
        priority: int = 0,
        resources: Resources | dict[str, Any] | None = None,
        compute_target: str | None = None,
        parent_id: str | None = None,
        project_id: str | None = None,
        model: str | None = None,
        *,
        refresh: bool = False,
        **input_fields: Any,
    ) -> JobHandle:
        """Submits a job; keyword arguments beyond these join its input: `create(type="sleep", seconds=1)`."""
        call = _JobCalls.create(
            type, input, priority, resources, compute_target, parent_id, project_id, model, input_fields, refresh
        )
        return JobHandle(self._client._send(call), self)

    def get(self, id: str) -> JobHandle:
        """The job with this id."""
        return JobHandle(self._client._send(_JobCalls.get(id)), self)

    def list(
        self,
        type: str | None = None,
        status: JobStatus | str | None = None,
        parent_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[JobHandle]:
        """One page of the project's jobs, newest first; pass `next_cursor` as `cursor` for the next."""
        page = self._client._send(_JobCalls.list(type, status, parent_id, limit, cursor))
        return Page([JobHandle(job, self) for job in page.jobs], page.next_cursor)

    def iter(
        self,
        type: str | None = None,
        status: JobStatus | str | None = None,
        parent_id: str | None = None,
        page_size: int = 50,
    ) -> Iterator[JobHandle]:
        """All the project's jobs that match, newest first, fetching page after page as it goes."""
        cursor = None
        while True:
            page = self.list(type, status, parent_id, page_size, cursor)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, id: str) -> JobHandle:
        """Cancels the job and its children."""
        return JobHandle(self._client._send(_JobCalls.cancel(id)), self)

    def approve(self, id: str, reason: str | None = None) -> JobHandle:
        """Approves a lab_booking job that waits for approval: it books its slot now (Conflict when it does not
        wait for one)."""
        return JobHandle(self._client._send(_JobCalls.approve(id, reason)), self)

    def reject(self, id: str, reason: str) -> JobHandle:
        """Rejects a lab_booking job that waits for approval: it ends cancelled with the reason."""
        return JobHandle(self._client._send(_JobCalls.reject(id, reason)), self)

    def children(self, id: str) -> builtins.list[JobHandle]:
        """The job's child jobs, oldest first."""
        return [JobHandle(job, self) for job in self._client._send(_JobCalls.children(id))]

    def set_priority(self, id: str, priority: int) -> JobHandle:
        """Changes a pending job's priority."""
        return JobHandle(self._client._send(_JobCalls.set_priority(id, priority)), self)

    def files(self, id: str) -> builtins.list[StoredFile]:
        """The files the job produced, by name."""
        return self._client._send(_JobCalls.files(id))

    def download(self, id: str, name: str, dest: str | os.PathLike = ".") -> Path:
        """Saves the job's file `name` into the folder `dest` (or as `dest`, when that is no folder); the path."""
        download = _Download(id, name, dest)
        try:
            with download, self._client._http.stream("GET", download.path) as response:
                if response.is_error:
                    response.read()
                    raise _error_from(response)
                for chunk in response.iter_bytes():
                    download.write(chunk)
        except httpx.TransportError as exc:
            raise _unreachable(self._client.base_url, exc) from exc
        return download.target

    def events(self, id: str, last_event_id: int | None = None) -> Iterator[JobStreamEvent]:
        """The job's events, from the first (or after `last_event_id`) until its last, reconnecting if dropped."""
        return self._follow(id, last_event_id)

    def _follow(
        self, id: str, last_event_id: int | None = None, deadline: _Deadline | None = None
    ) -> Iterator[JobStreamEvent]:
        http = self._client._http
        stream = _EventStream(self._client.base_url, id, last_event_id, deadline)
        while True:
            error = None
            try:
                with http.stream("GET", stream.path, **stream.request_options(http.timeout)) as response:
                    if response.status_code == 204:
                        return  # the job had ended before last_event_id: nothing more will come
                    if response.is_error:
                        response.read()
                        raise _error_from(response)
                    for line in response.iter_lines():
                        event = stream.receive(line)
                        if event is not None:
                            yield event
                            if stream.ended:
                                return
            except httpx.TransportError as exc:
                error = exc
            time.sleep(stream.dropped(error))


class AsyncJobs:
    """`client.jobs` of AsyncClient: submit, find and control jobs."""

    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(
        self,
        type: str,
        input: dict[str, Any] | None = None,
        priority: int = 0,
        resources: Resources | dict[str, Any] | None = None,
        compute_target: str | None = None,
        parent_id: str | None = None,
        project_id: str | None = None,
        model: str | None = None,
        *,
        refresh: bool = False,
        **input_fields: Any,
    ) -> AsyncJobHandle:
        """Submits a job; keyword arguments beyond these join its input: `create(type="sleep", seconds=1)`."""
        call = _JobCalls.create(
            type, input, priority, resources, compute_target, parent_id, project_id, model, input_fields, refresh
        )
        return AsyncJobHandle(await self._client._send(call), self)

    async def get(self, id: str) -> AsyncJobHandle:
        """The job with this id."""
        return AsyncJobHandle(await self._client._send(_JobCalls.get(id)), self)

    async def list(
        self,
        type: str | None = None,
        status: JobStatus | str | None = None,
        parent_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[AsyncJobHandle]:
        """One page of the project's jobs, newest first; pass `next_cursor` as `cursor` for the next."""
        page = await self._client._send(_JobCalls.list(type, status, parent_id, limit, cursor))
        return Page([AsyncJobHandle(job, self) for job in page.jobs], page.next_cursor)

    async def iter(
        self,
        type: str | None = None,
        status: JobStatus | str | None = None,
        parent_id: str | None = None,
        page_size: int = 50,
    ) -> AsyncIterator[AsyncJobHandle]:
        """All the project's jobs that match, newest first, fetching page after page as it goes: `async for`."""
        cursor = None
        while True:
            page = await self.list(type, status, parent_id, page_size, cursor)
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, id: str) -> AsyncJobHandle:
        """Cancels the job and its children."""
        return AsyncJobHandle(await self._client._send(_JobCalls.cancel(id)), self)

    async def approve(self, id: str, reason: str | None = None) -> AsyncJobHandle:
        """Approves a lab_booking job that waits for approval: it books its slot now."""
        return AsyncJobHandle(await self._client._send(_JobCalls.approve(id, reason)), self)

    async def reject(self, id: str, reason: str) -> AsyncJobHandle:
        """Rejects a lab_booking job that waits for approval: it ends cancelled with the reason."""
        return AsyncJobHandle(await self._client._send(_JobCalls.reject(id, reason)), self)

    async def children(self, id: str) -> builtins.list[AsyncJobHandle]:
        """The job's child jobs, oldest first."""
        return [AsyncJobHandle(job, self) for job in await self._client._send(_JobCalls.children(id))]

    async def set_priority(self, id: str, priority: int) -> AsyncJobHandle:
        """Changes a pending job's priority."""
        return AsyncJobHandle(await self._client._send(_JobCalls.set_priority(id, priority)), self)

    async def files(self, id: str) -> builtins.list[StoredFile]:
        """The files the job produced, by name."""
        return await self._client._send(_JobCalls.files(id))

    async def download(self, id: str, name: str, dest: str | os.PathLike = ".") -> Path:
        """Saves the job's file `name` into the folder `dest` (or as `dest`, when that is no folder); the path."""
        download = _Download(id, name, dest)
        try:
            with download:
                async with self._client._http.stream("GET", download.path) as response:
                    if response.is_error:
                        await response.aread()
                        raise _error_from(response)
                    async for chunk in response.aiter_bytes():
                        download.write(chunk)
        except httpx.TransportError as exc:
            raise _unreachable(self._client.base_url, exc) from exc
        return download.target

    async def events(self, id: str, last_event_id: int | None = None) -> AsyncIterator[JobStreamEvent]:
        """The job's events, from the first (or after `last_event_id`) until its last, reconnecting if dropped."""
        http = self._client._http
        stream = _EventStream(self._client.base_url, id, last_event_id)
        while True:
            error = None
            try:
                async with http.stream("GET", stream.path, **stream.request_options(http.timeout)) as response:
                    if response.status_code == 204:
                        return  # the job had ended before last_event_id: nothing more will come
                    if response.is_error:
                        await response.aread()
                        raise _error_from(response)
                    async for line in response.aiter_lines():
                        event = stream.receive(line)
                        if event is not None:
                            yield event
                            if stream.ended:
                                return
            except httpx.TransportError as exc:
                error = exc
            await anyio.sleep(stream.dropped(error))


# client.files


class Files:
    """`client.files`: files uploaded to the project, which a job's input names (by name or sha256)."""

    def __init__(self, client: Client):
        self._client = client

    def upload(self, source: str | os.PathLike | bytes, name: str | None = None) -> StoredFile:
        """Uploads a file (a path, or bytes with `name`) under its own name or `name`; an upload of a name the
        project has replaces it."""
        name, opened = _upload_source(source, name)
        with opened as content:
            return self._client._send(_FileCalls.upload(name, content))

    def list(self) -> builtins.list[StoredFile]:
        """The project's uploads, by name."""
        return self._client._send(_FileCalls.list())


class AsyncFiles:
    """`client.files` of AsyncClient: files uploaded to the project, which a job's input names."""

    def __init__(self, client: AsyncClient):
        self._client = client

    async def upload(self, source: str | os.PathLike | bytes, name: str | None = None) -> StoredFile:
        """Uploads a file (a path, or bytes with `name`) under its own name or `name`; an upload of a name the
        project has replaces it."""
        name, opened = _upload_source(source, name)
        with opened as content:
            return await self._client._send(_FileCalls.upload(name, content))

    async def list(self) -> builtins.list[StoredFile]:
        """The project's uploads, by name."""
        return await self._client._send(_FileCalls.list())


# client.mcp

MCP_HOST = "mcp_host"


def mcp_input(name: str, command: Sequence[str] | None, url: str | None, plugin: str | None,
              transport: str | None, replicas: int, options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """An mcp_host job's input: the server is exactly one of a command, a url or a plugin."""
    given = {key: value for key, value in (("command", command), ("url", url), ("plugin", plugin)) if value}
    if len(given) != 1:
        raise ValueError("give the server as exactly one of command=[…], url=… or plugin=…")
    server = {key: list(value) if key == "command" else value for key, value in given.items()}
    return {"name": name, "server": server, "replicas": replicas, **({"transport": transport} if transport else {}),
            **options}  # fmt: skip


class Mcp:
    """`client.mcp`: MCP deployments (mcp_host jobs), each served at one kiln URL any MCP client can use with the
    kiln key as its bearer: `client.mcp.deploy("tools", command=["python", "server.py"])`, then
    `client.mcp.url("tools")`."""

    def __init__(self, client: Client):
        self._client = client

    def deploy(self, name: str, *, command: Sequence[str] | None = None, url: str | None = None,
               plugin: str | None = None, transport: str | None = None, replicas: int = 1,
               **options: Any) -> JobHandle:  # fmt: skip
        """Deploys a server: `command` (stdio by default), a remote `url`, or a registered `plugin`; `env`, `health`
        and `restart` go in `options`. The job runs until it is stopped."""
        return self._client.jobs.create(MCP_HOST, mcp_input(name, command, url, plugin, transport, replicas, options))

    def url(self, name: str) -> str:
        """The deployment's MCP endpoint (streamable HTTP) on the kiln API."""
        return f"{self._client.base_url.rstrip('/')}/api/v1/mcp/{quote(name, safe='')}/mcp"

    def list(self) -> builtins.list[JobHandle]:
        """The project's deployments that are not over (pending, queued or serving), newest first."""
        return [job for job in self._client.jobs.iter(type=MCP_HOST) if not job.status.is_final]

    def get(self, name: str) -> JobHandle:
        """The deployment called `name` that is not over; NotFound when there is none."""
        for job in self.list():
            if job.input.get("name") == name:
                return job
        raise NotFound(f"name: no MCP deployment {name!r} in this project is pending or serving")

    def scale(self, name: str, replicas: int) -> JobHandle:
        """Changes its replicas live: new ones start, extra ones drain."""
        jobs = self._client.jobs
        return JobHandle(self._client._send(_JobCalls.set_replicas(self.get(name).id, replicas)), jobs)

    def stop(self, name: str) -> JobHandle:
        """Cancels the deployment: its replicas stop, its URL answers 404."""
        return self._client.jobs.cancel(self.get(name).id)


# client.labs


class _LabCalls:
    @staticmethod
    def list() -> _Call[builtins.list[dict]]:
        return _Call("GET", "/api/v1/labs", list)

    @staticmethod
    def slots(lab: str, resource: str | None, start: Any, end: Any, limit: int) -> _Call[dict]:
        params = {"resource": resource, "from": _iso(start), "to": _iso(end), "limit": limit}
        return _Call("GET", f"/api/v1/labs/{quote(lab, safe='')}/slots", dict,
                     params={k: v for k, v in params.items() if v is not None})  # fmt: skip

    @staticmethod
    def callbacks(lab: str, limit: int) -> _Call[dict]:
        return _Call("GET", f"/api/v1/labs/{quote(lab, safe='')}/callbacks", dict, params={"limit": limit})


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


class Labs:
    """`client.labs`: the registered labs lab_booking jobs book on, their free slots, and their callbacks."""

    def __init__(self, client: Client):
        self._client = client

    def list(self) -> builtins.list[dict]:
        """The registered labs: name, base_url, resources (never their key or secrets)."""
        return self._client._send(_LabCalls.list())

    def slots(self, lab: str, resource: str | None = None, start: Any = None, end: Any = None,
              limit: int = 100) -> dict:  # fmt: skip
        """The lab's free slots between `start` and `end` (datetimes with a zone, or ISO 8601), as it answers them."""
        return self._client._send(_LabCalls.slots(lab, resource, start, end, limit))

    def callbacks(self, lab: str, limit: int = 100) -> dict:
        """The lab's newest callbacks: `taken` (with what each did) and `refused` (401, the audit)."""
        return self._client._send(_LabCalls.callbacks(lab, limit))


# the clients


class Client:
    """kiln's client: `Client(url, key).jobs.create(type="sleep", seconds=1).result`; close it, or use `with`.

    `client.jobs` submits and follows jobs (and fetches the files they produced); `client.files` uploads the files
    a job's input names; `client.llm` calls LLMs through kiln (kiln.sdk.llm). `transport`
    replaces httpx's network transport, e.g. with an httpx.MockTransport in tests; client.llm's calls go through
    the official SDKs' own HTTP clients instead.
    """

    def __init__(
        self, base_url: str, api_key: str, timeout: float = 30, *, transport: httpx.BaseTransport | None = None
    ):
        self.base_url = base_url
        self._http = httpx.Client(transport=transport, **_http_options(base_url, api_key, timeout))
        self.jobs = Jobs(self)
        self.files = Files(self)
        self.mcp = Mcp(self)
        self.labs = Labs(self)
        self.llm = Llm(base_url, api_key, lambda: self._send(_LLM_PROVIDERS))

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(call.method, call.path, json=call.json, params=call.params, files=call.files)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _answer(response, call)

    def submit_batch(self, payloads: Iterable[dict[str, Any]], hardware: dict[str, Any] | None = None) -> BatchResult:
        """Submits up to 1000 jobs in one request; one line per job in the result, in order."""
        return self._send(_BatchCalls.submit(payloads, hardware))

    def submit_batches(
        self, payloads: Iterable[dict[str, Any]], chunk: int = 1000, hardware: dict[str, Any] | None = None
    ) -> builtins.list[BatchResult]:
        """Submits any number of jobs as batches of `chunk`, waiting out the rate limit between them."""
        results = []
        for part in _chunks(payloads, chunk):
            while True:
                try:
                    results.append(self.submit_batch(part, hardware))
                    break
                except RateLimited as exc:
                    time.sleep(exc.retry_after)
        return results

    def batch(self, batch_id: str) -> Batch:
        """The batch with its jobs counted by status."""
        return self._send(_BatchCalls.get(batch_id))

    def batches(self) -> builtins.list[Batch]:
        return self._send(_BatchCalls.list())

    def batch_counts(self, batch_id: str) -> Iterator[dict[str, int]]:
        """The batch's counts each time they change, until every job has ended (GET …/events)."""
        parser = SSEParser()
        with self._http.stream("GET", f"/api/v1/batches/{quote(batch_id, safe='')}/events",
                               timeout=httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT)) as response:
            if response.is_error:
                response.read()
                raise _error_from(response)
            for line in response.iter_lines():
                sse = parser.feed(line)
                if sse is not None and sse.event == "counts":
                    yield json.loads(sse.data)

    def delete_batch(self, batch_id: str) -> None:
        """Cancels the batch's unfinished jobs, then deletes it."""
        self._send(_BatchCalls.delete(batch_id))

    def close(self) -> None:
        self.llm.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """kiln's asyncio client: `await (await AsyncClient(url, key).jobs.create(type="sleep", seconds=1)).result()`.

    Close it with `await client.aclose()`, or use `async with`. `client.llm` calls LLMs through kiln
    (kiln.sdk.llm). `transport` replaces httpx's network transport, e.g. with an httpx.MockTransport in tests;
    client.llm's calls go through the official SDKs' own HTTP clients instead.
    """

    def __init__(
        self, base_url: str, api_key: str, timeout: float = 30, *, transport: httpx.AsyncBaseTransport | None = None
    ):
        self.base_url = base_url
        self._http = httpx.AsyncClient(transport=transport, **_http_options(base_url, api_key, timeout))
        self.jobs = AsyncJobs(self)
        self.files = AsyncFiles(self)
        self.llm = AsyncLlm(base_url, api_key, lambda: self._send(_LLM_PROVIDERS))

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(call.method, call.path, json=call.json, params=call.params,
                                                files=call.files)  # fmt: skip
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _answer(response, call)

    async def submit_batch(
        self, payloads: Iterable[dict[str, Any]], hardware: dict[str, Any] | None = None
    ) -> BatchResult:
        """Submits up to 1000 jobs in one request; one line per job in the result, in order."""
        return await self._send(_BatchCalls.submit(payloads, hardware))

    async def submit_batches(
        self, payloads: Iterable[dict[str, Any]], chunk: int = 1000, hardware: dict[str, Any] | None = None
    ) -> builtins.list[BatchResult]:
        """Submits any number of jobs as batches of `chunk`, waiting out the rate limit between them."""
        results = []
        for part in _chunks(payloads, chunk):
            while True:
                try:
                    results.append(await self.submit_batch(part, hardware))
                    break
                except RateLimited as exc:
                    await anyio.sleep(exc.retry_after)
        return results

    async def batch(self, batch_id: str) -> Batch:
        return await self._send(_BatchCalls.get(batch_id))

    async def batches(self) -> builtins.list[Batch]:
        return await self._send(_BatchCalls.list())

    async def delete_batch(self, batch_id: str) -> None:
        await self._send(_BatchCalls.delete(batch_id))

    async def aclose(self) -> None:
        await self.llm.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
