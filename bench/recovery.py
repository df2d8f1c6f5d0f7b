"""Recovery from crashes: jobs/s before a kill -9 of each part of the stack (and a PostgreSQL restart), after it, and the
seconds until the throughput is back.

    python bench/recovery.py [--postgres URL | --sqlite] [--slots 2] [--seconds 0.2] [--window 60]
                             [--parts api worker dask prefect postgres] [--json FILE]

It starts its own stack (job index and Prefect on fresh PostgreSQL databases by default) and keeps a steady stream of
short `sleep` jobs flowing (a backlog of pending jobs topped up every half second). Throughput is read from the job
index's completed_at (the time of each job's Completed state in Prefect). For each part in turn:
- jobs/s in the `--window` seconds before the kill;
- the part killed as a crash kills it and brought back as `kiln up` does (tests/integration/kills.py, the kill matrix's
  own helpers): kill -9 of the kiln API, of the kiln worker, of the Prefect server, then what each started killed and
  the part started again 1 s later, timed until it answers; kill -9 of the busiest Dask worker process of the kiln
  worker's LocalCluster, which its nanny replaces by itself; `pg_ctlcluster 15 main restart` (not with --sqlite);
- jobs/s in the `--window` seconds after the part is back;
- the seconds from the kill until the throughput is back to at least 90 % of before: the start of the first 20 s span
  after the kill whose jobs/s reach it (goal: within 60 s); and the jobs the kill failed (a crashed run: jobs run once,
  max_retry_count 0).
The next part's window starts once the throughput is back, or 180 s after the kill. It exits non-zero unless every job
it timed (completed within a window or a span it measured) ran through a flow run of its own (common.did_not_run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import httpx

from common import REPO, did_not_run, embedded_stack

sys.path.insert(0, str(REPO))
from tests.integration.kills import PARTS, kill  # noqa: E402

# pending jobs the feeder keeps in the index: enough that the worker never waits for a submission
BACKLOG = 40
# the span whose jobs/s must be back to RECOVERED of the rate before
SPAN = 20.0
RECOVERED = 0.9
# the longest wait for a recovery before the next part's window starts
MAX_WAIT = 180.0
WARM_UP = 30.0


def now() -> datetime:
    return datetime.now(timezone.utc)


class Feeder:
    """Keeps BACKLOG sleep jobs pending, each of an input of its own (and `refresh`: no job is a cache hit)."""

    def __init__(self, http: httpx.Client, seconds: float):
        self.http, self.seconds = http, seconds
        self.numbers = itertools.count()
        self.stopping = threading.Event()
        self.submitted = 0
        self.refused: Counter[str] = Counter()  # what went wrong while a part was down, by kind
        self.thread = threading.Thread(target=self._feed, name="feeder", daemon=True)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def _feed(self) -> None:
        while not self.stopping.is_set():
            try:
                pending = self.http.get("/api/v1/jobs", params={"status": "pending", "limit": BACKLOG})
                pending.raise_for_status()
                missing = BACKLOG - len(pending.json()["jobs"])
                if missing > BACKLOG // 4:
                    entries = [{"job": {"type": "sleep", "input": {"seconds": self.seconds + next(self.numbers) * 1e-7}},
                                "refresh": True} for _ in range(missing)]  # fmt: skip
                    answer = self.http.post("/api/v1/jobs/submit-batch", json={"jobs": entries})
                    answer.raise_for_status()
                    self.submitted += answer.json()["submitted"]
            except httpx.HTTPError as exc:  # the API (or its database) is down: it is what is measured
                self.refused[type(exc).__name__] += 1
            self.stopping.wait(0.5)


def completed_jobs(http: httpx.Client, since: datetime) -> list[dict]:
    """Jobs completed after `since`, read from the index (newest jobs first; the feeder's backlog keeps jobs nearly in
    their order)."""
    jobs, params = [], {"limit": 1000}
    while True:
        page = http.get("/api/v1/jobs", params=params).raise_for_status().json()
        jobs += page["jobs"]
        if page["next_cursor"] is None or datetime.fromisoformat(page["jobs"][-1]["created_at"]) < since - timedelta(
            seconds=MAX_WAIT
        ):
            break
        params["cursor"] = page["next_cursor"]
    return [job for job in jobs if job["completed_at"] and datetime.fromisoformat(job["completed_at"]) >= since]


def in_span(jobs: list[dict], start: datetime, end: datetime, status: str = "completed") -> list[dict]:
    return [job for job in jobs if job["status"] == status and start <= datetime.fromisoformat(job["completed_at"]) < end]


def recovered_after(jobs: list[dict], killed: datetime, before: float, until: datetime) -> float | None:
    """Seconds from the kill to the start of the first SPAN whose jobs/s reach RECOVERED × before; None if none
    does before `until`."""
    start = killed
    while start + timedelta(seconds=SPAN) <= until:
        if len(in_span(jobs, start, start + timedelta(seconds=SPAN))) / SPAN >= RECOVERED * before:
            return (start - killed).total_seconds()
        start += timedelta(seconds=1)
    return None


def measure(http: httpx.Client, stack, part: str, window: float) -> dict:
    window_start = now()
    time.sleep(window)
    killed = now()
    did = kill(stack, part)
    back = now()
    print(f"{part}: {did}; back after {(back - killed).total_seconds():.1f} s", flush=True)
    # the window after, then until the throughput is back (or MAX_WAIT)
    time.sleep(window)
    while True:
        jobs = completed_jobs(http, window_start)
        before = len(in_span(jobs, window_start, killed)) / window
        recovered = recovered_after(jobs, killed, before, now())
        if recovered is not None or (now() - killed).total_seconds() >= MAX_WAIT:
            break
        time.sleep(5)
    after_end = back + timedelta(seconds=window)
    timed = in_span(jobs, window_start, killed) + in_span(jobs, back, after_end)
    if recovered is not None:
        span_start = killed + timedelta(seconds=recovered)
        timed += in_span(jobs, span_start, span_start + timedelta(seconds=SPAN))
    failed = [job for job in _all_ended(http, killed, now()) if job["status"] == "failed"]
    return {
        "part": part,
        "what": did,
        "before_jobs_per_s": before,
        "restart_seconds": (back - killed).total_seconds(),
        "after_jobs_per_s": len(in_span(jobs, back, after_end)) / window,
        "recovered_seconds": recovered,
        "failed": len(failed),
        "failed_reasons": sorted(Counter(job["status_reason"] for job in failed).items()),
        "not_run": [problem for job in timed if (problem := did_not_run(job)) is not None],
        "timed": len({job["id"] for job in timed}),
    }


def _all_ended(http: httpx.Client, start: datetime, end: datetime) -> list[dict]:
    page = http.get("/api/v1/jobs", params={"status": "failed", "limit": 1000}).raise_for_status().json()
    return [job for job in page["jobs"] if start <= datetime.fromisoformat(job["completed_at"]) < end]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default="postgresql://kiln:kiln@127.0.0.1:5432", metavar="URL")
    parser.add_argument("--sqlite", action="store_true", help="both databases on SQLite instead (no PostgreSQL restart)")
    parser.add_argument("--slots", type=int, default=2, help="kiln worker slots")
    parser.add_argument("--seconds", type=float, default=0.2, help="each sleep job's sleep")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured before each kill and after it")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    parts = [part for part in args.parts if not (args.sqlite and part == "postgres")]

    # the default of two batches per key and minute would hold the feeder, not kiln
    env = {"KILN_BATCH_RATE_PER_MINUTE": "100000", "KILN_SUBMIT_RATE_PER_MINUTE": "100000"}
    rows = []
    with embedded_stack(slots=args.slots, postgres=None if args.sqlite else args.postgres, env=env) as (
        settings, stack, key,
    ), httpx.Client(base_url=settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        with Feeder(http, args.seconds) as feeder:
            time.sleep(WARM_UP)
            for part in parts:
                rows.append(measure(http, stack, part, args.window))
                row = rows[-1]
                print(f"  before {row['before_jobs_per_s']:.2f} jobs/s, after {row['after_jobs_per_s']:.2f} jobs/s, "
                      f"back to 90 % after {row['recovered_seconds']} s, {row['failed']} failed", flush=True)  # fmt: skip
        print(f"{feeder.submitted} jobs submitted; submissions refused while a part was down: {dict(feeder.refused)}")

    backend = "SQLite" if args.sqlite else "PostgreSQL"
    print()
    print(f"recovery, 2-core machine, Prefect 3.8.8 and the job index on {backend}, {args.slots} worker slots, "
          f"sleep({args.seconds:g}) jobs, {args.window:g} s windows")  # fmt: skip
    print("| killed | jobs/s before | back after | jobs/s after | back to ≥ 90 % after | jobs failed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        recovered = f"{row['recovered_seconds']:.0f} s" if row["recovered_seconds"] is not None else \
            f"not within {MAX_WAIT:.0f} s"  # fmt: skip
        print(f"| {row['part']} | {row['before_jobs_per_s']:.2f} | {row['restart_seconds']:.1f} s | "
              f"{row['after_jobs_per_s']:.2f} | {recovered} | {row['failed']} |")  # fmt: skip
    for row in rows:
        for reason, count in row["failed_reasons"]:
            print(f"  {row['part']}: {count} failed: {reason}")
    met = all(row["recovered_seconds"] is not None and row["recovered_seconds"] <= 60 for row in rows)
    print(f"goal (back to ≥ 90 % within 60 s of every kill): {'met' if met else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2, default=str)
    not_run = [problem for row in rows for problem in row["not_run"]]
    if not_run:
        print("\n".join(not_run[:20]))
        print(f"{len(not_run)} timed jobs did not run: the figures do not count")
        return 1
    print(f"every one of the {sum(row['timed'] for row in rows)} timed jobs ran through a flow run of its own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
