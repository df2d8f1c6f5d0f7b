"""LLM budgets on a real SQLite job index: holds taken atomically, settled to the real cost, reported as usage."""

from __future__ import annotations

import asyncio

import pytest

from kiln.errors import QuotaExceeded
from kiln.schemas import JobStatus
from kiln.store import llm
from kiln.store.models import Project


async def figures(store, project_id: str) -> tuple[float, float]:
    async with store.session() as s:
        project = await s.get(Project, project_id)
        return project.llm_spent_usd, project.llm_held_usd


async def test_concurrent_holds_never_exceed_the_budget(store):
    key = await store.create_key("p")
    caller = await store.caller(key)
    assert caller.llm_budgeted is False
    await llm.set_budget(store, "p", 10.5)
    assert (await store.caller(key)).llm_budgeted is True

    async def one() -> bool:
        try:
            await llm.hold_for_call(store, caller.project_id, 1.0)
            return True
        except QuotaExceeded as exc:
            assert "LLM budget of $10.5" in exc.message and exc.details["left_usd"] == pytest.approx(0.5)
            return False

    taken = await asyncio.gather(*(one() for _ in range(20)))
    assert sum(taken) == 10 and await figures(store, caller.project_id) == (0.0, 10.0)


async def test_a_calls_end_releases_its_hold_charges_its_cost_and_records_its_usage(store):
    key = await store.create_key("p")
    caller = await store.caller(key)
    await llm.set_budget(store, "p", 1.0)
    await llm.hold_for_call(store, caller.project_id, 0.4)
    job = await store.add_job(project_id=caller.project_id, type="llm_proxy", input={"model": "m"}, resources={},
                              status=JobStatus.RUNNING, held_usd=0.4, key_prefix=caller.key_prefix)  # fmt: skip
    output = {"model": "m", "provider": "p1", "cost_usd": 0.01,
              "tokens": {"input": 10, "output": 20, "cache_read": 3, "cache_write": 0}}  # fmt: skip
    assert await store.transition(job.id, JobStatus.COMPLETED, output=output)
    assert await figures(store, caller.project_id) == (pytest.approx(0.01), pytest.approx(0.0))
    report = await llm.usage(store, caller.project_id, None, None, "key")
    assert report["groups"] == [{"key": caller.key_prefix, "calls": 1, "failed_calls": 0, "input_tokens": 10,
                                 "output_tokens": 20, "cache_read_tokens": 3, "cache_write_tokens": 0,
                                 "cost_usd": pytest.approx(0.01)}]  # fmt: skip
    # a second report of the same end (Prefect's) changes nothing
    assert not await store.transition(job.id, JobStatus.COMPLETED, output=output)
    assert await figures(store, caller.project_id) == (pytest.approx(0.01), pytest.approx(0.0))


async def test_a_restart_keeps_only_the_holds_of_unfinished_jobs(store):
    key = await store.create_key("p")
    caller = await store.caller(key)
    await llm.set_budget(store, "p", 5.0)
    await llm.hold_for_call(store, caller.project_id, 2.0)  # a call that never became a job
    await llm.hold_for_call(store, caller.project_id, 0.5)
    await store.add_job(project_id=caller.project_id, type="llm_proxy", input={}, resources={},
                        status=JobStatus.RUNNING, held_usd=0.5)  # fmt: skip
    await llm.reconcile_holds(store)
    assert await figures(store, caller.project_id) == (0.0, 0.5)
