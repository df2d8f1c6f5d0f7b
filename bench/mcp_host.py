"""MCP tool calls through kiln: the `echo` round trip direct to the server and through kiln's URL, and how soon a
replica killed with kill -9 serves again, in one run.

Starts tests/mcp/server.py over streamable HTTP on a loopback port (the direct path), its own embedded kiln under a
temporary KILN_HOME, and two mcp_host deployments of the same server through it: one over streamable-http, one over
stdio. Every path is driven by the mcp SDK's own client, one initialized ClientSession per path, and only
`call_tool` is timed; the paths take turns call by call, each round starting at the next path, so the machine's
noise falls on all alike. Besides the direct and kiln URL paths, for the breakdown:

- each deployment's front alone, called on its worker's loopback port with the token kiln keeps for it (what kiln's
  URL adds = the API's forwarding + the front);
- the same server over stdio, spawned by the SDK's stdio client: what the stdio transport costs without kiln.

Then, path by path, a block of calls is made with the CPU time each process spent counted (psutil): the kiln API,
the front's process (the worker's Dask process that runs the deployment's flow) and the server answering. What a
process spends per call moves much less with the machine's load than a latency does. What the API and the fronts
spend on their own (heartbeats, health pings), counted first over 3 s without calls, is taken off each block's
figures in proportion to its length.

Then, on each deployment in turn, a replica is killed with kill -9 (its pid from the `whoami` tool, a session still
open on it) and the time is taken from the kill to the first successful `ping` through kiln's URL, each attempt a
new session (the killed replica's sessions are gone). Each kill's time is split at the moment the new replica's
process started (its start time in /proc: kiln noticed the exit and started it), and each is followed, under the
same load, by a cold start of the server alone (spawned, then initialize and ping answered: the floor no restart
can go under). The deployments restart with `backoff_s: 0`: with the default 1 s, kills less than a minute apart
count as failures in a row and wait 1, 2, 4 s before their restart, while each kill here stands for a replica that
dies while serving healthily (restarted at once by any policy).

The goals (≤ 5 ms p95 added to a tools/call, ≤ 2 s from kill -9 to a successful ping) are reported, not asserted.
The run exits non-zero unless every call, warm-up included, answered with the text it sent, every kill was followed
by a ping answered by a new process, and both deployments served throughout (still running and healthy at the end,
on the flow run they started on).

    python bench/mcp_host.py [--calls 200] [--warmup 20] [--cpu-calls 200] [--kills 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import anyio
import httpx2
import psutil
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from common import REPO, did_not_run, embedded_stack, free_port, percentile, stop, stop_jobs

SERVER = REPO / "tests" / "mcp" / "server.py"
GOAL_ADDED_P95_MS = 5.0
GOAL_MTTR_S = 2.0
TRANSPORTS = ("streamable-http", "stdio")
DIRECT, DIRECT_STDIO = "direct, streamable HTTP", "direct, stdio (reference)"
KILN = {t: f"kiln URL, {t} replica" for t in TRANSPORTS}
FRONT = {t: f"  its front alone, {t}" for t in TRANSPORTS}
NAMES = {t: f"bench-{'http' if t == 'streamable-http' else t}" for t in TRANSPORTS}
ATTEMPT_TIMEOUT_S = 5.0  # one try at a new session and a ping
GIVE_UP_S = 60.0  # a replica not serving this long after its kill: the measurement could not be taken
# between two tries: a client retrying faster loads the 2-core machine while the new replica starts, and slows it
RETRY_S = 0.05
IDLE_S = 3.0  # how long the processes' own CPU use is counted, with no calls


@dataclass
class Call:
    path: str
    seconds: float = math.nan
    error: str | None = None
    timed: bool = True


@dataclass
class Kill:
    transport: str
    killed_pid: int
    seconds: float | None = None  # kill → first successful ping; None when none came within GIVE_UP_S
    restarted_after: float | None = None  # kill → the new replica's process started
    cold_start: float | None = None  # the server alone, spawned → initialize and ping answered, right after
    attempts: int = 0
    new_pid: int | None = None
    last_error: str = ""


@dataclass
class Results:
    calls: list[Call] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    # per path: CPU ms per call of each process ("the API", "the fronts", "the server")
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    idle_cpu: dict[str, float] = field(default_factory=dict)  # CPU s per s of each process with no calls
    errors: list[str] = field(default_factory=list)  # what went wrong outside the timed calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed tools/call per path")
    parser.add_argument("--warmup", type=int, default=20, help="calls per path first, not timed")
    parser.add_argument("--cpu-calls", type=int, default=200, help="calls per path counting CPU time (0: none)")
    parser.add_argument("--kills", type=int, default=5, help="kill -9 of a replica, per deployment")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures there as JSON")
    args = parser.parse_args()
    if args.calls < 1 or args.kills < 1 or args.warmup < 0:
        parser.error("--calls and --kills must be at least 1, --warmup at least 0")

    # the SDK's client warns of every DELETE of a session the killed replica took with it
    logging.getLogger("mcp.client.streamable_http").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    direct_port = free_port()
    server = subprocess.Popen([sys.executable, str(SERVER), "streamable-http", str(direct_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # two deployments serve at once: each takes a service slot of the worker
        with embedded_stack(slots=1, env={"KILN_WORKER_SERVICE_SLOTS": "2"}) as (settings, stack, key):
            import kiln.services as services
            from kiln.sdk import Client

            with Client(settings.api_url, key) as client:
                jobs = {}
                try:
                    for t in TRANSPORTS:
                        jobs[t] = deploy(client, t)
                    started = {t: wait_healthy(client, job.id, NAMES[t]) for t, job in jobs.items()}
                    targets = {DIRECT: (f"http://127.0.0.1:{direct_port}/mcp", {})}
                    processes = {"the API": stack.procs["api"].pid}
                    for t, job in jobs.items():
                        front = services.lookup(job.id)
                        targets[KILN[t]] = (client.mcp.url(NAMES[t]), {"Authorization": f"Bearer {key}"})
                        targets[FRONT[t]] = (f"{front.url}/mcp", {services.TOKEN_HEADER: front.token})
                        processes[f"the front, {t}"] = listening_pid(int(front.url.rsplit(":", 1)[1]))
                    print(f"{args.warmup} warm-up and {args.calls} timed echo calls per path, then {args.kills} kills "
                          f"per deployment; load average {load_before[0]:.2f}", flush=True)  # fmt: skip
                    results = asyncio.run(measure(targets, processes, args))
                    ended = {t: client.jobs.get(job.id) for t, job in jobs.items()}
                finally:
                    stop_jobs(client, jobs.values())
    finally:
        stop(server, grace=5)
    load_after = os.getloadavg()

    figures = report(results, args, load_before, load_after)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    problems = check(results, args, started, ended)
    if problems:
        for problem in problems[:10]:
            print(f"not counted: {problem}")
        raise SystemExit(f"{len(problems)} problems: the figures do not stand")
    print(f"every call ({len(results.calls)}, warm-up included) answered with the text it sent; every kill was "
          f"followed by a ping through kiln answered by a new process; both deployments served throughout")  # fmt: skip


# the stack


def server_argv(transport: str) -> list[str]:
    listen = ["streamable-http", "{port}"] if transport == "streamable-http" else ["stdio"]
    return [sys.executable, str(SERVER), *listen]


def deploy(client, transport: str):
    return client.mcp.deploy(NAMES[transport], command=server_argv(transport), transport=transport,
                             restart={"backoff_s": 0, "max_attempts": 100})  # fmt: skip


def wait_healthy(client, job_id: str, name: str, timeout: float = 120) -> tuple[int, str | None]:
    """Waits until the deployment serves; (its attempt, its flow run), to tell at the end that it was never re-run."""
    deadline = time.monotonic() + timeout
    while (job := client.jobs.get(job_id)).status_reason != "1 of 1 replica healthy":
        if job.status.is_final or time.monotonic() > deadline:
            raise SystemExit(f"the deployment {name!r} is not serving: {job.status.value} ({job.status_reason})")
        time.sleep(0.2)
    return job.attempt, job.flow_run_id


# the measurements


def listening_pid(port: int) -> int:
    """The process listening on a loopback port (a front: the worker's Dask process running its deployment)."""
    return next(c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port)


async def measure(targets: dict[str, tuple[str, dict[str, str]]], processes: dict[str, int], args) -> Results:
    results = Results()
    try:
        async with contextlib.AsyncExitStack() as stack:
            sessions = {}
            for path, (url, headers) in targets.items():
                http = await stack.enter_async_context(http_client(headers))
                sessions[path] = await stack.enter_async_context(session(url, http))
            read, write = await stack.enter_async_context(stdio_client(stdio_parameters()))
            sessions[DIRECT_STDIO] = await stack.enter_async_context(ClientSession(read, write))
            await sessions[DIRECT_STDIO].initialize()
            results.calls = await echo_rounds(sessions, args.calls, args.warmup)
            if args.cpu_calls:
                results.idle_cpu = await idle_cpu(processes, IDLE_S)
                for path in sessions:
                    results.cpu[path] = await cpu_per_call(sessions[path], processes, args.cpu_calls, results.errors)
    except Exception as exc:  # noqa: BLE001 - a session that broke (its deployment gone): reported, the run fails
        results.errors.append(f"the sessions: {type(exc).__name__}: {exc!r}"[:300])
    for transport in TRANSPORTS:
        url, headers = targets[KILN[transport]]
        async with http_client(headers) as http:
            for _ in range(args.kills):
                try:
                    kill = await kill_and_wait(url, http, transport)
                except Exception as exc:  # noqa: BLE001 - no replica to kill: reported, and the run fails
                    kill = Kill(transport, 0, last_error=f"finding the replica to kill: {type(exc).__name__}: {exc}")
                kill.cold_start = await cold_start(transport)
                results.kills.append(kill)
    return results


def http_client(headers: dict[str, str]) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))


