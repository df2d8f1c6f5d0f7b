"""LLM endpoints: the registered providers, and drop-in OpenAI and Anthropic APIs that stream straight to them.

`POST /api/v1/llm/openai/v1/chat/completions` and `POST /api/v1/llm/anthropic/v1/messages` take the
official SDKs unmodified (base_url and the kiln key changed): the call goes from the API process to the
provider with no Prefect dispatch on its path, its bytes pass through as the provider sent them, and once
it has ended it is recorded, off the response's path, as a completed (or failed) `llm_proxy` job of the
caller's project.

Failures, said plainly:
- before the first byte (connection, timeout, 408/409/429/5xx), the call fails over to the model's next
  provider; a 4xx that is the request's own fault is answered as the provider gave it;
- after the first byte nothing is re-sent: the stream ends with an error in the client's own protocol
  (a chunk with `error`; Anthropic's `event: error`), the partial text is kept, and the job fails with a
  reason naming the provider and what happened (`upstream_midstream`).

These routes speak the providers' wire formats and error bodies, not kiln's ErrorBody contract, so they are
left out of the OpenAPI document (and so of its schemathesis run); the README documents them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from functools import partial
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.blocks.llm import TABLE, hold_usd, registered_providers, route
from kiln.errors import InputInvalid, InvalidRequest, QuotaExceeded, RateLimited, ServerError, Unauthorized
from kiln.schemas.llm_proxy import LlmUsage
from kiln.schemas.statuses import JobStatus
from kiln.store import llm as llm_money
from kiln.store.models import utcnow
from kiln.store.store import Caller, hash_key
from kiln.tasks.llm.wire import CallRecord, Kind, SseParser, error_body, stream_error

log = logging.getLogger("kiln.llm")

JOB_TYPE = "llm_proxy"
# statuses after which the next provider of the model is tried: the provider's trouble, not the request's
FAILOVER_STATUSES = {408, 409, 429} | set(range(500, 600))
# the input fields a call's job records, per protocol (never headers: the key is in none of them)
RECORDED_FIELDS = ("model", "messages", "system", "max_tokens", "max_completion_tokens", "temperature", "stream",
                   "tools", "tool_choice", "stop", "top_p")  # fmt: skip

router = APIRouter(prefix="/api/v1/llm")


class ProviderError(Exception):
    """An answer in the provider's own error format (the drop-in routes' ErrorBody)."""

    def __init__(self, kind: Kind, status: int, message: str, error_type: str, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.kind, self.status, self.message, self.error_type, self.code = kind, status, message, error_type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = error_body(self.kind, self.message, self.error_type, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Gateway:
    """The API process's side of LLM calls: one HTTP client for every provider, and recording them as jobs
    (the provider table is kiln.blocks.llm.TABLE)."""

    def __init__(self, store, prefect) -> None:
        self.store, self.prefect = store, prefect
        # one pooled client for the process: no per-call client, connection or TLS setup
        self.http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        self._recording: set[asyncio.Task] = set()

    async def close(self) -> None:
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)
        await self.http.aclose()

    def record(self, **call: Any) -> None:
        """Records a finished call as a job, off the response's path."""
        task = asyncio.create_task(self._record(**call))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _record(self, *, job_id: str, caller: Caller, job_input: dict, output: dict, failed: str | None,
                      started, ended, held_usd: float) -> None:  # fmt: skip
        try:
            # the hold rides on the job until its end settles it to the call's cost (kiln.store.llm)
            await self.store.add_job(job_id=job_id, project_id=caller.project_id, type=JOB_TYPE, input=job_input,
                                     resources={}, status=JobStatus.RUNNING, at=started, held_usd=held_usd,
                                     key_prefix=caller.key_prefix)  # fmt: skip
            if failed is None:
                await self.store.transition(job_id, JobStatus.COMPLETED, output=output, at=ended)
            else:
                # a failed call keeps what it said: the partial text, usage as far as reported
                await self.store.transition(job_id, JobStatus.FAILED, reason=failed, output=output, at=ended)
            await self._show_in_prefect(job_id, caller, job_input, output, failed)
        except Exception:  # noqa: BLE001 - the call was answered; a lost record is logged, never raised
            log.exception("could not record LLM call %s as a job", job_id)

    async def _show_in_prefect(self, job_id: str, caller: Caller, job_input: dict, output: dict,
                               failed: str | None) -> None:  # fmt: skip
        """The call as a flow run of the llm_proxy flow, made after it ended, in its final state: the Prefect UI
        shows it beside every other job. The job is already final, so the relay takes nothing from it."""
        from prefect.states import Completed, Failed

        from kiln.dispatch.runs import job_tags
        from kiln.registry import job_types

        job = await self.store.get_job(job_id)
        summary = (f"{output['provider']}: {output['tokens']['input'] + output['tokens']['cache_read']} tokens in, "
                   f"{output['tokens']['output']} out, ${output['cost_usd']:.6f}, {output['latency_s']:.3f} s")  # fmt: skip
        run = await self.prefect.create_flow_run(
            job_types()[JOB_TYPE].flow,
            name=f"{JOB_TYPE}-{job_id[:8]}",
            parameters={"input": job_input},
            tags=[*job_tags(job, await self.store.project_name(caller.project_id)), "llm-call"],
            state=Failed(message=failed) if failed else Completed(message=summary),
        )
        await self.store.record_flow_run(job_id, str(run.id))


