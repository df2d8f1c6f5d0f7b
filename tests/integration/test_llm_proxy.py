"""LLM calls through kiln's drop-in endpoints, made with the official SDKs against real providers on loopback.

The providers: llmock (PyPI) started here, once healthy, once answering 503 to everything (failover), once
truncating every stream; and tests/llm_golden.py, which replays golden byte streams of both protocols.
Every call must come back as the provider sent it and be recorded as an llm_proxy job; the provider keys
must appear nowhere kiln writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.integration.support import HOME, JOB_TYPE_TESTS, SETTINGS, free_port, wait_until
from tests.llm_golden import ANTHROPIC_FINAL_USAGE, OPENAI_USAGE, golden_stream

pytestmark = [pytest.mark.integration, JOB_TYPE_TESTS]

KEY = f"sk-kiln-test-{uuid.uuid4().hex}"  # the providers' key: it must never come back out of kiln
# llmock's console script, run by this interpreter (its script may sit in another bin than sys.executable's)
LLMOCK = [sys.executable, "-c", "from llmock.cli import app; app()"]
MESSAGES = [{"role": "user", "content": "What is BaTiO3?"}]


def _serve(argv: list[str], port: int, probe: str) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            return httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=10) is not None
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=180, what=f"the provider on port {port}")
    except AssertionError:
        process.terminate()
        raise
    return process


def _llmock(*options: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [*LLMOCK, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *options]
    return _serve(argv, port, "/v1/models"), port


def _add_provider(name: str, *options: str) -> None:
    subprocess.run([sys.executable, "-m", "kiln.cli", "llm", "providers", "add", name, "--key-env", "LLM_TEST_KEY",
                    "--overwrite", *options], check=True, capture_output=True, env={**os.environ, "LLM_TEST_KEY": KEY})  # fmt: skip


# once per session: test_llm_sdk uses them too, and a provider re-registered under its name at a new port would
# reach the API's provider table only at its next background re-read
@pytest.fixture(scope="session")
def providers(stack):
    started = []
    healthy, port = _llmock()
    started.append(healthy)
    try:
        yield from _registered(port, started)
    finally:
        for process in started:
            process.terminate()
            process.wait(10)


def _registered(port: int, started: list):
    down, down_port = _llmock("--error-rate", "503=1.0")
    started.append(down)
    cutting, cut_port = _llmock("--stream-fault", "truncate=1.0")
    started.append(cutting)
    # slow enough that 20 concurrent calls all hold their share of a budget before the first has ended
    slow, slow_port = _llmock("--latency-ms", "4000")
    started.append(slow)
    golden_port = free_port()
    started.append(_serve([sys.executable, "-m", "tests.llm_golden", str(golden_port), KEY], golden_port, "/"))
    prices = ["--input-price", "1", "--output-price", "2", "--cache-read-price", "0.1", "--cache-write-price", "1.25"]
    _add_provider("mock-down", "--kind", "openai", "--base-url", f"http://127.0.0.1:{down_port}/v1",
                  "--model", "mock-gpt", "--priority", "0")  # fmt: skip
    _add_provider("mock-openai", "--kind", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                  "--model", "mock-gpt", "--priority", "1", *prices)  # fmt: skip
    _add_provider("mock-anthropic", "--kind", "anthropic", "--base-url", f"http://127.0.0.1:{port}/anthropic",
                  "--model", "mock-claude", *prices)  # fmt: skip
    _add_provider("mock-cut", "--kind", "openai", "--base-url", f"http://127.0.0.1:{cut_port}/v1",
                  "--model", "mock-cut")  # fmt: skip
    _add_provider("mock-slow", "--kind", "openai", "--base-url", f"http://127.0.0.1:{slow_port}/v1",
                  "--model", "mock-slow", *prices)  # fmt: skip
    for kind in ("openai", "anthropic"):
        base = f"http://127.0.0.1:{golden_port}/{kind}" + ("/v1" if kind == "openai" else "")
        _add_provider(f"golden-{kind}", "--kind", kind, "--base-url", base, "--model", "golden",
                      "--model", "golden-cut", "--model", "golden-error", "--model", "golden-linger",
                      *prices)  # fmt: skip
    yield


@pytest.fixture(scope="module")
def oai(providers, api_key):
    with openai.OpenAI(base_url=f"{SETTINGS.api_url}/api/v1/llm/openai/v1", api_key=api_key, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def claude(providers, api_key):
    with anthropic.Anthropic(base_url=f"{SETTINGS.api_url}/api/v1/llm/anthropic", api_key=api_key,
                             max_retries=0) as c:  # fmt: skip
        yield c


def parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def recorded(http, job_id: str, status: str = "completed") -> dict:
    """The call's job, once the API has recorded it."""

    def ended():
        response = http.get(f"/api/v1/jobs/{job_id}")
        return response.json() if response.status_code == 200 and response.json()["status"] != "running" else None

    job = wait_until(ended, timeout=10, what=f"LLM call {job_id} to be recorded")
    assert job["type"] == "llm_proxy" and job["status"] == status, job
    # recorded after its end as a job that ran from the call's start
    assert job["created_at"] == job["started_at"] and parse(job["started_at"]) <= parse(job["completed_at"]), job
    return job