def stdio_parameters() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(SERVER), "stdio"])


@contextlib.asynccontextmanager
async def session(url: str, http: httpx2.AsyncClient):
    async with streamable_http_client(url, http_client=http) as (read, write), ClientSession(read, write) as mcp:
        await mcp.initialize()
        yield mcp


async def echo_rounds(sessions: dict[str, ClientSession], rounds: int, warmup: int) -> list[Call]:
    """One echo call per path per round, the paths taking turns; every call kept, warm-up included."""
    paths = list(sessions)
    calls = []
    clock = time.monotonic()
    for r in range(warmup + rounds):
        for path in paths[r % len(paths):] + paths[: r % len(paths)]:
            call = Call(path, timed=r >= warmup)
            text = f"round {r} via {path.strip()}"
            try:
                started = time.perf_counter()
                result = await sessions[path].call_tool("echo", {"text": text})
                call.seconds = time.perf_counter() - started
                said = [block.text for block in result.content if block.type == "text"]
                if result.is_error or said != [text] or (result.structured_content or {}).get("result") != text:
                    call.error = f"answered {said!r} (error: {result.is_error}), not {text!r}"
            except Exception as exc:  # noqa: BLE001 - a call that failed is reported and fails the run
                call.error = f"{type(exc).__name__}: {exc}"
            calls.append(call)
        if (r + 1) % 50 == 0:
            print(f"  round {r + 1} of {warmup + rounds}, {time.monotonic() - clock:.0f} s", flush=True)
    return calls


