"""The `llm_proxy` job: one LLM call run asynchronously or in a batch, its text streamed as `delta` events.

Calls through the drop-in endpoints (kiln.api.llm) do not run this flow: they stream from the API process
and are recorded as llm_proxy jobs once they end.
"""

from __future__ import annotations

from prefect import flow

from kiln.schemas.job_types import JobType
from kiln.schemas.llm_proxy import LlmProxyInput
from kiln.tasks.llm.call import call_llm


@flow(name="llm_proxy", persist_result=True, result_serializer="json")
async def llm_proxy(input: LlmProxyInput) -> dict:
    return await call_llm(input)


JOB_TYPE = JobType(
    name="llm_proxy",
    description="One call to an LLM through a registered provider (keys in Prefect Secret blocks); streamed "
    "text as `delta` events, the output with usage and cost. Identical calls at temperature 0 are cache hits.",
    input_model=LlmProxyInput,
    flow=llm_proxy,
    usd_hold="kiln.blocks.llm:hold_for_job",
    tags=("llm",),
)
