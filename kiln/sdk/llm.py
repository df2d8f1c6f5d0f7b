"""`client.llm`: chat() with any model a registered provider serves, and the official OpenAI and Anthropic clients
pointed at kiln's drop-in routes.

chat() is built on those official clients. It asks GET /api/v1/llm/providers (once per client, again for a model
not yet listed) which protocol the model's first provider speaks, and calls kiln's drop-in route of that protocol,
so the call is recorded as an llm_proxy job like any other. The official SDKs are imported when first used (each
takes a second or two), and their errors become kiln's (kiln.errors) at one place, `_kiln_error`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, Field

from kiln.errors import KilnError, NotFound, ServerError, error_for_status

if TYPE_CHECKING:
    import anthropic
    import openai

Protocol = Literal["openai", "anthropic"]

# chat()'s max_tokens unless told, as the llm_proxy job's; Anthropic requires one
DEFAULT_MAX_TOKENS = 1024
# the header of every drop-in answer that names the call's llm_proxy job
JOB_HEADER = "x-kiln-job-id"
# the status given to an error that arrives inside a stream, after its 200: the provider failed behind kiln
MIDSTREAM_STATUS = 502


class ChatResult(BaseModel):
    """A whole answer of `chat(…, stream=False)`; str() of it is its text."""

    text: str = Field(description="The answer's text (an Anthropic answer's text blocks joined).")
    stop_reason: str | None = Field(
        description="Why it ended, in the protocol's words: 'stop', 'length' (OpenAI); 'end_turn', 'max_tokens' "
        "(Anthropic)."
    )
    usage: dict[str, Any] = Field(description="The token usage as the provider reported it, in its protocol's names.")
    job_id: str | None = Field(description="The llm_proxy job that records the call, with its tokens and cost.")

    def __str__(self) -> str:
        return self.text


# the protocols, without I/O: both clients read and build their calls here


def drop_in_url(kiln_url: str, protocol: Protocol) -> str:
    """kiln's drop-in route of the protocol, as its SDK takes base_url (OpenAI's includes the /v1)."""
    return f"{kiln_url.rstrip('/')}/api/v1/llm/{protocol}" + ("/v1" if protocol == "openai" else "")


def _serves(providers: list[dict[str, Any]] | None, model: str) -> bool:
    return providers is not None and any(model in p["models"] for p in providers)


def protocol_of(providers: list[dict[str, Any]], model: str) -> Protocol:
    """The protocol of the provider kiln tries first for the model (lowest priority, then name)."""
    serving = sorted((p["priority"], p["name"], p["kind"]) for p in providers if model in p["models"])
    if not serving:
        served = sorted({m for p in providers for m in p["models"]})
        raise NotFound(f"model: {model!r} is served by no registered LLM provider; served: "
                       f"{', '.join(served) or 'none'} (`kiln llm providers list`)")  # fmt: skip
    return serving[0][2]


def chat_arguments(
    protocol: Protocol,
    model: str,
    messages: list[dict[str, Any]],
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The keyword arguments of the protocol's create(): the system prompt is Anthropic's `system`, or OpenAI's
    first message; an unset temperature is left to the provider."""
    arguments: dict[str, Any] = {"model": model, "max_tokens": max_tokens, **options}
    if temperature is not None and protocol == "anthropic":
        # anthropic 2.x's create() has no temperature parameter: it goes in the body, as the llm_proxy job sends it
        arguments["extra_body"] = {**(options.get("extra_body") or {}), "temperature": temperature}
    elif temperature is not None:
        arguments["temperature"] = temperature
    if system is not None and protocol == "anthropic":
        arguments["system"] = system
    elif system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return {**arguments, "messages": list(messages)}


def delta_of(protocol: Protocol, event: Any) -> str:
    """The text a streamed event adds: an OpenAI chunk's delta content, an Anthropic text_delta; '' for others."""
    if protocol == "openai":
        return (event.choices[0].delta.content or "") if event.choices else ""
    if event.type == "content_block_delta" and event.delta.type == "text_delta":
        return event.delta.text
    return ""