async def idle_cpu(processes: dict[str, int], seconds: float) -> dict[str, float]:
    """What each process spends on its own, with no calls: CPU seconds per second."""
    counted = {name: psutil.Process(pid) for name, pid in processes.items()}
    before = {name: sum(p.cpu_times()[:2]) for name, p in counted.items()}
    await asyncio.sleep(seconds)
    return {name: (sum(p.cpu_times()[:2]) - before[name]) / seconds for name, p in counted.items()}


async def cpu_per_call(mcp: ClientSession, processes: dict[str, int], calls: int, errors: list[str]) -> dict:
    """A block of echo calls on one session: CPU ms per call of the API, the fronts and the server that answers."""
    counted = {name: psutil.Process(pid) for name, pid in processes.items()}
    try:
        counted["the server"] = psutil.Process((await mcp.call_tool("whoami", {})).structured_content["result"])
    except Exception as exc:  # noqa: BLE001 - the session broke: no block
        errors.append(f"CPU block: whoami: {type(exc).__name__}: {exc}")
        return {"wall_ms": math.nan}

    def cpu() -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in counted.items()}

    before, started = cpu(), time.perf_counter()
    for i in range(calls):
        try:
            result = await mcp.call_tool("echo", {"text": f"cpu {i}"})
            said = [block.text for block in result.content if block.type == "text"]
        except Exception as exc:  # noqa: BLE001 - the block stops; the run fails
            errors.append(f"CPU block, call {i}: {type(exc).__name__}: {exc}")
            break
        if said != [f"cpu {i}"]:
            errors.append(f"CPU block, call {i}: answered {said!r}")
    wall, after = time.perf_counter() - started, cpu()
    return {"wall_ms": wall / calls * 1000, **{name: (after[name] - before[name]) / calls * 1000 for name in counted}}


