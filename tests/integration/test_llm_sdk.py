"""The SDK's `client.llm` and `kiln llm chat` against the session's stack, with test_llm_proxy's providers (llmock
and the golden byte streams): what they return must be what kiln recorded for the call."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import anthropic
import openai
import pytest

from kiln.errors import NotFound, ServerError
from kiln.sdk import AsyncClient, ChatResult, Client
from tests.integration.support import JOB_TYPE_TESTS, REQUEST_TIMEOUT, SETTINGS, wait_until
from tests.integration.test_llm_proxy import _add_provider, _llmock, providers, recorded  # noqa: F401 - a fixture

pytestmark = [pytest.mark.integration, JOB_TYPE_TESTS]

# a model of each protocol; mock-gpt's first provider answers 503, so its calls fail over first
PROTOCOLS = [("mock-gpt", "openai"), ("mock-claude", "anthropic")]
# llmock's pause between streamed chunks for the CLI's streaming test
CHUNK_DELAY_MS = 150


def ask() -> list[dict]:
    """A question no other call of the session asks, so its job is found by its messages."""
    return [{"role": "user", "content": f"What is BaTiO3? ({uuid.uuid4().hex[:8]})"}]


def job_of(http, messages: list[dict]) -> dict:
    """The llm_proxy job that recorded the call ending with these messages, once it has ended."""

    def ended():
        jobs = http.get("/api/v1/jobs", params={"type": "llm_proxy", "limit": 20}).json()["jobs"]
        mine = [j for j in jobs if j["input"]["messages"][-1] == messages[-1] and j["status"] != "running"]
        return mine[0] if mine else None

    return wait_until(ended, timeout=10, what="the call to be recorded")


@pytest.fixture(scope="module")
def sdk(providers, api_key):
    with Client(SETTINGS.api_url, api_key, timeout=REQUEST_TIMEOUT) as client:
        yield client


@pytest.mark.parametrize(("model", "protocol"), PROTOCOLS)
def test_chat_streams_text_deltas_that_join_to_the_recorded_answer(sdk, http, model, protocol):
    messages = ask()
    deltas = list(sdk.llm.chat(model, messages, stream=True, max_tokens=40))
    assert len(deltas) > 1 and all(isinstance(d, str) and d for d in deltas)
    job = job_of(http, messages)
    assert job["status"] == "completed" and job["output"]["text"] == "".join(deltas), job
    assert job["input"]["protocol"] == protocol and job["input"]["stream"] is True
    assert job["input"]["max_tokens"] == 40


@pytest.mark.parametrize(("model", "protocol"), PROTOCOLS)
def test_chat_returns_the_whole_answer_with_its_usage_and_job(sdk, http, model, protocol):
    messages = ask()
    result = sdk.llm.chat(model, messages, system="You are terse.", max_tokens=40, temperature=0)
    assert isinstance(result, ChatResult) and result.text and str(result) == result.text
    job = recorded(http, result.job_id)
    out = job["output"]
    assert out["text"] == result.text and out["usage"] == result.usage and out["stop_reason"] == result.stop_reason
    assert job["input"]["protocol"] == protocol and job["input"]["temperature"] == 0
    if protocol == "anthropic":
        assert job["input"]["system"] == "You are terse." and job["input"]["messages"] == messages
    else:
        assert job["input"]["messages"] == [{"role": "system", "content": "You are terse."}, *messages]


@pytest.mark.parametrize(("model", "protocol"), PROTOCOLS)
async def test_the_async_client_streams_and_answers_alike(providers, api_key, http, model, protocol):
    async with AsyncClient(SETTINGS.api_url, api_key, timeout=REQUEST_TIMEOUT) as client:
        messages = ask()
        deltas = [delta async for delta in client.llm.chat(model, messages, stream=True, max_tokens=40)]
        result = await client.llm.chat(model, ask(), max_tokens=40)
    assert job_of(http, messages)["output"]["text"] == "".join(deltas) and deltas
    assert recorded(http, result.job_id)["output"]["text"] == result.text and result.text


def test_the_official_clients_are_on_kilns_drop_in_routes_with_the_kiln_key(sdk, http):
    oai, claude = sdk.llm.openai(), sdk.llm.anthropic()
    assert isinstance(oai, openai.OpenAI) and isinstance(claude, anthropic.Anthropic)
    assert oai is sdk.llm.openai()  # one of each per kiln client, closed with it
    assert {"mock-gpt", "golden"} <= {m.id for m in oai.models.list()}
    answer = oai.chat.completions.create(model="mock-gpt", messages=ask(), max_tokens=30)
    assert answer.choices[0].message.content
    messages = ask()
    with claude.messages.stream(model="mock-claude", max_tokens=40, messages=messages) as stream:
        text = "".join(stream.text_stream)
    assert job_of(http, messages)["output"]["text"] == text


async def test_the_async_official_clients(providers, api_key):
    async with AsyncClient(SETTINGS.api_url, api_key, timeout=REQUEST_TIMEOUT) as client:
        oai, claude = client.llm.openai(), client.llm.anthropic()
        assert isinstance(oai, openai.AsyncOpenAI) and isinstance(claude, anthropic.AsyncAnthropic)
        answer = await claude.messages.create(model="mock-claude", max_tokens=40, messages=ask())
        assert answer.content[0].text


# mock-cut: llmock truncates every stream (OpenAI); golden-error: the provider's own error event after one delta
@pytest.mark.parametrize(("model", "error"), [("mock-cut", "provider 'mock-cut'"), ("golden-error", "Overloaded")])
def test_a_stream_that_fails_midway_yields_the_partial_text_then_raises_kilns_error(sdk, http, model, error):
    messages, deltas = ask(), []
    with pytest.raises(ServerError, match=error) as caught:
        for delta in sdk.llm.chat(model, messages, stream=True, max_tokens=60):
            deltas.append(delta)
    assert caught.value.status_code == 502
    job = job_of(http, messages)
    assert job["status"] == "failed" and job["output"]["text"] == "".join(deltas)
    if model == "golden-error":
        assert deltas == ["BaTiO3 is a "]


def test_a_model_no_provider_serves_is_not_found_before_any_call(sdk):
    with pytest.raises(NotFound, match="'nope' is served by no registered LLM provider; served: .*mock-claude"):
        sdk.llm.chat("nope", ask())


# the CLI


@pytest.fixture(scope="module")
def slow_model(providers):
    """A model whose stream comes a chunk every CHUNK_DELAY_MS, as a real model's does."""
    process, port = _llmock("--stream-chunk-delay-ms", str(CHUNK_DELAY_MS))
    try:
        _add_provider("mock-chunked", "--kind", "anthropic", "--base-url", f"http://127.0.0.1:{port}/anthropic",
                      "--model", "mock-chunked")  # fmt: skip
        yield "mock-chunked"
    finally:
        process.terminate()
        process.wait(10)


