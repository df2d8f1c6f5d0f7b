"""An LLM provider as a Prefect Block: where llm_proxy calls go, with the key kept in a Prefect Secret block.

A provider is registered by name (`kiln llm providers add NAME …`, or `prefect block register -m
kiln.blocks.llm` and the Prefect UI). Its API key is never a field of this block: the block names a
Prefect `Secret` block that holds it, so no summary, job, event or flow-run parameter that carries a
provider can carry its key. A model name routes to every provider that lists it, in failover order
(`priority` ascending, then name).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from kiln.blocks import http_base_url, registered, some_names

log = logging.getLogger("kiln.llm")

# prices are per million tokens, as providers publish them
PER_TOKEN = 1e-6


def key_block_name(provider: str) -> str:
    """The Secret block that holds a provider's key, as `kiln llm providers add` names it."""
    return f"kiln-llm-{provider}-key"


class LlmProvider(Block):
    """An OpenAI or Anthropic API (or an OpenAI-compatible server) that kiln routes LLM calls to."""

    _block_type_name: ClassVar[str] = "kiln LLM provider"
    _block_type_slug: ClassVar[str] = "kiln-llm-provider"
    _description: ClassVar[str] = (
        "An OpenAI or Anthropic API, or an OpenAI-compatible server, that kiln's llm_proxy calls go to; "
        "its key lives in a Prefect Secret block."
    )

    kind: Literal["openai", "anthropic"] = Field(
        description="The wire protocol: openai (Chat Completions; any OpenAI-compatible server) or anthropic "
        "(Messages)."
    )
    base_url: str = Field(
        description="The API's base URL as its SDK takes it: https://api.openai.com/v1 (kiln appends "
        "/chat/completions, /models) or https://api.anthropic.com (kiln appends /v1/messages, /v1/models)."
    )
    key_secret: str | None = Field(
        None, description="Name of the Prefect Secret block holding the API key; no key is sent when unset."
    )
    models: list[str] = Field(description="The model names this provider serves, e.g. ['gpt-4o-mini'].")
    priority: int = Field(0, description="Failover order among providers of one model: lower is tried first.")
    input_price: float = Field(0.0, ge=0, description="USD per million input (prompt) tokens not read from cache.")
    output_price: float = Field(0.0, ge=0, description="USD per million output (completion) tokens.")
    cache_read_price: float | None = Field(
        None, ge=0, description="USD per million input tokens read from the prompt cache; the input price when unset."
    )
    cache_write_price: float | None = Field(
        None, ge=0, description="USD per million input tokens written to the prompt cache; the input price when unset."
    )
    timeout_seconds: float = Field(
        60.0, gt=0, description="Longest wait for the provider to connect, answer, or send the next streamed chunk."
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return http_base_url(value)

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        return some_names(value, "model")

    def url(self, endpoint: Literal["chat", "models"]) -> str:
        """The URL of the provider's chat (completions or messages) or models endpoint."""
        if self.kind == "openai":
            return f"{self.base_url}/{'chat/completions' if endpoint == 'chat' else 'models'}"
        return f"{self.base_url}/v1/{'messages' if endpoint == 'chat' else 'models'}"

    def cost(self, tokens: dict[str, int]) -> float:
        """USD for a call's tokens: {'input', 'output', 'cache_read', 'cache_write'}, input counting only uncached
        tokens (kiln.tasks.llm.wire.tokens_of reads them from either provider's usage)."""
        cache_read = self.input_price if self.cache_read_price is None else self.cache_read_price
        cache_write = self.input_price if self.cache_write_price is None else self.cache_write_price
        return PER_TOKEN * (
            tokens.get("input", 0) * self.input_price
            + tokens.get("output", 0) * self.output_price
            + tokens.get("cache_read", 0) * cache_read
            + tokens.get("cache_write", 0) * cache_write
        )

    def most_cost(self, request_bytes: int, max_tokens: int) -> float:
        """The most a call can cost: every byte of its request an input token at the dearest input price (none
        is ever more than a byte), and max_tokens of output. What a call holds of its project's budget."""
        dearest = max(self.input_price, self.cache_read_price or 0.0, self.cache_write_price or 0.0)
        return PER_TOKEN * (request_bytes * dearest + max_tokens * self.output_price)

    def summary(self, name: str) -> dict[str, Any]:
        """What GET /api/v1/llm/providers shows: everything but the key (the Secret's name is no secret)."""
        return {"name": name, **self.model_dump(mode="json", exclude={"block_type_slug"})}

    async def aload_key(self) -> str | None:
        """The API key from its Secret block; held only in memory, never logged or stored."""
        if self.key_secret is None:
            return None
        from prefect.blocks.system import Secret

        return (await Secret.aload(self.key_secret)).get()


async def registered_providers() -> dict[str, LlmProvider]:
    """Every registered provider by name, read from the Prefect API."""
    return await registered(LlmProvider)


# how old the provider table a process holds may get before it is read again from Prefect's blocks
PROVIDERS_TTL_SECONDS = 5.0


class ProviderTable:
    """The registered providers and their keys (in memory only), as one process knows them.

    Read from Prefect at the first call; after that, a call that finds the table older than
    PROVIDERS_TTL_SECONDS starts a re-read in the background and goes on with the table it has, so no
    call waits on Prefect (reading blocks and secrets inline cost a call 300-800 ms every 5 s).
    """

    def __init__(self) -> None:
        self.providers: dict[str, LlmProvider] = {}
        self.keys: dict[str, str | None] = {}
        self._read_at = float("-inf")
        self._reading: asyncio.Task | None = None

    async def current(self) -> dict[str, LlmProvider]:
        if self._read_at == float("-inf"):
            await self._read()
        elif time.monotonic() - self._read_at > PROVIDERS_TTL_SECONDS and self._reading is None:
            self._reading = asyncio.create_task(self._read())
        return self.providers

    async def serving(self, model: str, kind: str | None = None) -> list[tuple[str, LlmProvider]]:
        """The providers of `model` (of that wire `kind`, when given) in failover order (`route`). For a model the
        table does not know, which may be a provider registered a moment ago, the table is read again at once
        unless it is younger than a second."""
        targets = route(await self.current(), model, kind)
        if not targets and time.monotonic() - self._read_at > 1.0:
            await self._read()
            targets = route(self.providers, model, kind)
        return targets

    async def _read(self) -> None:
        try:
            providers = await registered_providers()
            keys = {name: await p.aload_key() for name, p in providers.items()}
            self.providers, self.keys, self._read_at = providers, keys, time.monotonic()
        except Exception:  # noqa: BLE001 - Prefect unreachable: the table held goes on serving
            if self._read_at == float("-inf"):
                raise
            log.exception("could not re-read the LLM providers from Prefect; using the table read before")
            self._read_at = time.monotonic()
        finally:
            self._reading = None


# the process's table: the API's drop-in calls and the holds of llm_proxy jobs read it
TABLE = ProviderTable()


def route(providers: dict[str, LlmProvider], model: str, kind: str | None = None) -> list[tuple[str, LlmProvider]]:
    """The providers serving `model` (of that wire `kind`, when given), in failover order."""
    serving = [(name, p) for name, p in providers.items() if model in p.models and kind in (None, p.kind)]
    return sorted(serving, key=lambda item: (item[1].priority, item[0]))


def hold_usd(targets: list[tuple[str, LlmProvider]], request_bytes: int, max_tokens: int) -> float:
    """What a call to any of `targets` (failover may reach each) holds of its project's LLM budget."""
    return max((p.most_cost(request_bytes, max_tokens) for _, p in targets), default=0.0)


async def hold_for_job(job_input) -> float:
    """An llm_proxy job's hold (JobType.usd_hold): its call's most possible cost at any provider it may reach."""
    from kiln.errors import InputInvalid

    targets = await TABLE.serving(job_input.model)
    if job_input.provider is not None:
        targets = [(n, p) for n, p in targets if n == job_input.provider]
    if not targets:
        raise InputInvalid(f"input.model: {job_input.model!r} is served by no registered provider"
                           + (f" named {job_input.provider!r}" if job_input.provider else "")
                           + "; `kiln llm providers list` shows them")  # fmt: skip
    request = job_input.model_dump_json(include={"messages", "system", "tools"})
    return hold_usd(targets, len(request.encode()), job_input.max_tokens)
