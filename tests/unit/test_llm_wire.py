"""The OpenAI and Anthropic wire formats as kiln reads them in passing: text, usage field by field, stop, cost."""

from __future__ import annotations

import json

import pytest

from kiln.blocks.llm import LlmProvider, route
from kiln.tasks.llm.wire import CallRecord, SseParser, stream_error, tokens_of
from tests.llm_golden import (
    ANTHROPIC_ANSWER,
    ANTHROPIC_FINAL_USAGE,
    OPENAI_ANSWER,
    OPENAI_USAGE,
    golden_stream,
)


def read_stream(kind: str, model: str, split: int = 7) -> tuple[CallRecord, bytes]:
    """The golden stream fed in pieces of `split` bytes, as a socket may deliver it; and the bytes relayed."""
    data = b"".join(golden_stream(kind, model))
    record, parser, relayed = CallRecord(kind), SseParser(), b""
    for start in range(0, len(data), split):
        for raw, name, text in parser.feed(data[start:start + split]):
            record.read_event(name, text)
            relayed += raw
    return record, relayed


@pytest.mark.parametrize("split", [1, 7, 10_000])
def test_an_openai_stream_is_relayed_byte_for_byte_and_its_final_usage_kept(split):
    record, relayed = read_stream("openai", "golden", split)
    assert relayed == b"".join(golden_stream("openai", "golden"))
    assert record.text == "BaTiO3 is a perovskite."
    assert record.usage == OPENAI_USAGE and record.finished and record.stop_reason == "stop"
    assert record.tokens == {"input": 176, "output": 7, "cache_read": 1024, "cache_write": 0}


@pytest.mark.parametrize("split", [1, 7, 10_000])
def test_an_anthropic_stream_keeps_message_start_cache_tokens_updated_by_message_delta(split):
    record, relayed = read_stream("anthropic", "golden", split)
    assert relayed == b"".join(golden_stream("anthropic", "golden"))
    assert record.text == "BaTiO3 is a perovskite." and record.stop_reason == "end_turn" and record.finished
    assert record.usage == ANTHROPIC_FINAL_USAGE
    assert record.tokens == {"input": 21, "output": 15, "cache_read": 1500, "cache_write": 188}


def test_openai_usage_on_a_chunk_that_still_has_choices_is_not_lost():
    record = CallRecord("openai")
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}], "usage": OPENAI_USAGE}
    record.read_event(None, json.dumps(chunk))
    assert record.usage == OPENAI_USAGE and record.text == "x"


def test_a_cut_stream_is_unfinished_and_an_in_stream_error_is_read():
    cut, _ = read_stream("openai", "golden-cut")
    assert not cut.finished and cut.text == "BaTiO3 is a "
    for kind in ("openai", "anthropic"):
        errored, _ = read_stream(kind, "golden-error")
        assert errored.error and "Overloaded" in errored.error and not errored.finished


def test_whole_answers_and_tool_calls():
    record = CallRecord("openai")
    record.read_response(OPENAI_ANSWER)
    assert record.text == "BaTiO3 is a perovskite." and record.usage == OPENAI_USAGE
    record = CallRecord("anthropic")
    record.read_response({**ANTHROPIC_ANSWER, "content": [{"type": "tool_use", "id": "toolu_1", "name": "relax",
                                                           "input": {"fmax": 0.05}}], "stop_reason": "tool_use"})
    assert record.tool_calls == [{"id": "toolu_1", "name": "relax", "arguments": '{"fmax": 0.05}'}]
    streamed = CallRecord("openai")
    for piece in ({"index": 0, "id": "call_1", "function": {"name": "relax", "arguments": '{"fm'}},
                  {"index": 0, "function": {"arguments": 'ax": 0.05}'}}):
        streamed.read_event(None, json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]}))
    assert streamed.tool_calls == [{"id": "call_1", "name": "relax", "arguments": '{"fmax": 0.05}'}]


def test_in_stream_errors_are_in_each_clients_protocol():
    openai = stream_error("openai", "provider 'a' broke", "upstream_midstream")
    assert openai.startswith(b"data: {") and json.loads(openai[6:])["error"]["code"] == "upstream_midstream"
    anthropic = stream_error("anthropic", "provider 'a' broke", "upstream_midstream")
    assert anthropic.startswith(b"event: error\ndata: ") and anthropic.endswith(b"\n\n")


def test_cost_prices_cache_reads_and_writes_apart_and_falls_back_to_the_input_price():
    provider = LlmProvider(kind="anthropic", base_url="http://x", models=["m"], input_price=3, output_price=15,
                           cache_read_price=0.3, cache_write_price=3.75)
    assert provider.cost(tokens_of("anthropic", ANTHROPIC_FINAL_USAGE)) == pytest.approx(
        (21 * 3 + 15 * 15 + 1500 * 0.3 + 188 * 3.75) / 1e6)
    plain = LlmProvider(kind="openai", base_url="http://x/v1/", models=["m"], input_price=1, output_price=2)
    assert plain.cost(tokens_of("openai", OPENAI_USAGE)) == pytest.approx((1200 * 1 + 7 * 2) / 1e6)
    assert plain.url("chat") == "http://x/v1/chat/completions" and provider.url("chat") == "http://x/v1/messages"


def test_a_model_routes_to_its_providers_in_failover_order_and_the_summary_has_no_key():
    providers = {name: LlmProvider(kind="openai", base_url="http://x", models=["m"], priority=priority,
                                   key_secret=f"kiln-llm-{name}-key")
                 for name, priority in (("b", 1), ("a", 1), ("first", 0))}  # fmt: skip
    assert [name for name, _ in route(providers, "m")] == ["first", "a", "b"]
    assert route(providers, "m", "anthropic") == [] and route(providers, "other") == []
    assert "key" not in json.dumps({k: v for k, v in providers["a"].summary("a").items() if k != "key_secret"})
    with pytest.raises(ValueError):
        LlmProvider(kind="openai", base_url="ftp://x", models=["m"])