async def kill_and_wait(url: str, http: httpx2.AsyncClient, transport: str) -> Kill:
    """kill -9 of the replica a session lands on (the session left open, as a client's would be), then new sessions
    and a ping each, until one answers."""
    async with session(url, http) as held:
        pid = (await held.call_tool("whoami", {})).structured_content["result"]
        kill = Kill(transport, pid)
        killed_at, killed_at_boot = time.perf_counter(), time.clock_gettime(time.CLOCK_BOOTTIME)
        os.kill(pid, signal.SIGKILL)
        while time.perf_counter() - killed_at < GIVE_UP_S:
            kill.attempts += 1
            try:
                with anyio.fail_after(ATTEMPT_TIMEOUT_S):
                    async with session(url, http) as fresh:
                        await fresh.send_ping()
                        kill.seconds = time.perf_counter() - killed_at
                        kill.new_pid = (await fresh.call_tool("whoami", {})).structured_content["result"]
                        kill.restarted_after = started_since_boot(kill.new_pid) - killed_at_boot
                break
            except Exception as exc:  # noqa: BLE001 - not serving yet: try again
                kill.last_error = f"{type(exc).__name__}: {exc}"[:200]
                await asyncio.sleep(RETRY_S)
        with contextlib.suppress(Exception):  # its session went with the replica
            await held.send_ping()
    return kill


