"""The SDK's HTTP handling against an httpx.MockTransport playing kiln's side: no server, no network."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest

import kiln
import kiln.sdk.client
from kiln.errors import (
    Conflict,
    InputInvalid,
    InvalidRequest,
    JobFailed,
    KilnError,
    NotFound,
    ServerError,
    Unauthorized,
)
from kiln.sdk import AsyncClient, Client, JobHandle, JobStreamEvent
from kiln.sdk.llm import chat_arguments, drop_in_url, protocol_of
from kiln.sdk.sse import SSEParser

URL = "http://kiln.test"


def job_json(job_id: str = "j1", status: str = "pending", **fields) -> dict:
    return {
        "id": job_id,
        "type": "sleep",
        "project_id": "p1",
        "status": status,
        "priority": 0,
        "input": {"seconds": 1},
        "resources": {},
        "created_at": "2025-01-01T00:00:00+00:00",
        **fields,
    }


def sse(*events: tuple[int, str, dict]) -> str:
    return "".join(f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n" for i, kind, data in events)


def client(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client(URL, "kiln_key", transport=httpx.MockTransport(handler))


def async_client(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncClient:
    return AsyncClient(URL, "kiln_key", transport=httpx.MockTransport(handler))


@pytest.fixture(autouse=True)
def no_reconnect_pauses(monkeypatch):
    monkeypatch.setattr(kiln.sdk.client, "RECONNECT_DELAYS", (0, 0, 0))
    monkeypatch.setattr(kiln.sdk.client, "FALLBACK_POLL_SECONDS", 0.01)


# the public surface


def test_public_api_is_exactly_this():
    assert kiln.__all__ == ["AsyncClient", "Client", "JobFailed", "JobHandle", "JobStatus", "KilnError"]
    assert kiln.sdk.__all__ == [
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


def test_importing_kiln_does_not_import_prefect_nor_the_llm_sdks():
    code = "import kiln, sys; assert not {'prefect', 'openai', 'anthropic'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


# errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, InvalidRequest), (401, Unauthorized), (404, NotFound), (409, Conflict), (422, InputInvalid)],
)
def test_an_error_status_raises_its_kiln_exception_with_the_servers_message(status, cls):
    def handler(request):
        return httpx.Response(status, json={"detail": "what went wrong", "errors": [{"loc": ["x"]}]})

    with pytest.raises(cls) as caught:
        client(handler).jobs.get("j1")
    assert caught.value.message == "what went wrong"
    assert str(caught.value) == "what went wrong"
    assert caught.value.details == [{"loc": ["x"]}]
    assert caught.value.status_code == status


def test_404_names_the_job():
    def handler(request):
        return httpx.Response(404, json={"detail": "job nope not found"})

    with pytest.raises(NotFound, match="job nope not found"):
        client(handler).jobs.get("nope")


def test_5xx_is_a_server_error_with_its_status():
    with pytest.raises(ServerError) as caught:
        client(lambda request: httpx.Response(503, json={"detail": "prefect is down"})).jobs.get("j1")
    assert caught.value.message == "prefect is down"
    assert caught.value.status_code == 503


def test_an_unmapped_status_without_a_kiln_body_still_says_what_happened():
    with pytest.raises(KilnError) as caught:
        client(lambda request: httpx.Response(418, text="teapot")).jobs.get("j1")
    assert type(caught.value) is KilnError
    assert caught.value.status_code == 418
    assert caught.value.message == f"418 I'm a teapot from GET {URL}/api/v1/jobs/j1"


def test_an_unreachable_server_is_a_server_error_naming_the_url():
    def handler(request):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(ServerError, match=f"could not reach kiln at {URL}: connection refused"):
        client(handler).jobs.get("j1")


def test_a_body_the_sdk_cannot_read_is_a_server_error():
    with pytest.raises(ServerError, match="cannot read"):
        client(lambda request: httpx.Response(200, json={"id": "j1"})).jobs.get("j1")


async def test_the_async_client_maps_errors_the_same_way():
    async with async_client(lambda request: httpx.Response(422, json={"detail": "input.seconds: too big"})) as c:
        with pytest.raises(InputInvalid, match="input.seconds: too big"):
            await c.jobs.create(type="sleep", seconds=10**9)


# requests


def test_create_sends_extra_keywords_as_input_and_model_top_level():
    sent = []

    def handler(request):
        sent.append(request)
        return httpx.Response(202, json=job_json())

    job = client(handler).jobs.create(type="sleep", input={"children": 2}, seconds=1, model="m3gnet", priority=5)
    assert isinstance(job, JobHandle)
    (request,) = sent
    assert (request.method, request.url.path) == ("POST", "/api/v1/jobs")
    assert request.headers["authorization"] == "Bearer kiln_key"
    assert json.loads(request.content) == {
        "type": "sleep",
        "input": {"children": 2, "seconds": 1},
        "priority": 5,
        "model": "m3gnet",
    }


def test_create_refuses_an_input_field_given_twice():
    with pytest.raises(TypeError, match="seconds both in input and as a keyword"):
        client(lambda request: httpx.Response(202, json=job_json())).jobs.create(
            type="sleep", input={"seconds": 1}, seconds=2
        )


def test_the_job_endpoints_and_what_they_return():
    seen = []

    def handler(request):
        seen.append((request.method, request.url.path, request.content))
        if request.url.path.endswith("/children"):
            return httpx.Response(200, json=[job_json("c1"), job_json("c2")])
        if request.url.path.endswith("/cancel"):
            return httpx.Response(200, json=job_json(status="cancelled"))
        return httpx.Response(200, json=job_json(priority=json.loads(request.content or "{}").get("priority", 0)))

    jobs = client(handler).jobs
    assert jobs.get("j1").id == "j1"
    assert jobs.cancel("j1").status is kiln.JobStatus.CANCELLED
    assert [c.id for c in jobs.children("j1")] == ["c1", "c2"]
    assert jobs.set_priority("j1", 7).priority == 7
    assert seen == [
        ("GET", "/api/v1/jobs/j1", b""),
        ("POST", "/api/v1/jobs/j1/cancel", b""),
        ("GET", "/api/v1/jobs/j1/children", b""),
        ("PATCH", "/api/v1/jobs/j1", b'{"priority":7}'),
    ]


# files

STORED = {"name": "data.csv", "sha256": "a" * 64, "size": 3}


def test_upload_sends_one_multipart_part_named_after_the_file(tmp_path):
    seen = []

    def handler(request):
        media_type = request.headers.get("content-type", "").split(";")[0]
        seen.append((request.method, request.url.path, media_type, request.read()))
        return httpx.Response(201 if request.method == "POST" else 200, json=[STORED])

    (tmp_path / "data.csv").write_bytes(b"1,2")
    files = client(handler).files
    assert files.upload(tmp_path / "data.csv").sha256 == "a" * 64
    files.upload(b"3,4", name="other.csv")
    assert [f.name for f in files.list()] == ["data.csv"]
    (method, path, media_type, body), (_, _, _, second), _ = seen
    assert (method, path, media_type) == ("POST", "/api/v1/files", "multipart/form-data")
    assert b'name="files"; filename="data.csv"' in body and b"\r\n1,2\r\n" in body
    assert b'filename="other.csv"' in second and b"\r\n3,4\r\n" in second
    with pytest.raises(TypeError, match="name="):
        files.upload(b"no name")


def test_download_saves_into_a_folder_or_as_a_path_and_leaves_nothing_when_refused(tmp_path):
    def handler(request):
        if request.url.path == "/api/v1/jobs/j1/files":
            return httpx.Response(200, json=[STORED])
        if request.url.path == "/api/v1/jobs/j1/files/data.csv":
            return httpx.Response(200, content=b"1,2")
        return httpx.Response(404, json={"detail": "job j1 has no file 'gone.csv'", "errors": []})

    jobs = client(handler).jobs
    assert [f.name for f in jobs.files("j1")] == ["data.csv"]
    assert jobs.download("j1", "data.csv", tmp_path) == tmp_path / "data.csv"
    assert jobs.download("j1", "data.csv", tmp_path / "renamed.csv").read_bytes() == b"1,2"
    with pytest.raises(NotFound, match="no file 'gone.csv'"):
        jobs.download("j1", "gone.csv", tmp_path)
    # a name that would leave the folder is refused before any request
    with pytest.raises(InvalidRequest, match="one path segment"):
        jobs.download("j1", "../escape", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "renamed.csv"]


async def test_async_files_and_download(tmp_path):
    def handler(request):
        if request.url.path == "/api/v1/files":
            return httpx.Response(201, json=[STORED])
        return httpx.Response(200, content=b"1,2")

    async with async_client(handler) as c:
        assert (await c.files.upload(b"1,2", name="data.csv")).name == "data.csv"
        assert (await c.jobs.download("j1", "data.csv", tmp_path)).read_bytes() == b"1,2"


def test_list_pages_and_iter_follows_the_cursors():
    pages = {None: (["a", "b"], "2"), "2": (["c", "d"], "4"), "4": (["e"], None)}
    params = []

    def handler(request):
        params.append(dict(request.url.params))
        ids, next_cursor = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"jobs": [job_json(i) for i in ids], "next_cursor": next_cursor})

    jobs = client(handler).jobs
    page = jobs.list(status=kiln.JobStatus.RUNNING, limit=2)
    assert [j.id for j in page.jobs] == ["a", "b"]
    assert page.next_cursor == "2"
    assert params == [{"status": "running", "limit": "2"}]

    assert [j.id for j in jobs.iter(type="sleep", page_size=2)] == ["a", "b", "c", "d", "e"]
    assert params[1:] == [
        {"type": "sleep", "limit": "2"},
        {"type": "sleep", "limit": "2", "cursor": "2"},
        {"type": "sleep", "limit": "2", "cursor": "4"},
    ]


async def test_async_iter_follows_the_cursors():
    pages = {None: (["a"], "1"), "1": (["b"], None)}

    def handler(request):
        ids, next_cursor = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"jobs": [job_json(i) for i in ids], "next_cursor": next_cursor})

    async with async_client(handler) as c:
        assert [j.id async for j in c.jobs.iter()] == ["a", "b"]


# the handle


def test_the_handle_reads_as_the_job_and_keeps_the_model_at_data():
    job = client(lambda request: httpx.Response(200, json=job_json(status_reason="waiting"))).jobs.get("j1")
    assert (job.id, job.status, job.status_reason, job.output) == ("j1", kiln.JobStatus.PENDING, "waiting", None)
    assert job.data.id == "j1"
    assert repr(job) == "<JobHandle j1 sleep pending>"
    assert "status_reason" in dir(job)
    with pytest.raises(AttributeError):
        job.nonsense
    with pytest.raises(AttributeError, match="set_priority"):
        job.priority = 3


# the event stream


def test_sse_parser_joins_data_lines_and_skips_comments_and_retry():
    parser = SSEParser()
    lines = ["retry: 1000", "", ": keepalive", "id: 7", "event: progress", "data: {", 'data:"a": 1}', ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert len(events) == 1
    assert (events[0].id, events[0].event, events[0].data) == ("7", "progress", '{\n"a": 1}')


def test_events_parse_the_stream_and_stop_after_the_terminal_event():
    body = (
        "retry: 1000\n\n: keepalive\n\n"
        "id: 1\nevent: status\ndata: {\"status\":\n"
        "data: \"running\"}\n\n"
        + sse((2, "progress", {"percent": 50, "message": None}), (3, "completed", {"output": 1}))
        + sse((4, "progress", {"percent": 99}))  # never reached: the stream is over
    )
    requests = []

    def handler(request):
        requests.append(request)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    events = list(client(handler).jobs.events("j1"))
    assert events == [
        JobStreamEvent(id=1, job_id="j1", event="status", data={"status": "running"}),
        JobStreamEvent(id=2, job_id="j1", event="progress", data={"percent": 50, "message": None}),
        JobStreamEvent(id=3, job_id="j1", event="completed", data={"output": 1}),
    ]
    assert requests[0].url.path == "/api/v1/jobs/j1/events"
    assert requests[0].headers["accept"] == "text/event-stream"
    assert "last-event-id" not in requests[0].headers


def test_events_send_last_event_id_when_given():
    seen = []

    def handler(request):
        seen.append(request.headers.get("last-event-id"))
        return httpx.Response(200, text=sse((6, "cancelled", {"reason": "cancelled by request"})))

    assert [e.id for e in client(handler).jobs.events("j1", last_event_id=5)] == [6]
    assert seen == ["5"]


def test_a_cache_hit_ends_the_events_though_it_has_no_terminal_event():
    def handler(request):
        return httpx.Response(200, text=sse((1, "status", {"status": "cache_hit"})) + ": keepalive\n\n")

    assert [e.data for e in client(handler).jobs.events("j1")] == [{"status": "cache_hit"}]


def dropping_stream(chunks: list[str], drop: Exception | None) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk.encode()
    if drop is not None:
        raise drop


@pytest.mark.parametrize("drop", [httpx.ReadError("connection reset"), None], ids=["reset", "closed"])
def test_a_dropped_stream_resumes_after_the_last_event_seen_and_delivers_each_event_once(drop):
    # the first connection dies halfway through event 3: it must come again, whole, from the second
    connections = [
        [
            sse((1, "status", {"status": "queued"}), (2, "status", {"status": "running"})),
            'id: 3\nevent: progress\ndata: {"percent"',
        ],
        [sse((3, "progress", {"percent": 50}), (4, "completed", {"output": "done"}))],
    ]
    last_event_ids = []

    def handler(request):
        last_event_ids.append(request.headers.get("last-event-id"))
        return httpx.Response(200, content=dropping_stream(connections.pop(0), drop))

    assert [e.id for e in client(handler).jobs.events("j1")] == [1, 2, 3, 4]
    assert last_event_ids == [None, "2"]


def test_a_stream_that_keeps_dropping_is_a_server_error():
    def handler(request):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(ServerError, match="could not follow the events of job j1.*connection refused"):
        list(client(handler).jobs.events("j1"))


def test_an_error_answer_to_the_stream_is_raised_not_retried():
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(404, json={"detail": "job j9 not found"})

    with pytest.raises(NotFound, match="job j9 not found"):
        list(client(handler).jobs.events("j9"))
    assert len(calls) == 1


async def test_async_events_resume_after_a_drop():
    connections = [
        [sse((1, "status", {"status": "running"})), "id: 2\nevent: progress\n"],
        [sse((2, "progress", {"percent": 10}), (3, "failed", {"reason": "boom"}))],
    ]
    last_event_ids = []

    async def body(chunks):
        for chunk in chunks:
            yield chunk.encode()
        raise httpx.ReadError("connection reset")

    def handler(request):
        last_event_ids.append(request.headers.get("last-event-id"))
        return httpx.Response(200, content=body(connections.pop(0)))

    async with async_client(handler) as c:
        assert [e.event async for e in c.jobs.events("j1")] == ["status", "progress", "failed"]
    assert last_event_ids == [None, "1"]


# waiting and results


class FakeKiln:
    """Jobs that end when their events have been streamed, or after `polls_until_final` GETs."""

    def __init__(self, final: dict, events: str | None = None, polls_until_final: int = 1000):
        self.final, self.events, self.polls_left = final, events, polls_until_final
        self.streamed = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            if self.events is None:
                return httpx.Response(503, json={"detail": "no streams today"})
            self.streamed = True
            return httpx.Response(200, text=self.events)
        if request.method == "POST":
            return httpx.Response(202, json=job_json())
        self.polls_left -= 1
        done = self.streamed or self.polls_left <= 0
        return httpx.Response(200, json=self.final if done else job_json(status="running"))


def test_wait_follows_the_events_then_refreshes():
    fake = FakeKiln(job_json(status="completed", output=3), events=sse((1, "completed", {"output": 3})))
    job = client(fake).jobs.create(type="sleep", seconds=1)
    assert job.wait(timeout=5) is job
    assert (job.status, job.output) == (kiln.JobStatus.COMPLETED, 3)


def test_result_waits_and_returns_the_output():
    fake = FakeKiln(job_json(status="completed", output={"slept": 1}), events=sse((1, "completed", {})))
    assert client(fake).jobs.create(type="sleep", seconds=1).result == {"slept": 1}


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_result_raises_job_failed_with_the_reason(status):
    fake = FakeKiln(job_json(status=status, status_reason="it broke"), events=sse((1, status, {})))
    job = client(fake).jobs.create(type="sleep", seconds=1)
    with pytest.raises(JobFailed, match=f"job j1 ended {status}: it broke") as caught:
        job.result
    assert caught.value.job is job


def test_wait_polls_when_the_stream_fails():
    fake = FakeKiln(job_json(status="completed", output=1), events=None, polls_until_final=3)
    job = client(fake).jobs.create(type="sleep", seconds=1)
    assert job.wait(timeout=5).status is kiln.JobStatus.COMPLETED
    assert fake.polls_left == 0


def test_wait_times_out():
    job = client(FakeKiln(job_json(status="completed"), events=None)).jobs.create(type="sleep", seconds=1)
    with pytest.raises(TimeoutError, match="job j1 did not finish within 0.05 s"):
        job.wait(timeout=0.05, poll=0.01)
    assert job.status is kiln.JobStatus.RUNNING


async def test_async_wait_and_result():
    fake = FakeKiln(job_json(status="completed", output=2), events=sse((1, "completed", {"output": 2})))
    async with async_client(fake) as c:
        job = await c.jobs.create(type="sleep", seconds=1)
        assert await job.result() == 2
        assert job.status is kiln.JobStatus.COMPLETED


async def test_async_result_raises_job_failed():
    fake = FakeKiln(job_json(status="failed", status_reason="oom"), events=None, polls_until_final=2)
    async with async_client(fake) as c:
        job = await c.jobs.create(type="sleep", seconds=1)
        with pytest.raises(JobFailed, match="ended failed: oom"):
            await job.result()


async def test_async_wait_times_out():
    async with async_client(FakeKiln(job_json(status="completed"), events=None)) as c:
        job = await c.jobs.create(type="sleep", seconds=1)
        with pytest.raises(TimeoutError, match="job j1 did not finish within 0.05 s"):
            await job.wait(timeout=0.05, poll=0.01)


def test_an_error_that_is_not_kilns_body_names_the_status_and_the_request():
    with pytest.raises(ServerError, match="502 Bad Gateway from GET"):
        client(lambda request: httpx.Response(502, text="<html>bad gateway</html>")).jobs.get("j1")


# client.llm: what it does without a provider (tests/integration/test_llm_sdk.py calls real ones)

PROVIDERS = [
    {"name": "b-claude", "kind": "anthropic", "models": ["shared", "claude"], "priority": 0},
    {"name": "a-gpt", "kind": "openai", "models": ["shared", "gpt"], "priority": 1},
    {"name": "c-gpt", "kind": "openai", "models": ["tied"], "priority": 0},
    {"name": "d-claude", "kind": "anthropic", "models": ["tied"], "priority": 0},
]


def test_a_model_is_called_in_the_protocol_of_the_provider_kiln_tries_first():
    assert protocol_of(PROVIDERS, "gpt") == "openai" and protocol_of(PROVIDERS, "claude") == "anthropic"
    assert protocol_of(PROVIDERS, "shared") == "anthropic"  # priority 0 before 1
    assert protocol_of(PROVIDERS, "tied") == "openai"  # then by name
    with pytest.raises(NotFound, match="'nope' is served by no registered LLM provider; served: claude, gpt, shared"):
        protocol_of(PROVIDERS, "nope")


def test_the_providers_are_read_once_and_again_only_for_a_model_they_lack():
    reads = []

    def handler(request):
        reads.append(request.url.path)
        return httpx.Response(200, json=PROVIDERS)

    with client(handler) as c:
        for _ in range(2):
            with pytest.raises(NotFound):
                c.llm.chat("nope", [{"role": "user", "content": "hi"}])
        assert reads == ["/api/v1/llm/providers"] * 2
        assert c.llm._protocol("gpt") == "openai" and c.llm._protocol("claude") == "anthropic"
        assert len(reads) == 2


def test_the_system_prompt_and_temperature_go_where_each_protocols_sdk_takes_them():
    messages = [{"role": "user", "content": "hi"}]
    assert chat_arguments("anthropic", "m", messages, "terse", 64, None, {"stop_sequences": ["."]}) == {
        "model": "m", "max_tokens": 64, "stop_sequences": ["."], "system": "terse", "messages": messages}  # fmt: skip
    assert chat_arguments("anthropic", "m", messages, None, 64, 0.0, {"extra_body": {"top_k": 5}}) == {
        "model": "m", "max_tokens": 64, "extra_body": {"top_k": 5, "temperature": 0.0}, "messages": messages}  # fmt: skip
    assert chat_arguments("openai", "m", messages, "terse", 64, 0.0, {}) == {
        "model": "m", "max_tokens": 64, "temperature": 0.0,
        "messages": [{"role": "system", "content": "terse"}, *messages]}  # fmt: skip
    assert drop_in_url("http://kiln.test/", "openai") == "http://kiln.test/api/v1/llm/openai/v1"
    assert drop_in_url("http://kiln.test", "anthropic") == "http://kiln.test/api/v1/llm/anthropic"
