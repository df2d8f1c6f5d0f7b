"""The llm_proxy job's input: one LLM call, OpenAI- or Anthropic-style, run asynchronously or in a batch."""

from __future__ import annotations

from typing import Any

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
