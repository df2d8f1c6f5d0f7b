"""Replicas where an mcp_host job runs them: a plugin image's MCP server in plugin_exec's sandbox (tier A, runc, and
tier B, bwrap), and a command under the worker held to tier B's limits. Real images and processes, the mcp SDK's
client through the front; after every test nothing of its replicas is left (no container, cgroup, mount, process
or folder: tests/sandbox's residue check)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import time
from pathlib import Path

import pytest

from kiln.schemas.mcp_host import McpHostInput
from kiln.schemas.plugins import Limits
from kiln.tasks.mcp.process import ServerProcess
from kiln.tasks.mcp.sandboxed import ConfinedLauncher, SandboxLauncher, launcher_for
from kiln.tasks.mcp.stdio import StdioServer
from kiln.tasks.plugin import clean_leftovers, import_image
from kiln.tasks.plugin.execute import WORK_DIR_ENV
from tests.mcp.conftest import PYTHON, hosted, mcp_session
from tests.sandbox.conftest import Forked, base, place, residue  # noqa: F401  fixtures
from tests.sandbox.mcp_image import SERVER_SOURCE, mcp_layout  # noqa: F401  a fixture
from tests.sandbox.python_image import python_layout  # noqa: F401  a fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's tier A needs root, its tests drop to nobody")

LIMITS = Limits(cpus=1, memory_mb=64, pids=32, wall_seconds=1, output_mb=1, tmp_mb=4)
TOOLS = ["echo", "whoami", "getenv", "alloc", "crash"]


@pytest.fixture(scope="module")
def mcp_image(base, mcp_layout):  # noqa: F811
    return import_image(mcp_layout, base / "mcp-store")


def held(process: ServerProcess) -> list[int]:
    """The pids in the replica's pids cgroup: the server and whatever it started, as the host sees them."""
    enclosure = process.enclosure
    cgroups = enclosure.bundle.cgroups if hasattr(enclosure, "bundle") else enclosure.cgroups
    return [int(pid) for pid in (cgroups.dir("pids") / "cgroup.procs").read_text().split()]


def the_server(process: ServerProcess) -> int:
    """The MCP server's own process among them (in a sandbox, under runc's init or bwrap's)."""
    (pid,) = [pid for pid in held(process) if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] ==
              [b"python3", b"/opt/kiln-test/mcp_stdio_server.py"]]  # fmt: skip
    return pid


def gone(process: ServerProcess) -> list[str]:
    """What is left of one replica's enclosure: its container, cgroups, folder."""
    enclosure = process.enclosure
    name, folder = (enclosure.bundle.id, enclosure.bundle.dir) if hasattr(enclosure, "bundle") else \
        (enclosure.id, enclosure.dir)  # fmt: skip
    left = [f"folder {folder}"] if folder.exists() else []
    cgroups = enclosure.bundle.cgroups if hasattr(enclosure, "bundle") else enclosure.cgroups
    left += [f"cgroup {c}" for c in ("pids", "memory", "cpu") if cgroups.dir(c) and cgroups.dir(c).exists()]
    runc = os.popen("runc list -q").read().split()
    return left + ([f"container {name}"] if name in runc else [])


@pytest.mark.parametrize("tier", ["A", "B"])
async def test_a_plugin_image_serves_from_the_sandbox_restarts_when_killed_or_out_of_memory(  # noqa: F811
        launches, mcp_image, place, tier):  # fmt: skip
    launches.inner = SandboxLauncher(mcp_image, tier, LIMITS, place.work, place.run_id)
    spec = {"server": {"plugin": "tiny"}, "restart": {"max_attempts": 5, "backoff_s": 0}}
    async with hosted(launches, spec, command=mcp_image.argv) as host:
        async with mcp_session(host.url) as session:
            assert [tool.name for tool in (await session.list_tools()).tools] == TOOLS
            assert (await session.call_tool("echo", {"text": "in a box"})).structured_content == {"text": "in a box"}
            who = (await session.call_tool("whoami", {})).structured_content
            assert (who["uid"], who["hostname"]) == (65534, "kiln")  # nobody, in a uts namespace of its own
        first = launches.processes[0]
        assert held(first) and first.enclosure.enforcement["memory_mb"] == "memory cgroup (swap included)"
        assert "wall_seconds" not in first.enclosure.enforcement  # a server runs until it is stopped

        os.kill(the_server(first), signal.SIGKILL)
        await host.until(lambda: len(host.told("healthy")) == 2, 20, "the replica serving again")
        assert gone(first) == []  # the killed one's container, cgroups and folder
        assert host.told("restarting")[0]["after"] == "exited with code 137"
        async with mcp_session(host.url) as session:
            assert (await session.call_tool("echo", {"text": "again"})).structured_content == {"text": "again"}

            # past its memory limit: the cgroup's OOM killer ends it, and the restart says so
            with pytest.raises(Exception):
                await session.call_tool("alloc", {"mb": 200})
        await host.until(lambda: len(host.told("healthy")) == 3, 20, "serving after the OOM kill")
        assert host.told("restarting")[1]["after"] == "out of memory (limit 64 MB)"
        assert gone(launches.processes[1]) == []
        last = launches.processes[2]
    assert gone(last) == []  # stop leaves nothing; the place fixture checks the whole run's residue too


