"""The llm_proxy job's input: one LLM call, OpenAI- or Anthropic-style, run asynchronously or in a batch."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class LlmProxyInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    provider: str | None = Field(
        None, description="A registered provider to use; by default the model's providers in failover order."
    )
    model: str = Field(min_length=1, description="The model, as a registered provider lists it.")
    messages: list[dict[str, Any]] = Field(
        min_length=1, description="The conversation in the provider's format: [{'role': 'user', 'content': '…'}, …]."
    )
    system: str | None = Field(
        None, description="A system prompt: Anthropic's `system`, or a first system message for an OpenAI provider."
    )
    max_tokens: int = Field(1024, ge=1, le=1_000_000, description="Most tokens the answer may have.")
    temperature: float = Field(
        1.0, ge=0, le=2, description="Sampling temperature; a call at 0 is answered from the cache when it repeats."
    )
    tools: list[dict[str, Any]] | None = Field(None, description="Tools the model may call, in the provider's format.")
    stream: bool = Field(True, description="Stream the answer to the job's SSE stream as `delta` events.")

    @property
    def cacheable(self) -> bool:
        """A call above temperature 0 samples: no two are the same, so none answers another (JobType.cacheable_for)."""
        return self.temperature == 0


class LlmUsageGroup(BaseModel):
    """The calls of one model (or one API key) in the period, with the usage their providers reported."""

    model: str | None = Field(None, description="The model (with group_by=model).")
    key: str | None = Field(
        None, description="The API key's first characters, as `kiln keys` shows them (with group_by=key); null "
        "for calls of jobs no key submitted (a scheduled run's)."
    )
    calls: int = Field(description="Calls, failed ones included.")
    failed_calls: int = Field(description="Calls that failed: refused, or a stream cut short (usage as reported).")
    input_tokens: int = Field(description="Input tokens not read from or written to a prompt cache.")
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: float = Field(description="What the calls cost at their providers' prices.")


class LlmUsage(BaseModel):
    """GET /api/v1/llm/usage: the project's LLM calls in a period, and its budget."""

    start: datetime | None = Field(None, alias="from", description="The period's start (inclusive), as asked.")
    end: datetime | None = Field(None, alias="to", description="The period's end (exclusive), as asked.")
    group_by: Literal["model", "key"]
    groups: list[LlmUsageGroup]
    budget_usd: float | None = Field(description="The project's LLM budget; null is no limit.")
    spent_usd: float = Field(description="What the project's LLM calls have cost, ever.")
    held_usd: float = Field(description="What calls under way hold of the budget (max_tokens × price each).")

    model_config = ConfigDict(populate_by_name=True)