def result_of(protocol: Protocol, answer: Any, job_id: str | None) -> ChatResult:
    """The ChatResult of a whole answer as the protocol's SDK parsed it."""
    if protocol == "openai":
        choice = answer.choices[0]
        text, stop_reason = choice.message.content or "", choice.finish_reason
    else:
        text = "".join(block.text for block in answer.content if block.type == "text")
        stop_reason = answer.stop_reason
    usage = answer.usage.model_dump(exclude_none=True) if answer.usage is not None else {}
    return ChatResult(text=text, stop_reason=stop_reason, usage=usage, job_id=job_id)


def _sdk(protocol: Protocol) -> ModuleType:
    """The protocol's official SDK: the package of that name, imported on first use."""
    return importlib.import_module(protocol)


def _kiln_error(protocol: Protocol, exc: Exception, kiln_url: str) -> KilnError:
    """kiln's exception for an error of the official SDK, with the message of the provider-format body."""
    if isinstance(exc, _sdk(protocol).APIConnectionError):
        return ServerError(f"could not reach kiln at {kiln_url}: {exc.message}")
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
    message = body["message"] if isinstance(body, dict) and isinstance(body.get("message"), str) else exc.message
    response = getattr(exc, "response", None)
    if response is None or response.status_code < 400:  # an error event in a stream whose answer was a 200
        return error_for_status(MIDSTREAM_STATUS, message)
    retry_after = int(response.headers.get("retry-after", "1"))
    return error_for_status(response.status_code, message, retry_after=retry_after)


class _LlmBase:
    """What both `client.llm` share: the provider table and the official clients, one per protocol."""

    # the official client class of each protocol, in its SDK
    client_classes: ClassVar[dict[Protocol, str]]

    def __init__(self, kiln_url: str, api_key: str, list_providers: Callable[[], Any]):
        # list_providers: GET /api/v1/llm/providers through the kiln client (a coroutine function for AsyncClient)
        self._kiln_url, self._api_key, self._list_providers = kiln_url, api_key, list_providers
        self._providers: list[dict[str, Any]] | None = None
        self._clients: dict[Protocol, Any] = {}

    def _official(self, protocol: Protocol) -> Any:
        if protocol not in self._clients:
            cls = getattr(_sdk(protocol), self.client_classes[protocol])
            self._clients[protocol] = cls(base_url=drop_in_url(self._kiln_url, protocol), api_key=self._api_key)
        return self._clients[protocol]

    def _endpoint(self, protocol: Protocol) -> Any:
        """Where the protocol's calls are created: OpenAI's chat.completions, Anthropic's messages."""
        client = self._official(protocol)
        return client.chat.completions if protocol == "openai" else client.messages


