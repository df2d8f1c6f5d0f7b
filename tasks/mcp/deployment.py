"""An MCP deployment: the front, its replicas, and the supervisor that keeps them healthy, restarts and scales them.

Each replica number has a slot whose loop starts a replica, watches it, and starts it again when it fails:

- health is an MCP ping over the replica's own transport every `health.interval_s`, failed when no answer comes
  within `health.timeout_s`; `health.failures` failures in a row end the attempt. An exit ends it at once.
- a new replica must answer its first ping within failures × (interval_s + timeout_s) seconds (at least
  `min_start_s`), or the attempt has failed: health never stays "starting".
- the first restart after a failed attempt is immediate (a replica killed while serving is serving again as soon
  as it can start); each further attempt in a row waits `restart.backoff_s`, then twice that, and so on. Healthy
  for `stable_s`, a replica's count of failed attempts starts again from zero.
- after `restart.max_attempts` failed attempts in a row the deployment fails, its reason giving each attempt's.

With `spare`, one more replica is kept started and answering, taking no sessions: a slot that needs a replica
takes it, so a replica killed while serving is replaced in the time it takes to notice, and a new spare starts.

Scaling down drains: a draining replica takes no new session, keeps serving the ones it holds, and stops once no
request of theirs is in flight and either they have all ended or `session_grace_s` has passed since the drain
began (the sessions left then answer 404 and their clients start new ones elsewhere); `drain_timeout_s` bounds
the whole drain, in-flight requests included.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kiln.schemas.mcp_host import McpHostInput, PluginServer, UrlServer
from kiln.tasks.mcp.errors import DeploymentFailed, McpHostError, PingFailed, ReplicaFailed, ServerUnsupported
from kiln.tasks.mcp.front import Front
from kiln.tasks.mcp.process import Launcher, launch_command
from kiln.tasks.mcp.relay import relay_client
from kiln.tasks.mcp.replica import ProcessHttpReplica, RemoteReplica, Replica, StdioReplica

log = logging.getLogger(__name__)

DRAIN_POLL_SECONDS = 0.05

EventCallback = Callable[[str, dict[str, Any]], Any]


class ReplicaState(str, Enum):
    """Where a replica's slot is in its life."""

    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # a ping failed, fewer than health.failures in a row
    RESTARTING = "restarting"  # waiting for its next attempt
    DRAINING = "draining"
    STOPPED = "stopped"


TAKES_NEW_SESSIONS = frozenset({ReplicaState.HEALTHY})
SERVES = frozenset({ReplicaState.HEALTHY, ReplicaState.UNHEALTHY, ReplicaState.DRAINING})


@dataclass(eq=False)
class Slot:
    """The place of replica `number`: the replica running there now, its state, and its failed attempts in a row."""

    number: int
    state: ReplicaState = ReplicaState.STARTING
    replica: Replica | None = None
    failed_attempts: int = 0
    reasons: list[str] = field(default_factory=list)  # "attempt 1: exited with code 1: …", this run of failures
    last_cause: str = ""  # "exit code 1", for the status line
    next_attempt_at: float = 0.0
    ping_failures: int = 0
    last_ping_error: str = ""
    draining_since: float | None = None
    task: asyncio.Task | None = None


