"""LLM money: a project's USD budget, the holds of calls under way, what each call cost, and usage reports.

A call holds its most possible cost (max_tokens × price, and every byte of its request as an input
token) before it starts, in one conditional UPDATE: the hold is taken only while spent + held + it stays
within the budget, so concurrent calls (in one API process or several) can never overspend. The hold
rides on the call's job (`jobs.held_usd`); when the job ends, `settle` releases it and charges the
output's `cost_usd`. A restart drops the holds of calls that never became jobs (`reconcile_holds`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select, update

from kiln.errors import NotFound, QuotaExceeded
from kiln.store.models import ApiKey, JobRow, LlmUsageRow, Project


async def hold(s, project_id: str, usd: float) -> None:
    """Reserves `usd` of the project's LLM budget in session `s`, or raises QuotaExceeded (402)."""
    if usd <= 0:
        return
    taken = await s.execute(
        update(Project)
        .where(Project.id == project_id)
        .where((Project.llm_budget_usd.is_(None)) | (Project.llm_spent_usd + Project.llm_held_usd + usd <= Project.llm_budget_usd))
        .values(llm_held_usd=Project.llm_held_usd + usd)
    )
    if taken.rowcount == 1:
        return
    project = await s.get(Project, project_id)
    left = project.llm_budget_usd - project.llm_spent_usd - project.llm_held_usd
    raise QuotaExceeded(
        f"the project's LLM budget of ${project.llm_budget_usd:g} cannot hold this call's most possible cost of "
        f"${usd:.6f} (max_tokens × price): ${max(left, 0):.6f} is left, ${project.llm_spent_usd:.6f} spent and "
        f"${project.llm_held_usd:.6f} held by calls under way; raise it with `kiln projects budget NAME --usd N`",
        details={"needed_usd": usd, "left_usd": left, "spent_usd": project.llm_spent_usd,
                 "held_usd": project.llm_held_usd, "budget_usd": project.llm_budget_usd},  # fmt: skip
    )


async def hold_for_call(store, project_id: str, usd: float) -> None:
    """`hold` in a transaction of its own: a drop-in call's reservation, before it goes to the provider."""
    async with store.session.begin() as s:
        await hold(s, project_id, usd)


async def settle(s, row: JobRow, output: Any, at: datetime) -> None:
    """In a final transition's transaction: the job's hold is released and the cost_usd of its output (the
    transition's) charged; an LLM call's usage is recorded for GET /api/v1/llm/usage."""
    output = output if isinstance(output, dict) else {}
    cost = float(output.get("cost_usd") or 0.0)
    if row.held_usd or cost:
        await s.execute(
            update(Project)
            .where(Project.id == row.project_id)
            .values(llm_held_usd=Project.llm_held_usd - row.held_usd, llm_spent_usd=Project.llm_spent_usd + cost)
        )
        row.held_usd = 0.0
    tokens = output.get("tokens")
    if isinstance(tokens, dict) and output.get("model"):
        await s.merge(LlmUsageRow(
            job_id=row.id, project_id=row.project_id, key_prefix=row.key_prefix, model=str(output["model"]),
            provider=output.get("provider"), input_tokens=int(tokens.get("input", 0)),
            output_tokens=int(tokens.get("output", 0)), cache_read_tokens=int(tokens.get("cache_read", 0)),
            cache_write_tokens=int(tokens.get("cache_write", 0)), cost_usd=cost,
            failed=row.status != "completed", at=at,
        ))  # fmt: skip


async def reconcile_holds(store) -> None:
    """At the API's start: each project holds exactly what its unfinished jobs hold; a call that was under way
    when the API stopped never became a job, and its hold goes."""
    from kiln.store.batches import UNFINISHED

    held = (
        select(func.coalesce(func.sum(JobRow.held_usd), 0.0))
        .where(JobRow.project_id == Project.id, JobRow.status.in_(UNFINISHED))
        .scalar_subquery()
    )
    async with store.session.begin() as s:
        await s.execute(update(Project).values(llm_held_usd=held))


async def set_budget(store, project_name: str, usd: float | None) -> None:
    async with store.session.begin() as s:
        result = await s.execute(update(Project).where(Project.name == project_name).values(llm_budget_usd=usd))
    if result.rowcount == 0:
        raise NotFound(f"project {project_name!r} not found")


async def set_key_limits(store, key_or_prefix: str, calls: int | None, tokens: int | None) -> int:
    """Sets the LLM limits of the key (or every live key starting with the prefix); returns how many changed."""
    from kiln.store.store import KEY_PREFIX, hash_key

    if key_or_prefix.startswith(KEY_PREFIX) and len(key_or_prefix) > 20:
        condition = ApiKey.key_hash == hash_key(key_or_prefix)
    else:
        condition = ApiKey.prefix.startswith(key_or_prefix[:12])
    async with store.session.begin() as s:
        result = await s.execute(
            update(ApiKey)
            .where(condition, ApiKey.revoked_at.is_(None))
            .values(llm_calls_per_minute=calls, llm_tokens_per_minute=tokens)
        )
    return result.rowcount


async def usage(
    store, project_id: str, start: datetime | None, end: datetime | None, group_by: Literal["model", "key"]
) -> dict[str, Any]:
    """The project's LLM calls between `start` and `end`, summed per model or per key, and its budget."""
    column = LlmUsageRow.model if group_by == "model" else LlmUsageRow.key_prefix
    query = select(
        column,
        func.count(),
        func.sum(LlmUsageRow.input_tokens),
        func.sum(LlmUsageRow.output_tokens),
        func.sum(LlmUsageRow.cache_read_tokens),
        func.sum(LlmUsageRow.cache_write_tokens),
        func.sum(LlmUsageRow.cost_usd),
    ).where(LlmUsageRow.project_id == project_id)
    if start is not None:
        query = query.where(LlmUsageRow.at >= start)
    if end is not None:
        query = query.where(LlmUsageRow.at < end)
    async with store.session() as s:
        rows = (await s.execute(query.group_by(column).order_by(column))).all()
        failed = dict((await s.execute(query.with_only_columns(column, func.count()).where(LlmUsageRow.failed)
                                       .group_by(column))).all())  # fmt: skip
        project = await s.get(Project, project_id)
    groups = [
        {group_by: name, "calls": calls, "failed_calls": failed.get(name, 0), "input_tokens": int(i or 0),
         "output_tokens": int(o or 0), "cache_read_tokens": int(cr or 0), "cache_write_tokens": int(cw or 0),
         "cost_usd": float(cost or 0.0)}
        for name, calls, i, o, cr, cw, cost in rows
    ]  # fmt: skip
    return {
        "groups": groups,
        "budget_usd": project.llm_budget_usd,
        "spent_usd": project.llm_spent_usd,
        "held_usd": project.llm_held_usd,
    }