def started_since_boot(pid: int) -> float:
    """When the process started, in seconds since boot (CLOCK_BOOTTIME), to the kernel's tick (10 ms here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


async def cold_start(transport: str) -> float | None:
    """The server alone: from spawning it to its answer to initialize and a ping, tried as the client above tries."""
    started = time.perf_counter()
    if transport == "stdio":
        async with stdio_client(stdio_parameters()) as (read, write), ClientSession(read, write) as mcp:
            await mcp.initialize()
            await mcp.send_ping()
            return time.perf_counter() - started
    port = free_port()
    process = subprocess.Popen([arg.replace("{port}", str(port)) for arg in server_argv(transport)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        async with http_client({}) as http:
            while time.perf_counter() - started < GIVE_UP_S:
                try:
                    with anyio.fail_after(ATTEMPT_TIMEOUT_S):
                        async with session(f"http://127.0.0.1:{port}/mcp", http) as mcp:
                            await mcp.send_ping()
                            return time.perf_counter() - started
                except Exception:  # noqa: BLE001 - not listening yet
                    await asyncio.sleep(RETRY_S)
        return None
    finally:
        stop(process, grace=5)


# the checks and the report


def check(results: Results, args, started: dict, ended: dict) -> list[str]:
    problems = [f"{c.path.strip()}: {c.error}" for c in results.calls if c.error] + results.errors
    for path in sorted({c.path for c in results.calls}):
        timed = sum(c.path == path and c.timed and c.error is None for c in results.calls)
        if timed < args.calls:
            problems.append(f"{path.strip()}: {timed} of {args.calls} timed calls answered")
    for kill in results.kills:
        if kill.seconds is None:
            problems.append(f"{KILN[kill.transport]}: no ping answered within {GIVE_UP_S:g} s of killing "
                            f"{kill.killed_pid} ({kill.attempts} attempts, last: {kill.last_error})")  # fmt: skip
        elif kill.new_pid in (None, kill.killed_pid) or Path(f"/proc/{kill.killed_pid}/cmdline").exists():
            problems.append(f"{KILN[kill.transport]}: after killing {kill.killed_pid}, whoami answered {kill.new_pid}")
        if kill.cold_start is None:
            problems.append(f"the server alone over {kill.transport} did not answer within {GIVE_UP_S:g} s")
    for transport, job in ended.items():
        if problem := did_not_run(job, status="running"):
            problems.append(f"{KILN[transport]}: the deployment did not serve throughout: {problem}")
        elif job.status_reason != "1 of 1 replica healthy":
            problems.append(f"{KILN[transport]}: the deployment ended the run {job.status.value} ({job.status_reason})")
        elif (job.attempt, job.flow_run_id) != started[transport]:
            problems.append(f"{KILN[transport]}: the deployment was run again during the bench (attempt "
                            f"{started[transport][0]} → {job.attempt}, flow run {job.flow_run_id})")  # fmt: skip
    return problems


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values), "p50_ms": percentile(values, 50) * 1000, "p95_ms": percentile(values, 95) * 1000,
        "mean_ms": statistics.mean(values) * 1000, "min_ms": min(values) * 1000, "max_ms": max(values) * 1000,
    }  # fmt: skip


def median(values: list[float | None]) -> float | None:
    taken = [v for v in values if v is not None]
    return statistics.median(taken) if taken else None


def short(process: str) -> str:
    return process.removeprefix("the ")


def report(results: Results, args, load_before, load_after) -> dict:
    print()
    print(f"MCP tools/call `echo`, tests/mcp/server.py, mcp {version('mcp')}, one call at a time, 2-core machine "
          f"shared with other work (load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the "
          f"end)")  # fmt: skip
    print(f"{args.calls} timed calls per path after {args.warmup} warm-up; ClientSession.call_tool timed, one session "
          f"per path")  # fmt: skip
    figures: dict = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mcp": version("mcp"),
        "load_average": {"start": load_before, "end": load_after}, "calls": args.calls, "warmup": args.warmup,
        "paths": {}, "added": {}, "mttr": {}, "goals": {},
    }  # fmt: skip
    print()
    print(f"{'path':<40}{'p50':>10}{'p95':>10}{'mean':>10}{'min':>10}{'max':>10}")
    paths = list(dict.fromkeys(c.path for c in results.calls))
    order = [DIRECT, *(p for t in TRANSPORTS for p in (KILN[t], FRONT[t])), DIRECT_STDIO]
    for path in sorted(paths, key=order.index):
        timed = [c.seconds for c in results.calls if c.path == path and c.timed and c.error is None]
        if not timed:
            print(f"{path:<40}no answered calls")
            continue
        row = figures["paths"][path.strip()] = stats(timed)
        print(f"{path:<40}" + "".join(f"{row[k]:7.2f} ms" for k in ("p50_ms", "p95_ms", "mean_ms", "min_ms", "max_ms")))
    print()
    print(f"{'added (p50, p95)':<40}{'p50':>10}{'p95':>10}")
    got = figures["paths"]

    def added(label: str, path: str, over: str) -> dict | None:
        if path.strip() not in got or over.strip() not in got:
            return None
        p50, p95 = (got[path.strip()][k] - got[over.strip()][k] for k in ("p50_ms", "p95_ms"))
        print(f"{label:<40}{p50:+7.2f} ms{p95:+7.2f} ms", end="")
        return {"p50_ms": p50, "p95_ms": p95}

    for t in TRANSPORTS:
        row = added(f"kiln URL over direct, {t}", KILN[t], DIRECT)
        if row is not None:
            figures["added"][KILN[t]] = row
            met = figures["goals"][f"added p95, {t}"] = row["p95_ms"] <= GOAL_ADDED_P95_MS
            print(f"   goal ≤ {GOAL_ADDED_P95_MS:g} ms p95: {'met' if met else 'NOT met'}")
        for label, path, over in ((f"  the API's forwarding, {t}", KILN[t], FRONT[t]),
                                  (f"  the front over direct, {t}", FRONT[t], DIRECT)):  # fmt: skip
            if (row := added(label, path, over)) is not None:
                figures["added"][label.strip()] = row
                print()
    if (row := added("direct stdio over direct HTTP", DIRECT_STDIO, DIRECT)) is not None:
        figures["added"]["direct stdio over direct HTTP"] = row
        print()
    if results.cpu:
        figures["cpu_ms_per_call"] = {path.strip(): row for path, row in results.cpu.items()}
        figures["idle_cpu_share"] = results.idle_cpu
        columns = max((list(row) for row in results.cpu.values()), key=len)[1:]  # after wall_ms
        print()
        own = ", ".join(f"{short(name)} {100 * share:.1f} %" for name, share in results.idle_cpu.items())
        print(f"CPU time per call, {args.cpu_calls} calls per path one after the other, less what each process spends "
              f"on its own (with no calls: {own} of a core)")  # fmt: skip
        print(f"{'path':<40}{'wall':>10}" + "".join(f"{short(name):>25}" for name in columns))
        for path in sorted(results.cpu, key=order.index):
            row = results.cpu[path]
            net = {name: row.get(name, math.nan) - results.idle_cpu.get(name, 0) * row["wall_ms"] for name in columns}
            print(f"{path:<40}{row['wall_ms']:7.2f} ms" + "".join(f"{net[name]:22.2f} ms" for name in columns))
    print()
    print(f"kill -9 of a replica → first successful ping through kiln's URL (a new session per attempt), in s; "
          f"goal ≤ {GOAL_MTTR_S:g} s")  # fmt: skip
    print(f"{'':<40}{'each kill':<36}{'median':>8}")
    verdicts = []
    for t in TRANSPORTS:
        kills = [k for k in results.kills if k.transport == t]
        rows = {
            f"{t}: kill → ping answered": [k.seconds for k in kills],
            "  kill → new process started": [k.restarted_after for k in kills],
            "  the server's own cold start": [k.cold_start for k in kills],
        }
        for label, values in rows.items():
            each = " ".join(f"{v:5.2f}" if v is not None else " none" for v in values)
            mid = median(values)
            print(f"{label:<40}{each:<36}{mid:8.2f}" if mid is not None else f"{label:<40}{each:<36}{'none':>8}")
        taken = [k.seconds for k in kills]
        figures["mttr"][t] = {
            "each_s": taken, "median_s": median(taken), "restarted_after_s": [k.restarted_after for k in kills],
            "cold_start_s": [k.cold_start for k in kills], "attempts": [k.attempts for k in kills],
        }  # fmt: skip
        if None not in taken:
            median_met = figures["goals"][f"mttr median, {t}"] = median(taken) <= GOAL_MTTR_S
            every_met = figures["goals"][f"mttr every kill, {t}"] = max(taken) <= GOAL_MTTR_S
            verdicts.append(f"{t}: median {'met' if median_met else 'NOT met'}, every kill "
                            f"{'met' if every_met else 'NOT met'}")  # fmt: skip
        else:
            verdicts.append(f"{t}: not measured")
    print(f"goal ≤ {GOAL_MTTR_S:g} s: " + "; ".join(verdicts))
    return figures


if __name__ == "__main__":
    main()
