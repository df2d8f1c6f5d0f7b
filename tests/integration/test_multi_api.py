"""Two kiln API processes on one PostgreSQL job index: no job released twice nor beyond the free slots, every job's
events on either API's SSE streams, and the other API taking the lead when the leader is killed."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kiln.api.jobs import SSE_KEEPALIVE_SECONDS
from kiln.launcher import Stack
from kiln.sdk.sse import SSEParser
from tests.integration.support import DATABASE, HOME, SETTINGS, create_key, free_port, wait_until

pytestmark = pytest.mark.skipif(
    DATABASE != "postgresql", reason="several kiln API processes share a PostgreSQL job index; SQLite has one"
)

TERMINAL_EVENTS = ("completed", "failed", "cancelled")


# a kiln worker of this module's, besides the session's one-slot worker: more slots than one make "never more jobs
# released than slots" a test, and run the batches sooner
EXTRA_SLOTS = 3


@pytest.fixture(scope="module")
def apis(stack):
    """The session's kiln API ("a") and a second `kiln api` ("b") on the same databases, on a port of its own; each
    a Stack whose "api" part can be killed and started again. The second comes with a worker of EXTRA_SLOTS slots;
    both are stopped at the end."""
    settings = SETTINGS.model_copy(update={"api_port": free_port(), "worker_service_slots": 0})
    second = Stack(settings, log=lambda *_: None)
    second.logs_dir = Path(HOME) / "logs" / "api-b"
    try:
        second.start_api()
        second.start_worker("multi-api", ["--slots", str(EXTRA_SLOTS)])
        yield {"a": stack, "b": second}
    finally:
        second.stop()
    # whichever was killed in a test is back; the session's API leads again once the second is gone
    wait_until(lambda: health(stack)["leader"], timeout=30, what="the session's kiln API to lead again")


def url(api: Stack) -> str:
    return api.settings.api_url


def health(api: Stack) -> dict:
    return httpx.get(f"{url(api)}/healthz", timeout=30).json()


def leader(apis: dict[str, Stack]) -> str:
    """The name of the API that leads, once exactly one does."""

    def one():
        leading = [name for name, api in apis.items() if health(api)["leader"]]
        return leading[0] if len(leading) == 1 else None

    return wait_until(one, timeout=30, what="exactly one kiln API to lead")


def project() -> tuple[str, str]:
    """A project of its own (its own batch rate limit and cache) and its key."""
    name = f"multi-{uuid.uuid4().hex[:8]}"
    return name, create_key(name)


def http(api: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=url(api), headers={"Authorization": f"Bearer {key}"}, timeout=60)


def submit_batch(api: Stack, key: str, count: int, start: int) -> list[str]:
    # distinct inputs: each a run of its own, not a cache hit
    entries = [{"job": {"type": "sleep", "input": {"seconds": 0.01 + (start + i) * 1e-6}}} for i in range(count)]
    with http(api, key) as h:
        response = h.post("/api/v1/jobs/submit-batch", json={"jobs": entries})
    assert response.status_code == 202, response.text
    return [line["job_id"] for line in response.json()["jobs"]]


class SlotSampler:
    """Samples both APIs' /healthz while a batch runs: the jobs released and not ended, against the slots of the two
    workers (which stay up; the index's count of live slots dips while a new leader's relay catches up)."""

    def __init__(self, apis: dict[str, Stack]):
        self.apis = apis
        self.slots = wait_until(lambda: (s := health(apis["b"])["slots"]) == 1 + EXTRA_SLOTS and s, timeout=180,
                                what="both workers' slots")  # fmt: skip
        self.busy: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for api in self.apis.values():
                try:
                    self.busy.append(health(api)["busy_slots"])
                except httpx.HTTPError:
                    continue  # that one was killed
            time.sleep(0.2)  # a released job stays in flight for longer than this

    def __enter__(self) -> "SlotSampler":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        over = [busy for busy in self.busy if busy > self.slots]
        assert not over, f"more jobs released than the {self.slots} slots at {len(over)} samples: {over[:5]}"
        assert max(self.busy) >= 2, self.busy  # it sampled the batch running, on more than one slot


def wait_all_completed(api: Stack, key: str, job_ids: list[str], timeout: float) -> list[dict]:
    with http(api, key) as h:

        def ended():
            jobs = [h.get(f"/api/v1/jobs/{job_id}").json() for job_id in job_ids]
            return jobs if all(job["status"] in TERMINAL_EVENTS for job in jobs) else None

        jobs = wait_until(ended, timeout=timeout, interval=1, what=f"{len(job_ids)} jobs to end")  # a loaded machine's bound
    assert [job["status"] for job in jobs] == ["completed"] * len(jobs), [j["status_reason"] for j in jobs]
    return jobs


def assert_released_once(api: Stack, key: str, project_name: str, jobs: list[dict]) -> None:
    """One flow run per job, in Prefect and in the job's event log."""
    response = httpx.post(f"{SETTINGS.prefect_api}/flow_runs/filter", timeout=60,
                          json={"flow_runs": {"tags": {"all_": [f"project:{project_name}"]}}, "limit": 200})  # fmt: skip
    response.raise_for_status()
    runs = Counter(tag.removeprefix("job:") for run in response.json() for tag in run["tags"] if tag.startswith("job:"))
    assert runs == Counter({job["id"]: 1 for job in jobs})
    assert {run["id"] for run in response.json()} == {job["flow_run_id"] for job in jobs}
    with http(api, key) as h:
        for job in jobs:
            events = [json.loads(e.data) for e in read_stream(h, job["id"])[0]]
            released = [e for e in events if e.get("status") == "queued"]
            assert released == [{"status": "queued", "flow_run_id": job["flow_run_id"]}], events


