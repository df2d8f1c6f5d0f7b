"""The OpenAI Chat Completions and Anthropic Messages wire formats, read as they pass: text, usage, stop reason.

Pure functions over bytes and JSON, shared by the drop-in endpoints (kiln.api.llm) and llm_proxy jobs.
Nothing here changes what passes through: a stream is parsed beside the bytes the client receives.

Usage is taken as the provider's own final usage field says it, and only then normalised for pricing:
- OpenAI reports `usage` on the last chunk (with `stream_options.include_usage`), which may or may not
  have empty `choices` (LiteLLM #36168 lost it when it had some); the last non-null one is kept.
  `prompt_tokens` includes `prompt_tokens_details.cached_tokens`.
- Anthropic reports input and cache tokens in `message_start` and the cumulative output (and, in newer
  API versions, final input/cache figures) in `message_delta`; the final usage is message_start's
  updated by every message_delta, field by field (LiteLLM #31069 reported cache tokens as 0).
  `input_tokens` excludes cache reads and writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["openai", "anthropic"]


def tokens_of(kind: Kind, usage: dict[str, Any] | None) -> dict[str, int]:
    """A provider's usage as {input (uncached), output, cache_read, cache_write}: what prices apply to."""
    if not usage:
        return {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0}
    if kind == "openai":
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        return {"input": int(usage.get("prompt_tokens") or 0) - cached, "output": int(usage.get("completion_tokens") or 0),
                "cache_read": cached, "cache_write": 0}  # fmt: skip
    return {"input": int(usage.get("input_tokens") or 0), "output": int(usage.get("output_tokens") or 0),
            "cache_read": int(usage.get("cache_read_input_tokens") or 0),
            "cache_write": int(usage.get("cache_creation_input_tokens") or 0)}  # fmt: skip


class SseParser:
    """Server-sent events from bytes as they arrive: `feed` returns the events completed so far, each as
    (its bytes, ending in a blank line; its `event:` name; its `data:` text)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, str | None, str]]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        events = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            name, data = None, []
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            events.append((block + b"\n\n", name, "\n".join(data)))
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete: what a stream cut short leaves behind."""
        return self._buffer


@dataclass
class CallRecord:
    """What one call said, read from its response or stream: text, tool calls, usage, stop reason, timing."""

    kind: Kind
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    stop_reason: str | None = None
    # the stream reached its own end ([DONE], message_stop); a non-streamed answer is always finished
    finished: bool = False
    # an `error` the provider sent inside the stream
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    chunks: int = 0

    def _token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    # streams

    def read_event(self, name: str | None, data: str) -> None:
        """One server-sent event of the call's stream; raises ValueError when its data is not JSON."""
        if not data and name is None:  # a comment line (": keep-alive")
            return
        self.chunks += 1
        if self.kind == "openai":
            if data.strip() == "[DONE]":
                self.finished = True
                return
            chunk = json.loads(data)
            if chunk.get("error"):
                self.error = json.dumps(chunk["error"])
                return
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    self._token()
                    self.text += delta["content"]
                for call in delta.get("tool_calls") or []:
                    self._token()
                    self._tool_delta(call)
                if choice.get("finish_reason"):
                    self.stop_reason = choice["finish_reason"]
            return
        event = json.loads(data) if data else {}
        kind = event.get("type") or name
        if kind == "message_start":
            self.usage = dict((event.get("message") or {}).get("usage") or {})
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.tool_calls.append({"id": block.get("id"), "name": block.get("name"), "arguments": ""})
            elif block.get("text"):
                self._token()
                self.text += block["text"]
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            self._token()
            if delta.get("type") == "text_delta":
                self.text += delta.get("text", "")
            elif delta.get("type") == "input_json_delta" and self.tool_calls:
                self.tool_calls[-1]["arguments"] += delta.get("partial_json", "")
        elif kind == "message_delta":
            self.usage = {**(self.usage or {}), **(event.get("usage") or {})}
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.error = json.dumps(event.get("error") or event)

    def _tool_delta(self, call: dict[str, Any]) -> None:
        index = call.get("index", len(self.tool_calls))
        while len(self.tool_calls) <= index:
            self.tool_calls.append({"id": None, "name": None, "arguments": ""})
        entry = self.tool_calls[index]
        function = call.get("function") or {}
        entry["id"] = call.get("id") or entry["id"]
        entry["name"] = function.get("name") or entry["name"]
        entry["arguments"] += function.get("arguments") or ""

    # whole answers

    def read_response(self, body: dict[str, Any]) -> None:
        """A non-streamed answer."""
        self.finished = True
        self._token()
        self.usage = body.get("usage")
        if self.kind == "openai":
            for choice in body.get("choices") or []:
                message = choice.get("message") or {}
                self.text += message.get("content") or ""
                for call in message.get("tool_calls") or []:
                    function = call.get("function") or {}
                    self.tool_calls.append({"id": call.get("id"), "name": function.get("name"),
                                            "arguments": function.get("arguments") or ""})  # fmt: skip
                self.stop_reason = choice.get("finish_reason") or self.stop_reason
            return
        for block in body.get("content") or []:
            if block.get("type") == "text":
                self.text += block.get("text", "")
            elif block.get("type") == "tool_use":
                self.tool_calls.append({"id": block.get("id"), "name": block.get("name"),
                                        "arguments": json.dumps(block.get("input") or {})})  # fmt: skip
        self.stop_reason = body.get("stop_reason")

    @property
    def tokens(self) -> dict[str, int]:
        return tokens_of(self.kind, self.usage)

    def timing(self, ended: float) -> dict[str, float | None]:
        """Latency and time to first token in seconds."""
        return {"latency_s": round(ended - self.started, 6),
                "ttft_s": round(self.first_token - self.started, 6) if self.first_token is not None else None}  # fmt: skip


# errors, in each protocol's own shape


def error_body(kind: Kind, message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    """An error answer as the provider's SDK reads it."""
    if kind == "openai":
        return {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return {"type": "error", "error": {"type": error_type, "message": message}}


def stream_error(kind: Kind, message: str, code: str) -> bytes:
    """A terminal error inside a stream: OpenAI's SDK raises on a chunk with `error`, Anthropic's on `event: error`."""
    if kind == "openai":
        return b"data: " + json.dumps(error_body(kind, message, "upstream_error", code)).encode() + b"\n\n"
    payload = json.dumps(error_body(kind, message, "api_error"))
    return f"event: error\ndata: {payload}\n\n".encode()