async def llm_caller(request: Request) -> Caller:
    """The caller (project, key, limits) from the kiln key, sent as the OpenAI SDK sends keys (Authorization:
    Bearer) or as the Anthropic SDK does (x-api-key)."""
    kind: Kind = "anthropic" if "/anthropic/" in request.url.path else "openai"
    authorization = request.headers.get("authorization", "")
    key = authorization[7:].strip() if authorization[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not key.strip():
        raise ProviderError(kind, 401, "send the kiln API key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'; "
                            "create one with `kiln keys create --project NAME`", "authentication_error")  # fmt: skip
    caller = await request.app.state.store.caller(key.strip())
    if caller is None:
        raise ProviderError(kind, 401, "the kiln API key is unknown or revoked", "authentication_error")
    request.state.key_hash = hash_key(key.strip())
    return caller


LlmCaller = Annotated[Caller, Depends(llm_caller)]


# the registered providers, in kiln's own contract


@router.get("/providers", summary="The registered LLM providers (Prefect blocks); keys are never shown",
            responses=error_responses(Unauthorized, ServerError))  # fmt: skip
async def list_providers(project_id: Annotated[str, Depends(project_of_caller)]) -> list[dict]:
    providers = await registered_providers()
    return [providers[name].summary(name) for name in sorted(providers)]


TIME = {"format": "date-time", "examples": ["2026-11-30T00:00:00Z"]}


@router.get("/usage", summary="The project's LLM calls in a period, per model or per API key, and its budget",
            response_model=LlmUsage, response_model_by_alias=True,
            responses=error_responses(InvalidRequest, InputInvalid, Unauthorized, ServerError))  # fmt: skip
async def llm_usage(
    request: Request,
    project_id: Annotated[str, Depends(project_of_caller)],
    start: Annotated[str | None, Query(alias="from", description="Calls ended at or after this time (ISO 8601).",
                                       json_schema_extra=TIME)] = None,  # fmt: skip
    end: Annotated[str | None, Query(alias="to", description="Calls ended before this time (ISO 8601).",
                                     json_schema_extra=TIME)] = None,  # fmt: skip
    group_by: Annotated[Literal["model", "key"], Query(description="Sum per model or per API key.")] = "model",
) -> LlmUsage:
    since, until = _moment("from", start), _moment("to", end)
    if since is not None and until is not None and until < since:
        raise InvalidRequest(f"to: {end} is before from ({start})")
    report = await llm_money.usage(request.app.state.store, project_id, since, until, group_by)
    return LlmUsage(start=since, end=until, group_by=group_by, **report)


def _moment(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 date-time of a query parameter, in UTC (one without a zone is taken as UTC); no other form."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.upper())
    except ValueError:
        raise InputInvalid(f"{name}: {value!r} is not an ISO 8601 date-time such as 2026-11-30T00:00:00Z") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# the drop-in APIs


@router.get("/openai/v1/models", include_in_schema=False)
async def openai_models(request: Request, caller: LlmCaller) -> dict:
    served = await _served(request, "openai")
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": name}
                                       for m, name in served]}  # fmt: skip