def test_the_providers_are_listed_without_their_keys(providers, http):
    listed = http.get("/api/v1/llm/providers").json()
    names = [p["name"] for p in listed]
    assert {"mock-openai", "mock-anthropic", "golden-openai"} <= set(names)
    assert all(p["key_secret"] == f"kiln-llm-{p['name']}-key" for p in listed)
    assert KEY not in json.dumps(listed)
    assert http.get("/api/v1/llm/providers", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_models_are_listed_in_each_protocol(oai, claude):
    assert {"mock-gpt", "golden"} <= {m.id for m in oai.models.list()}
    assert {"mock-claude", "golden"} <= {m.id for m in claude.models.list()}


def test_openai_sdk_fails_over_before_the_first_byte_and_the_call_is_a_completed_job(oai, http):
    raw = oai.chat.completions.with_raw_response.create(model="mock-gpt", messages=MESSAGES, max_tokens=30,
                                                        temperature=0)  # fmt: skip
    answer = raw.parse()
    job = recorded(http, raw.headers["x-kiln-job-id"])
    out = job["output"]
    assert out["provider"] == "mock-openai" and "mock-down" in out["attempts"][0] and "503" in out["attempts"][0]
    assert out["text"] == answer.choices[0].message.content and out["usage"] == answer.usage.model_dump(exclude_none=True)
    assert out["cost_usd"] == pytest.approx((answer.usage.prompt_tokens + 2 * answer.usage.completion_tokens) / 1e6)
    assert job["input"] == {"protocol": "openai", "model": "mock-gpt", "messages": MESSAGES, "max_tokens": 30,
                            "temperature": 0}  # fmt: skip


def test_openai_sdk_streams_with_usage_and_the_recorded_usage_is_the_final_chunks(oai, http):
    with oai.chat.completions.with_streaming_response.create(
        model="mock-gpt", messages=MESSAGES, max_tokens=30, stream=True, stream_options={"include_usage": True}
    ) as response:
        job_id = response.headers["x-kiln-job-id"]
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    out = recorded(http, job_id)["output"]
    assert text and out["text"] == text and out["usage"] == usage.model_dump(exclude_none=True)
    assert out["ttft_s"] is not None and 0 < out["ttft_s"] <= out["latency_s"]


def test_an_openai_sdk_hanging_up_at_done_before_the_provider_closes_leaves_a_completed_job(oai, http):
    # the SDK stops reading at [DONE] and closes the connection; the provider ends its stream a second later
    with oai.chat.completions.with_streaming_response.create(model="golden-linger", messages=MESSAGES,
                                                             stream=True) as response:  # fmt: skip
        job_id = response.headers["x-kiln-job-id"]
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    job = recorded(http, job_id)
    assert job["output"]["text"] == text == "BaTiO3 is a perovskite." and job["output"]["partial"] is False


def test_an_openai_stream_without_include_usage_is_still_priced_and_the_client_sees_no_usage_chunk(oai, http):
    with oai.chat.completions.with_streaming_response.create(model="mock-gpt", messages=MESSAGES, stream=True,
                                                             max_tokens=30) as response:  # fmt: skip
        job_id = response.headers["x-kiln-job-id"]
        chunks = list(response.parse())
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    out = recorded(http, job_id)["output"]
    assert out["usage"]["completion_tokens"] > 0 and out["cost_usd"] > 0


def test_a_tool_call_passes_through(oai, http):
    tools = [{"type": "function", "function": {"name": "relax", "description": "Relax a structure",
                                               "parameters": {"type": "object", "properties": {
                                                   "formula": {"type": "string"}}, "required": ["formula"]}}}]  # fmt: skip
    raw = oai.chat.completions.with_raw_response.create(model="mock-gpt", messages=MESSAGES, tools=tools)
    answer = raw.parse()
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls" and call.function.name == "relax"
    out = recorded(http, raw.headers["x-kiln-job-id"])["output"]
    assert out["tool_calls"] == [{"id": call.id, "name": "relax", "arguments": call.function.arguments}]
    assert out["stop_reason"] == "tool_calls"


def test_anthropic_sdk_streaming_and_not(claude, http):
    raw = claude.messages.with_raw_response.create(model="mock-claude", max_tokens=40, messages=MESSAGES,
                                                   system="You are terse.")  # fmt: skip
    message = raw.parse()
    out = recorded(http, raw.headers["x-kiln-job-id"])["output"]
    assert out["text"] == message.content[0].text and out["stop_reason"] == message.stop_reason
    assert out["usage"]["output_tokens"] == message.usage.output_tokens
    with claude.messages.stream(model="mock-claude", max_tokens=40, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        job_id = stream.response.headers["x-kiln-job-id"]
    job = recorded(http, job_id)
    assert job["output"]["text"] == text and job["output"]["usage"]["output_tokens"] == final.usage.output_tokens
    assert job["input"]["stream"] is True


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_golden_streams_pass_byte_for_byte_with_exact_cache_usage(providers, api_key, http, kind):
    path, headers, body = _golden_request(kind, api_key, "golden")
    with httpx.stream("POST", f"{SETTINGS.api_url}{path}", headers=headers, json=body, timeout=30) as response:
        assert response.status_code == 200
        received = b"".join(response.iter_raw())
        job_id = response.headers["x-kiln-job-id"]
    assert received == b"".join(golden_stream(kind, "golden"))
    out = recorded(http, job_id)["output"]
    assert out["usage"] == (OPENAI_USAGE if kind == "openai" else ANTHROPIC_FINAL_USAGE)
    assert out["text"] == "BaTiO3 is a perovskite." and out["partial"] is False
    cache_read, cache_write = (1024, 0) if kind == "openai" else (1500, 188)
    assert out["tokens"]["cache_read"] == cache_read and out["tokens"]["cache_write"] == cache_write
    expected = (out["tokens"]["input"] * 1 + out["tokens"]["output"] * 2 + cache_read * 0.1 + cache_write * 1.25) / 1e6
    assert out["cost_usd"] == pytest.approx(expected)


def _golden_request(kind: str, api_key: str, model: str) -> tuple[str, dict, dict]:
    if kind == "openai":
        return ("/api/v1/llm/openai/v1/chat/completions", {"Authorization": f"Bearer {api_key}"},
                {"model": model, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    return ("/api/v1/llm/anthropic/v1/messages", {"x-api-key": api_key, "anthropic-version": "2023-06-01"},
            {"model": model, "messages": MESSAGES, "max_tokens": 50, "stream": True})  # fmt: skip


def test_a_stream_cut_short_ends_with_an_error_in_the_clients_protocol_and_the_job_fails_partial(oai, claude, http):
    with pytest.raises(openai.APIError, match="upstream_midstream|golden-openai"):
        with oai.chat.completions.with_streaming_response.create(model="golden-cut", messages=MESSAGES,
                                                                 stream=True) as response:  # fmt: skip
            job_id = response.headers["x-kiln-job-id"]
            list(response.parse())
    job = recorded(http, job_id, "failed")
    assert "golden-openai" in job["status_reason"] and "upstream_midstream" in job["status_reason"]
    assert job["output"]["partial"] is True and job["output"]["text"] == "BaTiO3 is a "
    with pytest.raises(anthropic.APIStatusError, match="golden-anthropic"):
        with claude.messages.stream(model="golden-cut", max_tokens=40, messages=MESSAGES) as stream:
            job_id = stream.response.headers["x-kiln-job-id"]
            list(stream.text_stream)
    assert "golden-anthropic" in recorded(http, job_id, "failed")["status_reason"]


def test_llmock_truncating_every_stream_is_recorded_failed_naming_the_provider(oai, http):
    with pytest.raises(openai.APIError):
        with oai.chat.completions.with_streaming_response.create(model="mock-cut", messages=MESSAGES, stream=True,
                                                                 max_tokens=60) as response:  # fmt: skip
            job_id = response.headers["x-kiln-job-id"]
            list(response.parse())
    job = recorded(http, job_id, "failed")
    assert "provider 'mock-cut'" in job["status_reason"]


def test_a_providers_own_stream_error_reaches_the_client_and_fails_the_job(claude, http):
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        with claude.messages.stream(model="golden-error", max_tokens=40, messages=MESSAGES) as stream:
            job_id = stream.response.headers["x-kiln-job-id"]
            list(stream.text_stream)
    assert "Overloaded" in recorded(http, job_id, "failed")["status_reason"]


def test_errors_are_in_the_providers_format(providers, api_key):
    base = f"{SETTINGS.api_url}/api/v1/llm"
    unauthorized = httpx.post(f"{base}/anthropic/v1/messages", json={"model": "golden"}, headers={"x-api-key": "no"})
    assert unauthorized.status_code == 401 and unauthorized.json()["type"] == "error"
    unknown = httpx.post(f"{base}/openai/v1/chat/completions", json={"model": "nope", "messages": MESSAGES},
                         headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_an_llm_proxy_job_streams_delta_events_and_repeats_at_temperature_0_as_a_cache_hit(providers):
    from tests.integration.support import create_key, wait_final

    key = create_key(f"llm-{uuid.uuid4().hex[:8]}")  # a project with its cache on, as by default
    job = {"type": "llm_proxy", "input": {"model": "golden", "provider": "golden-anthropic", "messages": MESSAGES,
                                          "max_tokens": 50, "temperature": 0}}  # fmt: skip
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        submitted = h.post("/api/v1/jobs", json=job).json()
        done = wait_final(h, submitted["id"], timeout=180)
        assert done["status"] == "completed", done
        out = done["output"]
        assert out["text"] == "BaTiO3 is a perovskite." and out["usage"] == ANTHROPIC_FINAL_USAGE
        assert out["provider"] == "golden-anthropic" and out["cost_usd"] > 0
        events = [line for line in h.get(f"/api/v1/jobs/{submitted['id']}/events").text.splitlines()]
        deltas = [json.loads(events[i + 1][6:])["text"] for i, line in enumerate(events) if line == "event: delta"]
        assert "".join(deltas) == out["text"]
        again = h.post("/api/v1/jobs", json=job).json()
        assert again["status"] == "cache_hit" and again["output"]["text"] == out["text"]
        sampled = h.post("/api/v1/jobs", json={**job, "input": {**job["input"], "temperature": 0.7}}).json()
        assert sampled["status"] != "cache_hit"
        assert wait_final(h, sampled["id"], timeout=180)["status"] == "completed"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], check=True, capture_output=True, text=True)


def test_a_drop_in_call_is_a_flow_run_in_prefect_made_after_it(oai, http):
    raw = oai.chat.completions.with_raw_response.create(model="golden", messages=MESSAGES)
    job_id = raw.headers["x-kiln-job-id"]
    job = wait_until(lambda: (j := http.get(f"/api/v1/jobs/{job_id}").json()).get("flow_run_id") and j,
                     timeout=15, what="the call's flow run")  # fmt: skip
    run = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{job['flow_run_id']}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED" and "golden-openai" in run["state"]["message"]
    assert f"job:{job_id}" in run["tags"] and "type:llm_proxy" in run["tags"]
    assert run["parameters"]["input"]["messages"] == MESSAGES
    assert job["status"] == "completed" and job["output"]["text"] == "BaTiO3 is a perovskite."


def test_20_concurrent_calls_against_a_budget_for_10_never_overspend(providers):
    import asyncio

    from tests.integration.support import create_key

    name = f"llm-budget-{uuid.uuid4().hex[:8]}"
    key = create_key(name)
    body = {"model": "mock-slow", "messages": MESSAGES, "max_tokens": 40}
    # what each call holds: every byte of its request an input token at the dearest input price (1.25 $/M, the
    # cache write's), and max_tokens of output at 2 $/M
    hold = (len(json.dumps(body)) * 1.25 + 40 * 2) / 1e6
    budget = 10.5 * hold
    _cli("projects", "budget", name, "--usd", repr(budget))
    url = f"{SETTINGS.api_url}/api/v1/llm/openai/v1/chat/completions"

    async def calls():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(20)))

    answers = asyncio.run(calls())
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(ok) == 10, [a.status_code for a in answers]
    assert all(a.status_code == 402 and a.json()["error"]["type"] == "insufficient_quota" for a in refused)
    assert "budget" in refused[0].json()["error"]["message"]
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        for answer in ok:
            recorded(h, answer.headers["x-kiln-job-id"])
        usage = wait_until(lambda: (u := h.get("/api/v1/llm/usage").json())["held_usd"] == 0 and u, timeout=15,
                           what="every hold settled")  # fmt: skip
        costs = sum(a.json()["usage"]["prompt_tokens"] * 1 + a.json()["usage"]["completion_tokens"] * 2 for a in ok) / 1e6
        assert usage["spent_usd"] == pytest.approx(costs) and usage["spent_usd"] <= budget
        (group,) = usage["groups"]
        assert group["model"] == "mock-slow" and group["calls"] == 10 and group["failed_calls"] == 0
        assert group["cost_usd"] == pytest.approx(costs)
        assert group["output_tokens"] == sum(a.json()["usage"]["completion_tokens"] for a in ok)
        by_key = h.get("/api/v1/llm/usage", params={"group_by": "key"}).json()["groups"]
        assert [(g["key"], g["calls"]) for g in by_key] == [(key[:12], 10)]
        later = h.get("/api/v1/llm/usage", params={"from": "2999-01-01T00:00:00Z"}).json()
        assert later["groups"] == [] and later["budget_usd"] == pytest.approx(budget)
        backwards = h.get("/api/v1/llm/usage", params={"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"})
        assert backwards.status_code == 400 and backwards.json()["detail"].startswith("to:")
        unix = h.get("/api/v1/llm/usage", params={"to": "0.5"})
        assert unix.status_code == 422 and unix.json()["detail"].startswith("to: '0.5' is not an ISO 8601")
        # an llm_proxy job holds its most possible cost at submission too: past the budget, a 402 and no job
        _cli("projects", "budget", name, "--usd", repr(usage["spent_usd"] + hold / 10))
        over = h.post("/api/v1/jobs", json={"type": "llm_proxy", "input": {**body, "stream": False}})
        assert over.status_code == 402 and "LLM budget" in over.json()["detail"], over.text
        assert h.get("/api/v1/jobs", params={"type": "llm_proxy"}).json()["jobs"].__len__() == 10


def test_a_keys_llm_limits_answer_429_with_retry_after_in_the_providers_format(providers):
    from tests.integration.support import create_key

    key = create_key(f"llm-limits-{uuid.uuid4().hex[:8]}")
    _cli("keys", "limits", key[:12], "--llm-calls-per-minute", "2")
    url = f"{SETTINGS.api_url}/api/v1/llm/anthropic/v1/messages"
    body = {"model": "golden", "messages": MESSAGES, "max_tokens": 50}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    assert [httpx.post(url, json=body, headers=headers, timeout=30).status_code for _ in range(2)] == [200, 200]
    limited = httpx.post(url, json=body, headers=headers, timeout=30)
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["type"] == "error" and limited.json()["error"]["type"] == "rate_limit_error"
    assert "2 per minute" in limited.json()["error"]["message"]
    # tokens: the first call is let through, and its tokens count against the next
    _cli("keys", "limits", key[:12], "--llm-tokens-per-minute", "10")
    assert httpx.post(url, json=body, headers=headers, timeout=30).status_code == 200
    assert httpx.post(url, json=body, headers=headers, timeout=30).status_code == 429


def test_zz_the_provider_key_appears_nowhere_kiln_writes(providers, http):
    time.sleep(1)  # the last records and logs are written
    # every file: logs, results, the job index and Prefect's database (which keeps block data encrypted)
    leaks = [str(p) for p in Path(HOME).rglob("*") if p.is_file() and _contains(p)]
    assert leaks == []
    jobs = http.get("/api/v1/jobs", params={"type": "llm_proxy", "limit": 500}).json()["jobs"]
    assert len(jobs) >= 8
    for job in jobs:
        events = http.get(f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "0"}).text
        assert KEY not in json.dumps(job) and KEY not in events
    runs = httpx.post(f"{SETTINGS.prefect_api}/flow_runs/filter", json={"limit": 200}, timeout=120).json()
    assert KEY not in json.dumps([r["parameters"] for r in runs])


def _contains(path: Path) -> bool:
    """Whether the file holds the key, as bytes."""
    try:
        return KEY.encode() in path.read_bytes()
    except OSError:
        return False