class Llm(_LlmBase):
    """`client.llm`: chat() with any model a registered provider serves, and the official clients pointed at kiln."""

    client_classes = {"openai": "OpenAI", "anthropic": "Anthropic"}

    def openai(self) -> openai.OpenAI:
        """The official OpenAI client on kiln's drop-in route, with the kiln key; closed with the kiln client.

        `.with_options(timeout=…, max_retries=…)` gives one with other options."""
        return self._official("openai")

    def anthropic(self) -> anthropic.Anthropic:
        """The official Anthropic client on kiln's drop-in route, with the kiln key; closed with the kiln client.

        `.with_options(timeout=…, max_retries=…)` gives one with other options."""
        return self._official("anthropic")

    def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        stream: bool = False,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        **options: Any,
    ) -> ChatResult | Iterator[str]:
        """One call to the model through kiln, recorded as an llm_proxy job: its ChatResult, or with stream=True its
        text deltas as they arrive (`for delta in client.llm.chat(…, stream=True)`).

        `messages` are in the protocol's format ([{"role": "user", "content": "…"}, …]); other keyword arguments
        (stop, top_p, …) go to the official SDK's create() as they are. Raises NotFound for a model no provider
        serves, and kiln's other exceptions for an error kiln or the provider answered, also in mid-stream.
        """
        protocol = self._protocol(model)
        arguments = chat_arguments(protocol, model, messages, system, max_tokens, temperature, options)
        return self._deltas(protocol, arguments) if stream else self._answer(protocol, arguments)

    def _protocol(self, model: str) -> Protocol:
        if not _serves(self._providers, model):  # a provider may have been added since they were read
            self._providers = self._list_providers()
        return protocol_of(self._providers, model)

    def _answer(self, protocol: Protocol, arguments: dict[str, Any]) -> ChatResult:
        try:
            raw = self._endpoint(protocol).with_raw_response.create(**arguments)
            return result_of(protocol, raw.parse(), raw.headers.get(JOB_HEADER))
        except _sdk(protocol).APIError as exc:
            raise _kiln_error(protocol, exc, self._kiln_url) from exc

    def _deltas(self, protocol: Protocol, arguments: dict[str, Any]) -> Iterator[str]:
        try:
            with self._endpoint(protocol).create(**arguments, stream=True) as events:
                for event in events:
                    if text := delta_of(protocol, event):
                        yield text
        except _sdk(protocol).APIError as exc:
            raise _kiln_error(protocol, exc, self._kiln_url) from exc

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


class AsyncLlm(_LlmBase):
    """`client.llm` of AsyncClient: chat() with any model a registered provider serves, and the official async
    clients pointed at kiln."""

    client_classes = {"openai": "AsyncOpenAI", "anthropic": "AsyncAnthropic"}

    def openai(self) -> openai.AsyncOpenAI:
        """The official async OpenAI client on kiln's drop-in route, with the kiln key; closed with the kiln client.

        `.with_options(timeout=…, max_retries=…)` gives one with other options."""
        return self._official("openai")

    def anthropic(self) -> anthropic.AsyncAnthropic:
        """The official async Anthropic client on kiln's drop-in route, with the kiln key; closed with the kiln
        client.

        `.with_options(timeout=…, max_retries=…)` gives one with other options."""
        return self._official("anthropic")

    def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        stream: bool = False,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        **options: Any,
    ) -> Awaitable[ChatResult] | AsyncIterator[str]:
        """One call to the model through kiln, recorded as an llm_proxy job: `await client.llm.chat(…)` for its
        ChatResult, or with stream=True its text deltas as they arrive (`async for delta in client.llm.chat(…)`).

        Arguments and errors as Client's `llm.chat`.
        """
        request = (model, messages, system, max_tokens, temperature, options)
        return self._deltas(*request) if stream else self._answer(*request)

    async def _protocol(self, model: str) -> Protocol:
        if not _serves(self._providers, model):  # a provider may have been added since they were read
            self._providers = await self._list_providers()
        return protocol_of(self._providers, model)

    # `request`: the rest of chat_arguments' arguments, after the model
    async def _answer(self, model: str, *request: Any) -> ChatResult:
        protocol = await self._protocol(model)
        arguments = chat_arguments(protocol, model, *request)
        try:
            raw = await self._endpoint(protocol).with_raw_response.create(**arguments)
            answer = raw.parse()
            if inspect.isawaitable(answer):  # Anthropic's async raw answer parses in a coroutine, OpenAI's does not
                answer = await answer
            return result_of(protocol, answer, raw.headers.get(JOB_HEADER))
        except _sdk(protocol).APIError as exc:
            raise _kiln_error(protocol, exc, self._kiln_url) from exc

    async def _deltas(self, model: str, *request: Any) -> AsyncIterator[str]:
        protocol = await self._protocol(model)
        arguments = chat_arguments(protocol, model, *request)
        try:
            async with await self._endpoint(protocol).create(**arguments, stream=True) as events:
                async for event in events:
                    if text := delta_of(protocol, event):
                        yield text
        except _sdk(protocol).APIError as exc:
            raise _kiln_error(protocol, exc, self._kiln_url) from exc

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