@router.get("/anthropic/v1/models", include_in_schema=False)
async def anthropic_models(request: Request, caller: LlmCaller) -> dict:
    served = await _served(request, "anthropic")
    data = [{"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"} for m, _ in served]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}  # fmt: skip


async def _served(request: Request, kind: Kind) -> list[tuple[str, str]]:
    """(model, its first provider) for every model a provider of that protocol serves."""
    providers = await TABLE.current()
    models = sorted({m for p in providers.values() if p.kind == kind for m in p.models})
    return [(m, route(providers, m, kind)[0][0]) for m in models]


@router.post("/openai/v1/chat/completions", include_in_schema=False)
async def openai_chat(request: Request, caller: LlmCaller) -> Response:
    return await _call(request, caller, "openai")


@router.post("/anthropic/v1/messages", include_in_schema=False)
async def anthropic_messages(request: Request, caller: LlmCaller) -> Response:
    return await _call(request, caller, "anthropic")


async def _call(request: Request, caller: Caller, kind: Kind) -> Response:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ProviderError(kind, 400, "the request body is not JSON", "invalid_request_error") from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise ProviderError(kind, 400, "model: a string naming the model is required", "invalid_request_error")
    gateway: Gateway = request.app.state.llm
    targets = await TABLE.serving(body["model"], kind)
    if not targets:
        raise ProviderError(kind, 404, f"model: {body['model']!r} is served by no registered {kind} provider; "
                            f"`kiln llm providers list` shows them", "not_found_error", "model_not_found")  # fmt: skip
    call = _Call(gateway, caller, kind, body, request.headers)
    state = request.app.state
    try:
        if caller.llm_calls_per_minute is not None:
            state.rate_limiter.take(request.state.key_hash, "LLM calls", caller.llm_calls_per_minute)
        if caller.llm_tokens_per_minute is not None:
            state.rate_limiter.take(request.state.key_hash, "LLM tokens", caller.llm_tokens_per_minute, amount=0)
            call.count_tokens = partial(state.rate_limiter.spend, request.state.key_hash, "LLM tokens")
    except RateLimited as exc:
        raise ProviderError(kind, 429, exc.message, "rate_limit_error", "rate_limit_exceeded",
                            headers={"Retry-After": str(exc.retry_after)}) from None  # fmt: skip
    if caller.llm_budgeted:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ProviderError(kind, 400, "max_tokens: a positive integer is required when the project has an LLM "
                                "budget: a call holds max_tokens × price of it until it ends", "invalid_request_error")  # fmt: skip
        choices = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 1 else 1  # OpenAI's n answers
        call.held_usd = hold_usd(targets, len(call.payload), max_tokens * choices)
        try:
            await llm_money.hold_for_call(state.store, caller.project_id, call.held_usd)
        except QuotaExceeded as exc:
            raise ProviderError(kind, 402, exc.message, "insufficient_quota" if kind == "openai" else "billing_error",
                                "insufficient_quota") from None  # fmt: skip
    return await call.run(targets)


