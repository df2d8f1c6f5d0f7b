"""In-process fan-out of job events to live SSE subscribers, so they do not poll the index.

Other kiln API processes' events reach it through PostgreSQL (kiln.store.coordination)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

# subscribed to under this name, a flag is set by every job's event (a batch's stream counts them)
ANY_JOB = "*"


class EventBus:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Event:
        flag = asyncio.Event()
        self._waiters[job_id].add(flag)
        return flag

    def unsubscribe(self, job_id: str, flag: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(flag)
            if not waiters:
                del self._waiters[job_id]

    def notify(self, job_ids) -> None:
        for job_id in job_ids:
            for flag in self._waiters.get(job_id, ()):
                flag.set()
        for flag in self._waiters.get(ANY_JOB, ()):
            flag.set()

    def notify_all(self) -> None:
        """Wakes every subscriber: after a time when events may have been written unannounced."""
        for flags in self._waiters.values():
            for flag in flags:
                flag.set()
