"""The kiln worker reads a deployment or a flow once in a few seconds, and hands each caller a copy of its own."""

from __future__ import annotations

import time

from pydantic import BaseModel

from kiln.worker.worker import RecentReads


class Deployment(BaseModel):
    name: str
    job_variables: dict


async def test_a_read_is_reused_within_its_seconds_and_each_caller_gets_its_own_copy():
    calls = []

    async def read_deployment(deployment_id):
        calls.append(deployment_id)
        return Deployment(name=f"d-{deployment_id}-{len(calls)}", job_variables={"env": {"A": "1"}})

    read = RecentReads(seconds=60).wrap(read_deployment)
    first = await read("x")
    # Prefect merges a run's env into the deployment's job variables: that must not reach the next run
    first.job_variables["env"]["RUN"] = "1"
    second = await read("x")
    assert calls == ["x"] and second.job_variables == {"env": {"A": "1"}} and second.name == "d-x-1"
    assert (await read("y")).name == "d-y-2" and calls == ["x", "y"]


async def test_a_read_older_than_its_seconds_is_read_again():
    calls = []

    async def read_flow(flow_id):
        calls.append(flow_id)
        return Deployment(name=str(len(calls)), job_variables={})

    read = RecentReads(seconds=0.05).wrap(read_flow)
    assert (await read("f")).name == "1"
    time.sleep(0.1)
    assert (await read("f")).name == "2" and calls == ["f", "f"]
