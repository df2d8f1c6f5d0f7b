"""The llm_proxy job's executor: one call to the model's providers, failing over before the first byte."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from kiln.blocks.llm import registered_providers, route
from kiln.runtime import DELTA_EVENT, TextEvents
from kiln.schemas.llm_proxy import LlmProxyInput
from kiln.tasks.executor import executor
from kiln.tasks.llm.wire import CallRecord, SseParser

FAILOVER_STATUSES = {408, 409, 429} | set(range(500, 600))

# one pooled client per worker process, as in the API
_http: httpx.AsyncClient | None = None


def _client() -> httpx.AsyncClient:
    global _http
    if _http is None:
        _http = httpx.AsyncClient(timeout=None)
    return _http


def request_body(kind: str, job_input: LlmProxyInput) -> dict[str, Any]:
    """The call in the provider's own format."""
    body: dict[str, Any] = {"model": job_input.model, "max_tokens": job_input.max_tokens,
                            "temperature": job_input.temperature, "stream": job_input.stream}  # fmt: skip
    messages = list(job_input.messages)
    if kind == "anthropic":
        if job_input.system is not None:
            body["system"] = job_input.system
    elif job_input.system is not None:
        messages.insert(0, {"role": "system", "content": job_input.system})
    if kind == "openai" and job_input.stream:
        body["stream_options"] = {"include_usage": True}
    if job_input.tools is not None:
        body["tools"] = job_input.tools
    return {**body, "messages": messages}


@executor(name="llm-call")
async def call_llm(job_input: LlmProxyInput) -> dict[str, Any]:
    """Calls the model's providers in failover order; after the first byte nothing is re-sent."""
    providers = await registered_providers()
    targets = route(providers, job_input.model)
    if job_input.provider is not None:
        targets = [(n, p) for n, p in targets if n == job_input.provider]
    if not targets:
        raise ValueError(f"model: {job_input.model!r} is served by no registered provider"
                         + (f" named {job_input.provider!r}" if job_input.provider else ""))  # fmt: skip
    attempts = []
    for name, provider in targets:
        key = await provider.aload_key()
        headers = {"content-type": "application/json"}
        if provider.kind == "anthropic":
            headers["anthropic-version"] = "2023-06-01"
            if key:
                headers["x-api-key"] = key
        elif key:
            headers["authorization"] = f"Bearer {key}"
        record = CallRecord(provider.kind)
        body = json.dumps(request_body(provider.kind, job_input)).encode()
        request = _client().build_request("POST", provider.url("chat"), content=body, headers=headers,
                                          timeout=httpx.Timeout(provider.timeout_seconds))  # fmt: skip
        try:
            response = await _client().send(request, stream=True)
        except httpx.HTTPError as exc:
            attempts.append(f"provider {name!r}: {type(exc).__name__}")
            continue
        try:
            if response.status_code != 200:
                detail = (await response.aread())[:300].decode("utf-8", "replace")
                attempts.append(f"provider {name!r}: answered {response.status_code}: {detail}")
                if response.status_code in FAILOVER_STATUSES:
                    continue
                raise RuntimeError("; ".join(attempts))
            if not job_input.stream:
                record.read_response(json.loads(await response.aread()))
            else:
                await _read_stream(name, response, record)
        finally:
            await response.aclose()
        return {"model": job_input.model, "text": record.text, "tool_calls": record.tool_calls, "stop_reason": record.stop_reason,
                "usage": record.usage, "tokens": record.tokens, "cost_usd": provider.cost(record.tokens),
                "provider": name, "attempts": attempts, **record.timing(time.perf_counter())}  # fmt: skip
    raise RuntimeError(f"no provider of {job_input.model!r} answered: {'; '.join(attempts)}")


async def _read_stream(name: str, response: httpx.Response, record: CallRecord) -> None:
    parser, deltas = SseParser(), TextEvents(DELTA_EVENT, lambda text: {"text": text})
    try:
        async for data in response.aiter_bytes():
            for _, event, text in parser.feed(data):
                before = len(record.text)
                record.read_event(event, text)
                if len(record.text) > before:
                    deltas.add(record.text[before:])
    except (httpx.HTTPError, ValueError) as exc:
        deltas.flush()
        raise RuntimeError(f"provider {name!r} broke the stream after {record.chunks} chunks ({type(exc).__name__}); "
                           f"nothing was re-sent (upstream_midstream). Partial text: {record.text[:200]!r}") from None
    deltas.flush()
    if record.error is not None:
        raise RuntimeError(f"provider {name!r} sent an error in the stream: {record.error[:300]}")
    if not record.finished:
        raise RuntimeError(f"provider {name!r} ended the stream after {record.chunks} chunks without its end "
                           f"(upstream_midstream). Partial text: {record.text[:200]!r}")
