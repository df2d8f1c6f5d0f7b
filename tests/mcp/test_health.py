"""Health and restarts with real processes: kill -9, a crash on request, a frozen replica, a server that crashes at
start or never answers; the status line and events; and stop() leaving nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from mcp.shared.exceptions import MCPError

from kiln.schemas.mcp_host import McpHostInput
from kiln.tasks.mcp import Deployment, DeploymentFailed, ServerUnsupported
from tests.mcp.conftest import COMMANDS, PYTHON, hosted, mcp_session, residue, whoami


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_a_replica_killed_with_kill_9_is_serving_again_soon(launches, transport):
    async with hosted(launches, {"server": {"command": COMMANDS[transport]}, "transport": transport}) as host:
        async with mcp_session(host.url) as session:
            first = await whoami(session)
            killed_at = time.monotonic()
            os.kill(first, signal.SIGKILL)
            with pytest.raises(MCPError):  # its session went with it: an error, then 404s (start a new session)
                for _ in range(100):
                    await whoami(session)
                    await asyncio.sleep(0.02)
        # serving again: a new session's tool call answered by the new process
        while True:
            try:
                async with mcp_session(host.url) as session:
                    second = await whoami(session)
                break
            except Exception:
                assert time.monotonic() - killed_at < 10, host.deployment.status()
                await asyncio.sleep(0.02)
        serving_again = time.monotonic() - killed_at
        healthy_at = [at for at, kind, data in host.events if kind == "healthy" and data["pid"] == second][0]
        starting_at = [at for at, kind, _ in host.events if kind == "starting"][-1]
        print(f"\n{transport}: kill -9 → restart begun {starting_at - killed_at:.2f} s, → next successful ping "
              f"{healthy_at - killed_at:.2f} s, → a new session's tool call {serving_again:.2f} s")
        assert second != first
        (restart,) = host.told("restarting")
        assert restart["after"] == "killed by signal 9 (SIGKILL)" and restart["in_s"] == 0
        assert host.deployment.status() == "1 of 1 replica healthy"


async def test_with_a_spare_a_killed_replica_is_replaced_at_once(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}}, spare=True) as host:
        await host.until(lambda: host.deployment.status() == "1 of 1 replica healthy; a spare ready", 30, "the spare")
        first, spare = host.launched[:2]
        killed_at = time.monotonic()
        os.kill(first, signal.SIGKILL)
        while True:
            try:
                async with mcp_session(host.url) as session:
                    served_by = await whoami(session)
                break
            except Exception:
                assert time.monotonic() - killed_at < 10, host.deployment.status()
                await asyncio.sleep(0.01)
        print(f"\nwith a spare: kill -9 → a new session's tool call {time.monotonic() - killed_at:.2f} s")
        assert served_by == spare
        assert host.told("starting")[-1] == {"replica": 1, "attempt": 2, "spare": True}
        await host.until(lambda: host.deployment.status() == "1 of 1 replica healthy; a spare ready", 30, "a new spare")
        assert len(host.launched) == 3


async def test_a_crash_is_restarted_and_its_reason_says_how_it_ended(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}, "restart": {"max_attempts": 3, "backoff_s": 5}}) as host:
        async with mcp_session(host.url) as session:
            with pytest.raises(MCPError) as crashed:
                await session.call_tool("crash", {"code": 3})
            assert "replica 1" in str(crashed.value) and "start a new session" in str(crashed.value)
        await host.until(lambda: host.told("restarting"), 10, "restarting")
        assert host.told("restarting")[0]["after"] == "exited with code 3: crashing on request with code 3"
        await host.until(lambda: len(host.told("healthy")) == 2, 20, "healthy again")
        async with mcp_session(host.url) as session:
            assert await whoami(session) == host.launched[1]
            # a second crash in a row waits backoff_s: the status line says so
            with pytest.raises(MCPError):
                await session.call_tool("crash", {"code": 4})
        await host.until(lambda: len(host.told("restarting")) == 2, 10, "restarting again")
        status = host.deployment.status()
        assert status.startswith("0 of 1 replica healthy; replica 1 restarting after exit code 4, attempt 3 of 3, next in ")
        assert status.endswith((" 5 s", " 4 s")), status


async def test_a_frozen_replica_fails_its_pings_and_is_restarted(launches):
    health = {"interval_s": 0.3, "timeout_s": 0.5, "failures": 2}
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}, "health": health}) as host:
        frozen = host.launched[0]
        os.kill(frozen, signal.SIGSTOP)  # alive, holding its pipes, answering nothing: only a real ping tells
        await host.until(lambda: host.told("unhealthy"), 5, "unhealthy")
        assert host.deployment.status().startswith("0 of 1 replica healthy; replica 1 unhealthy, 1 of 2 pings failed")
        await host.until(lambda: host.told("restarting"), 5, "restarting")
        assert host.told("restarting")[0]["after"] == "failed 2 health checks in a row (last: no answer within 0.5 s)"
        assert [data["failures"] for data in host.told("unhealthy")] == [1, 2]
        await host.until(lambda: len(host.told("healthy")) == 2, 20, "the new replica healthy")
        async with mcp_session(host.url) as session:
            assert await whoami(session) != frozen


async def test_a_server_that_crashes_at_start_fails_the_deployment_with_each_attempts_reason(launches):
    events = []
    crashing = [PYTHON, "-c", "import sys; print('config.toml: no such file', file=sys.stderr); sys.exit(1)"]
    spec = McpHostInput.model_validate({"name": "crashing", "server": {"command": crashing},
                                        "restart": {"max_attempts": 3, "backoff_s": 0.2}})  # fmt: skip
    deployment = Deployment(spec, launch=launches.launch, on_event=lambda kind, data: events.append(kind))
    with pytest.raises(DeploymentFailed) as failed:
        await deployment.start()
    reason = "exited with code 1: config.toml: no such file"
    assert str(failed.value) == (f"replica 1 failed 3 attempts in a row: attempt 1: {reason}; attempt 2: {reason}; "
                                 f"attempt 3: {reason}")  # fmt: skip
    assert events == ["starting", "restarting", "starting", "restarting", "starting", "failed"]
    assert deployment.status() == f"failed: {failed.value}"
    assert await deployment.wait() == str(failed.value)
    await deployment.stop()


async def test_a_server_that_never_answers_counts_as_a_failed_attempt_not_as_starting_forever(launches):
    spec = McpHostInput.model_validate({"name": "mute", "server": {"command": ["sleep", "60"]},
                                        "health": {"interval_s": 0.2, "timeout_s": 0.3, "failures": 2},
                                        "restart": {"max_attempts": 2, "backoff_s": 0}})  # fmt: skip
    deployment = Deployment(spec, launch=launches.launch, min_start_s=0)
    started = time.monotonic()
    with pytest.raises(DeploymentFailed) as failed:
        await deployment.start()
    assert time.monotonic() - started < 8
    assert str(failed.value) == ("replica 1 failed 2 attempts in a row: attempt 1: no answer to initialize and a "
                                 "first ping within 1 s; attempt 2: no answer to initialize and a first ping within 1 s")  # fmt: skip


async def test_a_program_that_does_not_exist_fails_with_its_reason(launches):
    spec = McpHostInput.model_validate({"name": "missing", "server": {"command": ["/nonexistent/mcp-server"]},
                                        "restart": {"max_attempts": 1, "backoff_s": 0}})  # fmt: skip
    with pytest.raises(DeploymentFailed, match=r"attempt 1: could not start '/nonexistent/mcp-server': No such file"):
        await Deployment(spec, launch=launches.launch).start()


async def test_an_unreachable_url_fails_after_its_attempts(launches):
    spec = McpHostInput.model_validate({"name": "far", "server": {"url": "http://127.0.0.1:9/mcp"},
                                        "health": {"interval_s": 0.1, "timeout_s": 0.2, "failures": 1},
                                        "restart": {"max_attempts": 2, "backoff_s": 0}})  # fmt: skip
    with pytest.raises(DeploymentFailed, match=r"attempt 2: no answer to its first ping within 0.3 s \(last: ConnectError"):
        await Deployment(spec, min_start_s=0).start()


async def test_a_plugin_server_without_its_sandbox_launcher_is_refused():
    spec = McpHostInput.model_validate({"name": "p", "server": {"plugin": "structure-tools"}})
    with pytest.raises(ServerUnsupported, match="server.plugin: the plugin 'structure-tools' runs in the sandbox"):
        Deployment(spec)


async def test_stop_leaves_no_process_of_any_replica(launches):
    spec = {"server": {"command": COMMANDS["streamable-http"]}, "transport": "streamable-http", "replicas": 2}
    async with hosted(launches, spec) as host:
        await host.until(lambda: host.deployment.status() == "2 of 2 replicas healthy", 30, "2 healthy")
        async with mcp_session(host.url) as session:
            await session.call_tool("echo", {"text": "x"})
            assert residue(host.launched) != []
            await host.deployment.stop()
            assert residue(host.launched) == []  # at once, not eventually
            assert host.deployment.status() == "stopped"