async def test_a_command_is_held_to_tier_b_limits_and_out_of_memory_is_its_restart_reason(launches, place,
                                                                                         monkeypatch):  # noqa: F811
    monkeypatch.setenv(WORK_DIR_ENV, str(place.work))
    spec = {"name": "test", "server": {"command": [PYTHON, str(SERVER_SOURCE)]}, "limits": {"memory_mb": 64},
            "restart": {"max_attempts": 3, "backoff_s": 0}}  # fmt: skip
    launch, command = await launcher_for(McpHostInput.model_validate(spec), place.run_id)
    assert isinstance(launch, ConfinedLauncher) and command is None
    assert launch.limits == Limits(memory_mb=64)  # the defaults, memory_mb given
    launches.inner = launch
    async with hosted(launches, spec) as host:
        first = launches.processes[0]
        assert held(first) == [first.pid]  # the command itself, in its cgroups
        assert first.enclosure.enforcement == {"memory_mb": "memory cgroup (swap included)", "cpus": "cpu cgroup quota",
                                               "pids": "pids cgroup"}  # fmt: skip
        async with mcp_session(host.url) as session:
            assert (await session.call_tool("alloc", {"mb": 16})).structured_content == {"held_mb": 16}
            with pytest.raises(Exception):
                await session.call_tool("alloc", {"mb": 200})
        await host.until(lambda: host.told("restarting"), 10, "restarting")
        assert host.told("restarting")[0]["after"] == "out of memory (limit 64 MB)"
        await host.until(lambda: len(host.told("healthy")) == 2, 20, "serving again")
        assert "restarting after out of memory" not in host.deployment.status()
        assert gone(first) == []
        second = launches.processes[1]
    assert gone(second) == []


def test_replicas_a_killed_worker_left_are_removed_by_the_cleanup_of_its_runs(mcp_image, place,
                                                                             monkeypatch):  # noqa: F811
    """A worker (a forked child) with a command replica and a sandboxed one, killed with kill -9: the next worker's
    cleanup (kiln.worker: clean_leftovers at its start, or for a run whose Dask process died) finds them by their
    flow run's name, as it finds plugin_exec's runs, and removes all of it."""
    monkeypatch.setenv(WORK_DIR_ENV, str(place.work))
    reader, writer = os.pipe()

    def worker():
        async def main():
            spec = McpHostInput.model_validate({"name": "test", "server": {"command": [PYTHON, str(SERVER_SOURCE)]}})
            command_launch, _ = await launcher_for(spec, place.run_id)
            plugin_launch = SandboxLauncher(mcp_image, "A", LIMITS, place.work, place.run_id)
            started = [await command_launch([PYTHON, str(SERVER_SOURCE)], {}, True),
                       await plugin_launch(mcp_image.argv, {}, True)]  # fmt: skip
            for process in started:  # each answers a ping: it serves
                server = StdioServer(process.process.stdin, process.process.stdout, "replica")
                reading = asyncio.create_task(server.run())
                await asyncio.wait_for(server.initialize(), 20)
                await server.ping()
                reading.cancel()
            os.write(writer, b"!")
            await asyncio.sleep(60)

        asyncio.run(main())

    child = Forked(worker, nobody=False)
    os.close(writer)
    assert select.select([reader], [], [], 30)[0], "the replicas did not start"
    os.close(reader)
    child.kill()
    left = residue(place.run_id, place.work)
    assert {"container", "cgroup", "bundle"} <= {entry.split()[0] for entry in left}, left
    cleaned = asyncio.run(clean_leftovers(place.work, place.run_id))
    assert len(cleaned) == 2 and all(name.startswith(f"kiln-{place.run_id}-") for name in cleaned)
    deadline = time.monotonic() + 5
    while residue(place.run_id, place.work) and time.monotonic() < deadline:  # killed processes take a moment
        time.sleep(0.05)
    assert residue(place.run_id, place.work) == []
