"""Scaling live: 1 → 3 → 1 with 5 s tool calls in flight on the replicas that drain; none of them is lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.mcp.conftest import COMMANDS, hosted, mcp_session, residue, whoami


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_scaling_1_3_1_with_calls_in_flight_loses_none(launches, transport):
    spec = {"server": {"command": COMMANDS[transport]}, "transport": transport}
    async with hosted(launches, spec, session_grace_s=1.0) as host:
        deployment = host.deployment
        async with mcp_session(host.url) as a:
            first = asyncio.create_task(a.call_tool("slow", {"seconds": 5}))  # in flight through the whole 1 → 3 → 1
            await asyncio.sleep(0.2)
            await deployment.set_replicas(3)
            await host.until(lambda: deployment.status() == "3 of 3 replicas healthy", 30, "3 healthy")
            async with mcp_session(host.url) as b, mcp_session(host.url) as c:
                pids = {await whoami(a), await whoami(b), await whoami(c)}
                assert len(pids) == 3, "a session on each replica"
                calls = [asyncio.create_task(session.call_tool("slow", {"seconds": 5})) for session in (b, c)]
                await asyncio.sleep(0.5)
                scaled_at = time.monotonic()
                await deployment.set_replicas(1)
                # replicas 2 and 3 drain: they take no new session, and wait for b's and c's calls
                assert deployment.status().startswith("1 of 1 replica healthy; replica 2 draining, 1 call in flight, 1 session")
                async with mcp_session(host.url) as d:
                    assert await whoami(d) == await whoami(a)
                results = await asyncio.gather(first, *calls)
                assert [result.content[0].text for result in results] == ["slept 5.0 s"] * 3
                assert time.monotonic() - scaled_at > 3.5, "the drained replicas' calls ran to their end"
                await host.until(lambda: deployment.status() == "1 of 1 replica healthy", 10, "the drained ones gone")
                assert residue(host.launched[1:3]) == []
                assert await whoami(a) in pids  # the session of the replica kept goes on
        assert [data for data in host.told("scaled")] == [{"from": 1, "to": 3}, {"from": 3, "to": 1}]


async def test_scaling_down_a_replica_that_is_still_starting_stops_it_at_once(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}}) as host:
        await host.deployment.set_replicas(2)
        await asyncio.sleep(0.1)
        assert host.deployment.status() == "1 of 2 replicas healthy; replica 2 starting"
        await host.deployment.set_replicas(1)
        await host.until(lambda: host.deployment.status() == "1 of 1 replica healthy", 5, "replica 2 gone")
        await host.until(lambda: residue(host.launched[1:]) == [], 5, "its process gone")
        async with mcp_session(host.url) as session:
            assert await whoami(session) == host.launched[0]