def kiln_llm_chat(*args: str, key: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiln.cli", "llm", "chat", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "KILN_API_KEY": key})  # fmt: skip


def test_kiln_llm_chat_prints_the_answer_as_it_streams_in(slow_model, api_key, http):
    prompt = ask()[0]["content"]
    process = kiln_llm_chat(slow_model, prompt, "--system", "You are terse.", "--max-tokens", "60", key=api_key)
    arrivals, out = [], b""
    while chunk := os.read(process.stdout.fileno(), 4096):
        arrivals.append(time.monotonic())
        out += chunk
    assert process.wait(30) == 0, process.stderr.read()
    job = job_of(http, [{"role": "user", "content": prompt}])
    assert out.decode() == job["output"]["text"] + "\n"
    assert job["input"]["system"] == "You are terse." and job["input"]["max_tokens"] == 60
    # the text arrived in pieces over the stream's length, not all at once at its end
    assert len(arrivals) > 2 and arrivals[-1] - arrivals[0] >= 2 * CHUNK_DELAY_MS / 1000


def test_kiln_llm_chat_says_what_was_wrong_in_one_line(providers, api_key):
    process = kiln_llm_chat("nope", "hi", key=api_key)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and out == b""
    message = err.decode()
    assert message.startswith("error: model: 'nope' is served by no registered LLM provider") and message.count("\n") == 1