class Deployment:
    """One MCP deployment: `await start()`, serve `app`, `set_replicas(n)`, `status()`, `await stop()`.

    `on_event(kind, data)` is told starting, healthy, unhealthy, restarting, scaled and failed as they happen.
    """

    def __init__(self, spec: McpHostInput, *, on_event: EventCallback | None = None, launch: Launcher = launch_command,
                 command: Sequence[str] | None = None, stable_s: float = 60.0, session_grace_s: float = 10.0,
                 drain_timeout_s: float = 300.0, min_start_s: float = 10.0, spare: bool = False):  # fmt: skip
        """`launch` starts each replica's process (an mcp_host job's come from sandboxed.launcher_for: a command
        under tier B's limits, a plugin in the sandbox; launch_command, a plain process, by default); `command` is a
        plugin server's (its entrypoint and args), which needs a sandbox's launcher."""
        if isinstance(spec.server, PluginServer) and (command is None or launch is launch_command):
            raise ServerUnsupported(f"server.plugin: the plugin {spec.server.plugin!r} runs in the sandbox: give "
                                    "its command and a sandbox launcher (kiln.tasks.mcp.sandboxed.launcher_for)")
        self.spec = spec
        self.command = list(command) if command is not None else getattr(spec.server, "command", None)
        self.on_event = on_event
        self.stable_s = stable_s
        self.session_grace_s = session_grace_s
        self.drain_timeout_s = drain_timeout_s
        self.min_start_s = min_start_s
        self.spare = spare
        self._spare: Replica | None = None  # started and answering, waiting for a slot that needs a replica
        self._spare_taken = asyncio.Event()
        self._spare_task: asyncio.Task | None = None
        self._launch = launch
        self._client = relay_client() if spec.transport == "streamable-http" else None
        self.slots: list[Slot] = []
        self.target = spec.replicas
        self.failure: str | None = None
        self._failed = asyncio.Event()
        self._first_healthy = asyncio.Event()
        self._stopping = False
        self.front = Front(self._pick, self.status, sessionless=spec.transport == "streamable-http")

    @property
    def app(self) -> Front:
        """The ASGI app of the deployment's MCP endpoint."""
        return self.front

    @property
    def start_bound_s(self) -> float:
        """How long a new replica has to answer its first ping: as long as a running one may go unanswered, and
        never less than `min_start_s` (a Python server alone takes seconds to import its SDK)."""
        health = self.spec.health
        return max(health.failures * (health.interval_s + health.timeout_s), self.min_start_s)

    # life

    async def start(self) -> None:
        """Starts every replica; returns once one is healthy. DeploymentFailed if one failed all its attempts first."""
        for _ in range(self.target):
            self._add_slot()
        if self.spare:
            self._spare_task = asyncio.create_task(self._keep_spare(), name=f"mcp {self.spec.name} spare")
        waiting = [asyncio.ensure_future(self._first_healthy.wait()), asyncio.ensure_future(self._failed.wait())]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
        if self.failure:
            await self.stop()
            raise DeploymentFailed(self.failure)

    async def wait(self) -> str:
        """Waits until the deployment fails; its reason."""
        await self._failed.wait()
        return self.failure

    async def stop(self) -> None:
        """Stops every replica, draining none: nothing of the deployment stays behind."""
        self._stopping = True
        tasks = [slot.task for slot in self.slots if slot.task] + ([self._spare_task] if self._spare_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def set_replicas(self, count: int) -> None:
        """Changes the number of replicas live: new ones start, extra ones drain (see the module's docstring)."""
        if count < 1:
            raise ValueError("replicas: at least 1")
        if self.failure or self._stopping:
            raise McpHostError(f"the deployment {self.spec.name!r} is {self.status()}; it cannot be scaled")
        if count == self.target:
            return
        before, self.target = self.target, count
        active = [slot for slot in self.slots if slot.draining_since is None and slot.state != ReplicaState.STOPPED]
        for _ in range(count - len(active)):
            self._add_slot()
        # the ones that serve least go first: not serving at all, then the fewest sessions, then the highest number
        ranked = sorted(active, key=lambda slot: (slot.state in SERVES, _sessions(slot), -slot.number))
        for slot in ranked[: max(len(active) - count, 0)]:
            self._drain(slot)
        self._emit("scaled", {"from": before, "to": count})

    # the supervisor

    def _add_slot(self) -> None:
        taken = {slot.number for slot in self.slots if slot.state != ReplicaState.STOPPED}
        number = next(n for n in range(1, len(taken) + 2) if n not in taken)
        self.slots = [slot for slot in self.slots if slot.state != ReplicaState.STOPPED]
        slot = Slot(number)
        self.slots.append(slot)
        self.slots.sort(key=lambda slot: slot.number)
        slot.task = asyncio.create_task(self._run_slot(slot), name=f"mcp {self.spec.name} replica {number}")

    def _new_replica(self, number: int) -> Replica:
        server, env = self.spec.server, self.spec.env
        if isinstance(server, UrlServer):
            return RemoteReplica(number, server.url, self._client)
        if self.spec.transport == "stdio":
            return StdioReplica(number, self.command, env, self._launch)
        return ProcessHttpReplica(number, self.command, env, self._client, self._launch)

    async def _run_slot(self, slot: Slot) -> None:
        """Starts, watches and restarts the slot's replica until it fails for good, is drained, or stopped."""
        restart = self.spec.restart
        try:
            while True:
                spare = self._take_spare(slot.number)
                replica = slot.replica = spare or self._new_replica(slot.number)
                slot.state, slot.ping_failures = ReplicaState.STARTING, 0
                self._emit("starting", {"replica": slot.number, "attempt": slot.failed_attempts + 1,
                                        "spare": spare is not None})  # fmt: skip
                try:
                    if spare is None:
                        await replica.start(self.start_bound_s)
                except ReplicaFailed as failed:
                    failure = failed
                else:
                    failure = await self._serve(slot, replica)
                counted = slot.draining_since is None and not self._stopping
                if counted:  # no new session for it from now on, and the status line says why at once
                    slot.failed_attempts += 1
                    slot.reasons.append(f"attempt {slot.failed_attempts}: {failure.reason}")
                    slot.state, slot.last_cause = ReplicaState.RESTARTING, failure.cause
                    slot.next_attempt_at = time.monotonic()
                self.front.forget(replica)
                await replica.stop(f"{replica.name} stopped: {failure.reason}")
                slot.replica = None
                if not counted or self._stopping or self.failure:
                    return
                if slot.failed_attempts >= restart.max_attempts:
                    self._fail(f"replica {slot.number} failed {slot.failed_attempts} attempts in a row: "
                               + "; ".join(slot.reasons))  # fmt: skip
                    return
                delay = 0.0 if slot.failed_attempts == 1 else restart.backoff_s * 2 ** (slot.failed_attempts - 2)
                slot.state, slot.next_attempt_at = ReplicaState.RESTARTING, time.monotonic() + delay
                self._emit("restarting", {"replica": slot.number, "after": failure.reason,
                                          "attempt": slot.failed_attempts + 1, "max_attempts": restart.max_attempts,
                                          "in_s": delay})  # fmt: skip
                await asyncio.sleep(delay)
        finally:
            if slot.replica is not None:  # cancelled: stopped or drained
                self.front.forget(slot.replica)
                stopping = asyncio.ensure_future(slot.replica.stop(f"{slot.replica.name} was stopped"))
                # a second cancel (stop() while a drain ends) must not leave the process behind
                while not stopping.done():
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.shield(stopping)
                if not stopping.cancelled() and stopping.exception() is not None:
                    log.warning("stopping %s failed: %r", slot.replica.name, stopping.exception())
                slot.replica = None
            slot.state = ReplicaState.STOPPED

    async def _serve(self, slot: Slot, replica: Replica) -> ReplicaFailed:
        """Watches a started replica: pings it every interval; returns how it ended (exit or failed health)."""
        health = self.spec.health
        if slot.draining_since is None:
            slot.state = ReplicaState.HEALTHY
        self._emit("healthy", {"replica": slot.number, "pid": replica.pid})
        self._first_healthy.set()
        healthy_since = time.monotonic()
        exited = asyncio.ensure_future(replica.exited())
        try:
            while True:
                done, _ = await asyncio.wait([exited], timeout=health.interval_s)
                if done:
                    return exited.result()
                try:
                    await asyncio.wait_for(replica.ping(), health.timeout_s)
                except (PingFailed, asyncio.TimeoutError) as error:
                    await asyncio.sleep(0)  # an exit that broke the ping is the better reason
                    if exited.done():
                        return exited.result()
                    slot.ping_failures += 1
                    slot.last_ping_error = str(error) or f"no answer within {health.timeout_s:g} s"
                    healthy_since = math.inf
                    if slot.draining_since is None:
                        slot.state = ReplicaState.UNHEALTHY
                    self._emit("unhealthy", {"replica": slot.number, "failures": slot.ping_failures,
                                             "of": health.failures, "error": slot.last_ping_error})  # fmt: skip
                    if slot.ping_failures >= health.failures:
                        reason = f"failed {slot.ping_failures} health checks in a row (last: {slot.last_ping_error})"
                        return ReplicaFailed(reason, f"{slot.ping_failures} failed health checks")
                    continue
                if slot.ping_failures:
                    slot.ping_failures = 0
                    healthy_since = time.monotonic()
                    if slot.draining_since is None:
                        slot.state = ReplicaState.HEALTHY
                    self._emit("healthy", {"replica": slot.number, "pid": replica.pid})
                if slot.failed_attempts and time.monotonic() - healthy_since >= self.stable_s:
                    slot.failed_attempts, slot.reasons = 0, []
        finally:
            exited.cancel()

    async def _keep_spare(self) -> None:
        """Keeps one replica started and answering, taking no sessions, for the next slot that needs a replica: a
        failed replica is then replaced in the time it takes to notice, not in the time its server takes to start.
        One that exits untaken is started again; its failures count against no slot."""
        replica: Replica | None = None
        try:
            while True:
                replica = self._new_replica(0)
                try:
                    await replica.start(self.start_bound_s)
                except ReplicaFailed as failed:
                    log.warning("the spare replica of %s did not start: %s", self.spec.name, failed.reason)
                    await replica.stop("the spare did not start")
                    replica = None
                    await asyncio.sleep(max(self.spec.restart.backoff_s, 1.0))
                    continue
                self._spare = replica
                waiting = [asyncio.ensure_future(replica.exited()), asyncio.ensure_future(self._spare_taken.wait())]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in waiting:
                    task.cancel()
                self._spare_taken.clear()
                if self._spare is replica:  # exited, untaken
                    self._spare = None
                    await replica.stop("the spare exited")
                replica = None
        finally:
            self._spare = None
            if replica is not None and not self._spare_taken.is_set():  # a taken one is its slot's to stop
                await asyncio.shield(replica.stop("the deployment stopped"))

    def _take_spare(self, number: int) -> Replica | None:
        replica = self._spare
        if replica is None or not replica.alive:
            return None
        self._spare = None
        replica.renumber(number)
        self._spare_taken.set()
        return replica

    def _drain(self, slot: Slot) -> None:
        slot.draining_since = time.monotonic()
        if slot.state not in SERVES:  # starting or waiting to restart: nothing to drain
            slot.task.cancel()
            return
        slot.state = ReplicaState.DRAINING
        asyncio.create_task(self._stop_when_drained(slot))

    async def _stop_when_drained(self, slot: Slot) -> None:
        while slot.replica is not None and slot.state != ReplicaState.STOPPED:
            waited = time.monotonic() - slot.draining_since
            idle = slot.replica.in_flight == 0
            if idle and (not slot.replica.sessions or waited >= self.session_grace_s) or waited >= self.drain_timeout_s:
                break
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        slot.task.cancel()

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self._emit("failed", {"reason": reason})
        self._failed.set()
        if not self._stopping:  # the other replicas go too; the deployment is over
            for slot in self.slots:
                if slot.task is not asyncio.current_task() and slot.task:
                    slot.task.cancel()

    def _pick(self) -> Replica | None:
        ready = [slot for slot in self.slots
                 if slot.state in TAKES_NEW_SESSIONS and slot.replica is not None and slot.replica.alive]  # fmt: skip
        if not ready or self.failure:
            return None
        return min(ready, key=lambda slot: (len(slot.replica.sessions), slot.number)).replica

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            result = self.on_event(kind, data)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)
        except Exception:  # a failing listener must not stop the supervisor
            log.exception("the MCP deployment's on_event failed on %s", kind)

    # state

    def status(self) -> str:
        """The job's status_reason: "3 of 3 replicas healthy", then what the others are doing."""
        if self.failure:
            return f"failed: {self.failure}"
        if self._stopping:
            return "stopped"
        active = [slot for slot in self.slots if slot.draining_since is None and slot.state != ReplicaState.STOPPED]
        healthy = sum(slot.state == ReplicaState.HEALTHY for slot in active)
        parts = [f"{healthy} of {self.target} replica{'s' if self.target != 1 else ''} healthy"]
        for slot in self.slots:
            if slot.state == ReplicaState.STOPPED or slot.state == ReplicaState.HEALTHY:
                continue
            parts.append(self._describe(slot))
        if self.spare:
            parts.append("a spare ready" if self._spare is not None else "the spare starting")
        return "; ".join(parts)

    def _describe(self, slot: Slot) -> str:
        name, restart = f"replica {slot.number}", self.spec.restart
        if slot.state == ReplicaState.RESTARTING and slot.failed_attempts >= restart.max_attempts:
            return f"{name} failed after {slot.last_cause}, its last attempt of {restart.max_attempts}"
        if slot.state == ReplicaState.RESTARTING:
            wait = max(slot.next_attempt_at - time.monotonic(), 0)
            return (f"{name} restarting after {slot.last_cause}, attempt {slot.failed_attempts + 1} of "
                    f"{restart.max_attempts}, next in {wait:.0f} s")  # fmt: skip
        if slot.state == ReplicaState.STARTING:
            attempt = f", attempt {slot.failed_attempts + 1} of {restart.max_attempts}" if slot.failed_attempts else ""
            return f"{name} starting{attempt}"
        if slot.state == ReplicaState.UNHEALTHY:
            return (f"{name} unhealthy, {slot.ping_failures} of {self.spec.health.failures} pings failed "
                    f"(last: {slot.last_ping_error})")  # fmt: skip
        replica = slot.replica
        calls = replica.in_flight if replica else 0
        sessions = len(replica.sessions) if replica else 0
        return f"{name} draining, {_count(calls, 'call')} in flight, {_count(sessions, 'session')}"


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'s' if number != 1 else ''}"


def _sessions(slot: Slot) -> int:
    return len(slot.replica.sessions) if slot.replica else 0