def read_stream(h: httpx.Client, job_id: str) -> tuple[list, list[str]]:
    """The job's SSE stream read to its end: its events, and every line as it came (keepalive comments included)."""
    parser, events, lines = SSEParser(), [], []
    with h.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append(line)
            event = parser.feed(line)
            if event is not None:
                events.append(event)
                if event.event in TERMINAL_EVENTS:
                    break
    return events, lines


def test_a_batch_submitted_through_both_apis_is_released_once_within_the_slots(apis, idle):
    leader(apis)
    name, key = project()
    with SlotSampler(apis) as sampler:
        job_ids = submit_batch(apis["a"], key, 30, 0) + submit_batch(apis["b"], key, 30, 30)
        jobs = wait_all_completed(apis["b"], key, job_ids, timeout=300)
    sampler.check()
    assert_released_once(apis["a"], key, name, jobs)


def test_sse_subscribers_on_either_api_see_every_event_of_jobs_run_through_the_other(apis, idle):
    name, key = project()
    streams: dict[str, tuple[str, list, list[str]]] = {}

    def follow(job_id: str, on: str) -> None:
        with http(apis[on], key) as h:
            streams[job_id] = (on, *read_stream(h, job_id))

    threads = []
    for submit_on, follow_on in (("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")):
        with http(apis[submit_on], key) as h:
            response = h.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 1 + len(threads) * 1e-6}})
        assert response.status_code in (200, 201, 202), response.text
        threads.append(threading.Thread(target=follow, args=(response.json()["id"], follow_on)))
        threads[-1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(streams) == 4
    for job_id, (on, events, lines) in streams.items():
        other = "a" if on == "b" else "b"
        with http(apis[other], key) as h:
            replayed, _ = read_stream(h, job_id)
        # every event, in order, as the other API (and the index) has them
        assert [(e.id, e.event, e.data) for e in events] == [(e.id, e.event, e.data) for e in replayed]
        assert [e.event for e in events][-1] == "completed"
        assert [json.loads(e.data)["status"] for e in events if e.event == "status"] == ["pending", "queued", "running"]
        # each event woke the stream through PostgreSQL's NOTIFY: none was found only by the look a stream takes
        # after SSE_KEEPALIVE_SECONDS without a wake, right after its keepalive comment
        found_late = [lines[i + 2] for i, line in enumerate(lines[:-2]) if line == ": keepalive" and lines[i + 2].startswith("id:")]
        assert not found_late, f"on {on}, events seen only after {SSE_KEEPALIVE_SECONDS} s: {found_late}"


def test_when_the_leader_is_killed_the_other_api_takes_over_and_the_batch_finishes(apis, idle):
    name, key = project()
    first = leader(apis)
    other = "b" if first == "a" else "a"
    with SlotSampler(apis) as sampler:
        job_ids = submit_batch(apis[first], key, 12, 0) + submit_batch(apis[other], key, 12, 12)
        with http(apis[other], key) as h:
            wait_until(lambda: sum(h.get(f"/api/v1/jobs/{j}").json()["status"] == "completed" for j in job_ids) >= 5,
                       timeout=120, interval=0.5, what="the batch to be under way")  # fmt: skip
        apis[first].stop("api", sig=signal.SIGKILL)
        try:
            killed_at = time.monotonic()
            wait_until(lambda: health(apis[other])["leader"], timeout=30, what=f"API {other} to take the lead")
            took_over = time.monotonic() - killed_at
            jobs = wait_all_completed(apis[other], key, job_ids, timeout=300)
        finally:
            apis[first].start_api()  # back, as a follower
    sampler.check()
    assert_released_once(apis[other], key, name, jobs)
    print(f"API {other} led {took_over:.1f} s after API {first} was killed")
    assert not health(apis[first])["leader"]
