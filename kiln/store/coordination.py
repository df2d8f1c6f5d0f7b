"""Several kiln API processes on one PostgreSQL job index: one leads the background work, every one hears every job's
events.

Each API process keeps one connection of its own to the job index. On it, it LISTENs on CHANNEL, where every kiln API
announces the jobs whose events it has just committed (Store.notify), and wakes its own SSE streams of those jobs; and
it tries every RETRY_SECONDS to take the session-level advisory lock LEADER_LOCK. The one that holds it runs the
single-writer loops (the dispatcher, the event relay and its watch, the lab watch): two relays would write each of
Prefect's progress events twice. When the leader dies, even by kill -9, its connection closes, PostgreSQL frees the
lock, and another process takes it at its next try. On SQLite there is one API process, and it leads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger("kiln.coordination")

CHANNEL = "kiln_job_events"
# advisory lock keys (bigint) of the job index: held by the leading API process for its life; by a dispatcher while
# it chooses and claims jobs (Store.release_lock); by an API process migrating the index at its start (Store.migrate)
LEADER_LOCK = 0x6B696C6E_0001
RELEASE_LOCK = 0x6B696C6E_0002
MIGRATE_LOCK = 0x6B696C6E_0003
# how often a follower tries to take the lead, and the leader checks its connection: the failover time after a leader
# dies is at most this, plus the time PostgreSQL takes to notice its connection closed (at once on a kill)
RETRY_SECONDS = 2.0
# a NOTIFY payload must stay under 8000 bytes: a write of many jobs (a batch) is announced in several
PAYLOAD_BYTES = 7000


def is_shared(url: str) -> bool:
    """Whether several kiln API processes can share the job index at `url` (PostgreSQL; not SQLite)."""
    return url.startswith("postgresql")


def payloads(origin: str, job_ids: list[str]) -> Iterator[str]:
    """The NOTIFY payloads announcing the jobs: `ORIGIN id,id,…`, each under PAYLOAD_BYTES."""
    chunk: list[str] = []
    size = len(origin) + 1
    for job_id in job_ids:
        if chunk and size + len(job_id) + 1 > PAYLOAD_BYTES:
            yield f"{origin} {','.join(chunk)}"
            chunk, size = [], len(origin) + 1
        chunk.append(job_id)
        size += len(job_id) + 1
    if chunk:
        yield f"{origin} {','.join(chunk)}"


def asyncpg_dsn(url: str) -> str:
    """The job index's SQLAlchemy URL (postgresql+asyncpg://…) as asyncpg's own connect() takes it."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Coordination:
    """This API process's part among several: whether it leads, and the job events the others write."""

    def __init__(self, store, lead: Callable[[], Awaitable[None]], heard: Callable[[], None] = lambda: None):
        self.store = store
        self.lead = lead  # the background work, run while this process leads
        self.heard = heard  # called for each announcement from another process (the dispatcher's wake)
        self.leading = False

    async def run(self) -> None:
        if not is_shared(self.store.url):
            self.leading = True
            await self.lead()
            return
        while True:
            try:
                await self._connected()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - PostgreSQL restarted or unreachable: connect again
                log.warning("the job index connection for leading and job events failed (%s: %s); connecting "
                            "again in %g s", type(exc).__name__, exc, RETRY_SECONDS)  # fmt: skip
            await asyncio.sleep(RETRY_SECONDS)

    async def _connected(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(asyncpg_dsn(self.store.url), timeout=30)
        closed = asyncio.Event()
        connection.add_termination_listener(lambda _connection: closed.set())
        leader: asyncio.Task | None = None
        try:
            await connection.add_listener(CHANNEL, self._announced)
            # what was written while this process did not listen (before it started, or while PostgreSQL restarted)
            self.store.bus.notify_all()
            while not closed.is_set():
                if leader is None:
                    if await connection.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK, timeout=30):
                        log.warning("this kiln API leads: it runs the dispatcher and the event relay")
                        self.leading = True
                        leader = asyncio.create_task(self.lead())
                elif leader.done():
                    leader.result()  # its loops catch their own errors: an end is a bug, and ends the lead
                    raise RuntimeError("the leader's work ended")
                else:
                    # a connection that died quietly (no close seen) ends the lead here, not only at the server
                    await connection.fetchval("SELECT 1", timeout=30)
                try:
                    await asyncio.wait_for(closed.wait(), RETRY_SECONDS)
                except TimeoutError:
                    pass
            raise ConnectionError("the connection closed")
        finally:
            if leader is not None:
                log.warning("this kiln API no longer leads")
                self.leading = False
                leader.cancel()
                await asyncio.gather(leader, return_exceptions=True)
            connection.terminate()  # frees the lock at once, also when the connection is broken

    def _announced(self, _connection, _pid: int, _channel: str, payload: str) -> None:
        origin, _, job_ids = payload.partition(" ")
        if origin == self.store.origin:
            return  # this process woke its own streams when it wrote
        self.store.bus.notify(job_ids.split(","))
        self.heard()