class _Call:
    """One proxied call: its failover over the model's providers, its stream, and its record."""

    def __init__(self, gateway: Gateway, caller: Caller, kind: Kind, body: dict, headers) -> None:
        self.gateway, self.caller, self.kind = gateway, caller, kind
        self.job_id = str(uuid.uuid4())
        self.started_at = utcnow()
        self.held_usd = 0.0
        # counts the call's tokens against its key's tokens per minute, once it has used them
        self.count_tokens = None
        self.stream = bool(body.get("stream"))
        self.job_input = {"protocol": kind, **{k: body[k] for k in RECORDED_FIELDS if k in body}}
        self.record = CallRecord(kind)
        self.attempts: list[str] = []
        # the client did not ask for usage: kiln asks (it prices every call) and keeps the usage-only chunk to itself
        self.withhold_usage = False
        if kind == "openai" and self.stream and not (body.get("stream_options") or {}).get("include_usage"):
            body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
            self.withhold_usage = True
        self.payload = json.dumps(body).encode()
        self.version = headers.get("anthropic-version", "2023-06-01")
        self.beta = headers.get("anthropic-beta")

    def _headers(self, name: str) -> dict[str, str]:
        key = TABLE.keys.get(name)
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if self.kind == "anthropic":
            headers["anthropic-version"] = self.version
            if self.beta:
                headers["anthropic-beta"] = self.beta
            if key:
                headers["x-api-key"] = key
        elif key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def run(self, targets) -> Response:
        last: tuple[int, bytes, str] | None = None
        for name, provider in targets:
            request = self.gateway.http.build_request("POST", provider.url("chat"), content=self.payload,
                                                      headers=self._headers(name),
                                                      timeout=httpx.Timeout(provider.timeout_seconds))  # fmt: skip
            try:
                upstream = await self.gateway.http.send(request, stream=True)
            except httpx.HTTPError as exc:
                self.attempts.append(f"provider {name!r}: {_what(exc)}")
                continue
            if upstream.status_code != 200:
                content = await _read_or_empty(upstream)
                self.attempts.append(f"provider {name!r}: answered {upstream.status_code}")
                last = (upstream.status_code, content, upstream.headers.get("content-type", "application/json"))
                if upstream.status_code in FAILOVER_STATUSES:
                    continue
                return self._answer_error(name, *last)
            if not self.stream:
                try:
                    content = await upstream.aread()
                except httpx.HTTPError as exc:
                    self.attempts.append(f"provider {name!r}: {_what(exc)} while sending its answer")
                    continue
                finally:
                    await upstream.aclose()
                return self._answer(name, provider, content, upstream.headers.get("content-type", "application/json"))
            chunks = upstream.aiter_bytes()
            try:
                first = await chunks.__anext__()
            except (httpx.HTTPError, StopAsyncIteration) as exc:
                await upstream.aclose()
                what = "closed the stream before its first byte" if isinstance(exc, StopAsyncIteration) else _what(exc)
                self.attempts.append(f"provider {name!r}: {what}")
                continue
            return StreamingResponse(self._relay(name, provider, upstream, first, chunks),
                                     media_type=upstream.headers.get("content-type", "text/event-stream"),
                                     headers={"x-kiln-job-id": self.job_id, "cache-control": "no-cache"})  # fmt: skip
        tried = "; ".join(self.attempts)
        self._finish(None, None, f"no provider answered: {tried}")
        if last is not None:
            return Response(last[1], status_code=last[0], media_type=last[2], headers={"x-kiln-job-id": self.job_id})
        raise ProviderError(self.kind, 502, f"no provider of {self.job_input['model']!r} answered: {tried}",
                            "api_error", "upstream_unavailable")  # fmt: skip

    def _answer_error(self, name: str, status: int, content: bytes, media_type: str) -> Response:
        self._finish(name, None, f"provider {name!r} refused the request with {status}: "
                                 f"{content[:300].decode('utf-8', 'replace')}")  # fmt: skip
        return Response(content, status_code=status, media_type=media_type, headers={"x-kiln-job-id": self.job_id})

    def _answer(self, name: str, provider, content: bytes, media_type: str) -> Response:
        try:
            self.record.read_response(json.loads(content))
            failed = None
        except ValueError:
            failed = f"provider {name!r} answered 200 with a body that is not JSON"
        self._finish(name, provider, failed)
        return Response(content, status_code=200, media_type=media_type, headers={"x-kiln-job-id": self.job_id})

    async def _relay(self, name: str, provider, upstream: httpx.Response, first: bytes, chunks):
        """The stream as the provider sends it, event by event; its end, or an error in the client's protocol."""
        parser = SseParser()
        failed, relayed = None, False
        try:
            data = first
            while True:
                out = []
                for raw, event, text in parser.feed(data):
                    try:
                        self.record.read_event(event, text)
                    except ValueError:
                        failed = f"sent a malformed chunk after {self.record.chunks} chunks"
                        break
                    if self.withhold_usage and _usage_only(text):
                        continue
                    out.append(raw)
                if out:
                    yield b"".join(out)
                if failed:
                    break
                try:
                    data = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except httpx.HTTPError as exc:
                    failed = f"{_what(exc)} after {self.record.chunks} chunks"
                    break
            if failed is None and not self.record.finished and self.record.error is None:
                failed = f"ended the stream after {self.record.chunks} chunks without its end " + (
                    "([DONE])" if self.kind == "openai" else "(message_stop)")
            if failed is not None:
                yield stream_error(self.kind, f"kiln: provider {name!r} {failed}; the partial answer was kept and "
                                              f"nothing was re-sent (job {self.job_id})", "upstream_midstream")  # fmt: skip
            relayed = True
        finally:
            await upstream.aclose()
            if failed is None and self.record.error is not None:
                failed = f"sent an error in the stream: {self.record.error[:300]}"
            elif failed is None and not relayed and not self.record.finished:
                # not once the end marker has passed: the OpenAI SDK hangs up at [DONE], often before the provider
                # has closed its stream, and that call is whole
                failed = f"stopped: the client went away after {self.record.chunks} chunks"
            self._finish(name, provider, f"provider {name!r} {failed} (upstream_midstream)" if failed else None)

    def _finish(self, name: str | None, provider, failed: str | None) -> None:
        ended = time.perf_counter()
        output = {
            "model": self.job_input["model"],
            "text": self.record.text,
            "tool_calls": self.record.tool_calls,
            "stop_reason": self.record.stop_reason,
            "usage": self.record.usage,
            "tokens": self.record.tokens,
            "cost_usd": provider.cost(self.record.tokens) if provider is not None else 0.0,
            "provider": name,
            "partial": failed is not None and bool(self.record.text or self.record.tool_calls),
            "attempts": self.attempts,
            **self.record.timing(ended),
        }
        if self.count_tokens is not None:
            self.count_tokens(sum(self.record.tokens.values()))
        self.gateway.record(job_id=self.job_id, caller=self.caller, job_input=self.job_input, output=output,
                            failed=failed, started=self.started_at, ended=utcnow(),
                            held_usd=self.held_usd)  # fmt: skip


def _usage_only(data: str) -> bool:
    """An OpenAI chunk that carries only the usage kiln asked for (no choices)."""
    return data.startswith("{") and '"usage"' in data and '"choices":[]' in data.replace(" ", "")


def _what(exc: httpx.HTTPError) -> str:
    """What went wrong with the provider, in words: 'timed out (ReadTimeout)', 'broke the connection (…)'."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"could not be reached ({exc or type(exc).__name__})"
    return f"broke the connection ({type(exc).__name__}: {exc})"


async def _read_or_empty(upstream: httpx.Response) -> bytes:
    try:
        return await upstream.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await upstream.aclose()


def install(app: FastAPI) -> None:
    """Adds the LLM routes and their provider-format errors to the app."""

    @app.exception_handler(ProviderError)
    async def provider_error(request: Request, exc: ProviderError) -> JSONResponse:
        return exc.response()

    app.include_router(router)
