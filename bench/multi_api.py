"""SSE delivery across two kiln API processes on one PostgreSQL job index (LISTEN/NOTIFY), in one run.

Starts its own embedded kiln with the job index and Prefect on fresh PostgreSQL databases, and a second `kiln api` on
the same databases. The first API leads (runs the dispatcher and the relay, so writes the events of a job's run);
it submits `sleep` jobs through the first API (half) and the second (half), and follows each job's SSE stream on both
APIs at once from before it runs. For every event it records when each stream delivered it, and reads the event's
`created_at` from the index afterwards. It reports:

- on the second API, `created_at` → arrival: what a subscriber of a process that did not write the event waits
  (through PostgreSQL's NOTIFY). For the status events the relay mirrors from Prefect (queued excepted), `created_at`
  is when the state changed in Prefect, so these include Prefect's event pipeline and the relay, as on one API;
- the same on the first API (the leader: its streams are woken in-process by the write), the baseline;
- arrival on the second − arrival on the first, per event: what a second process adds.

It exits non-zero unless every event of every job reached both streams, in the same order.

    python bench/multi_api.py --postgres postgresql://kiln:kiln@127.0.0.1:5432 [--jobs 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict

from common import embedded_stack, free_port, percentile, summary

TERMINAL_EVENTS = ("completed", "failed", "cancelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", metavar="URL", required=True,
                        help="the server for fresh databases, e.g. postgresql://kiln:kiln@127.0.0.1:5432")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=40, help="sleep(0.5) jobs, each followed on both APIs")
    parser.add_argument("--slots", type=int, default=2, help="the worker's slots")
    args = parser.parse_args()

    with embedded_stack(slots=args.slots, postgres=args.postgres) as (settings, _, key):
        from kiln.launcher import Stack

        second = Stack(settings.model_copy(update={"api_port": free_port()}), log=print)
        second.logs_dir = settings.home_dir / "logs" / "api-b"
        second.start_api()
        try:
            arrivals = asyncio.run(follow_jobs([settings.api_url, second.settings.api_url], key, args.jobs))
            created = asyncio.run(created_times(settings.job_index_url))
        finally:
            second.stop()

    on_first, on_second, added = [], [], []
    by_kind = defaultdict(list)  # on the second API
    for job_id, (first, second_) in arrivals.items():
        if [event_id for event_id, *_ in first] != [event_id for event_id, *_ in second_]:
            raise SystemExit(f"job {job_id}: the two APIs' streams differ: {first} / {second_}")
        for (event_id, at_first, kind), (_, at_second, _) in zip(first, second_):
            on_first.append(at_first - created[event_id])
            on_second.append(at_second - created[event_id])
            added.append(at_second - at_first)
            by_kind[kind].append(at_second - created[event_id])
    print()
    print(f"SSE delivery, {args.jobs} sleep(0.5) jobs ({len(added)} events), two kiln APIs, the job index and "
          f"Prefect on PostgreSQL, {args.slots} worker slots, 2-core machine")  # fmt: skip
    print(summary("second API: created_at → arrival", on_second))
    print(summary("first API (leader): created_at → arrival", on_first))
    print(summary("second − first arrival", added))
    print("second API, created_at → arrival by event:")
    for kind, delays in sorted(by_kind.items()):
        print(summary(f"  {kind}", delays))
    print(f"goal: every event on the second API within 0.1 s at the p95 of the leader's: "
          f"{'met' if percentile(added, 95) <= 0.1 else 'NOT met'}")


async def follow_jobs(urls: list[str], key: str, jobs: int) -> dict[str, tuple[list, list]]:
    """Submits the jobs, through each API in turn, one every 0.2 s; follows each on both APIs. Returns, per job, the
    (event id, arrival time, kind) of each event of each API's stream."""
    import httpx

    from kiln.sdk.sse import SSEParser

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=300, limits=httpx.Limits(max_connections=None)) as http:

        async def stream(url: str, job_id: str) -> list[tuple[int, float]]:
            parser, got = SSEParser(), []
            async with http.stream("GET", f"{url}/api/v1/jobs/{job_id}/events") as response:
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        kind = event.event
                        if kind == "status":
                            kind = f"status {json.loads(event.data)['status']}"
                        got.append((int(event.id), time.time(), kind))
                        if event.event in TERMINAL_EVENTS:
                            return got
            raise SystemExit(f"job {job_id}'s stream on {url} ended before the job")

        followed = {}
        for n in range(jobs):
            response = await http.post(f"{urls[n % 2]}/api/v1/jobs",
                                       json={"type": "sleep", "input": {"seconds": 0.5 + n * 1e-6}})  # fmt: skip
            response.raise_for_status()
            job_id = response.json()["id"]
            followed[job_id] = asyncio.gather(*(stream(url, job_id) for url in urls))
            await asyncio.sleep(0.2)
        return {job_id: tuple(await both) for job_id, both in followed.items()}


async def created_times(url: str) -> dict[int, float]:
    """Every event's created_at in the index, as a Unix time."""
    import asyncpg

    from kiln.store.coordination import asyncpg_dsn

    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch("SELECT id, created_at FROM job_events")
    finally:
        await connection.close()
    return {row["id"]: row["created_at"].timestamp() for row in rows}


if __name__ == "__main__":
    main()
