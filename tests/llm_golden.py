"""A provider that replays golden byte streams of both protocols, so kiln's pass-through is pinned byte for byte.

The streams follow the providers' documented wire formats (OpenAI Chat Completions with
`stream_options.include_usage` and cached prompt tokens; Anthropic Messages with ping, cache read and
cache creation tokens, a tool_use block and `event: error`), written out here rather than captured live
(there is no internet on the build machine). Run it with `python -m tests.llm_golden PORT KEY`; it answers
401 unless the key kiln forwards is KEY.

Models: `golden` answers normally; `golden-cut` ends its stream after three events with no end marker
(a truncated upstream); `golden-error` sends the provider's own in-stream error; `golden-linger` answers as
`golden` but holds the stream open a second after its end marker before closing it.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _data(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-golden", "object": "chat.completion.chunk", "created": 1700000000, "model": "golden",
            "system_fingerprint": "fp_golden", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": finish}]}  # fmt: skip


OPENAI_USAGE = {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207,
                "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}  # fmt: skip
OPENAI_STREAM = [
    _data(_chunk({"role": "assistant", "content": "", "refusal": None})),
    _data(_chunk({"content": "Ba"})),
    _data(_chunk({"content": "TiO3 is a "})),
    _data(_chunk({"content": "perovskite."})),
    _data(_chunk({}, "stop")),
    _data({"id": "chatcmpl-golden", "object": "chat.completion.chunk", "created": 1700000000, "model": "golden",
           "system_fingerprint": "fp_golden", "choices": [], "usage": OPENAI_USAGE}),
    b"data: [DONE]\n\n",
]
OPENAI_ANSWER = {"id": "chatcmpl-golden", "object": "chat.completion", "created": 1700000000, "model": "golden",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "BaTiO3 is a perovskite.",
                                                      "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
                 "usage": OPENAI_USAGE, "system_fingerprint": "fp_golden"}  # fmt: skip


def _event(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


ANTHROPIC_START_USAGE = {"input_tokens": 21, "cache_creation_input_tokens": 188, "cache_read_input_tokens": 1500,
                         "output_tokens": 1}  # fmt: skip
ANTHROPIC_FINAL_USAGE = {**ANTHROPIC_START_USAGE, "output_tokens": 15}
ANTHROPIC_STREAM = [
    _event("message_start", {"type": "message_start", "message": {
        "id": "msg_golden", "type": "message", "role": "assistant", "content": [], "model": "golden",
        "stop_reason": None, "stop_sequence": None, "usage": ANTHROPIC_START_USAGE}}),
    _event("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
    _event("ping", {"type": "ping"}),
    _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "BaTiO3 is a "}}),
    _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "perovskite."}}),
    _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": 15}}),
    _event("message_stop", {"type": "message_stop"}),
]  # fmt: skip
ANTHROPIC_ERROR = _event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
ANTHROPIC_ANSWER = {"id": "msg_golden", "type": "message", "role": "assistant", "model": "golden",
                    "content": [{"type": "text", "text": "BaTiO3 is a perovskite."}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": ANTHROPIC_FINAL_USAGE}  # fmt: skip


# how long `golden-linger` keeps its stream open after the end marker: longer than a client takes to hang up
LINGER_SECONDS = 1.0


def golden_stream(kind: str, model: str) -> list[bytes]:
    """The events the golden provider sends for a streamed call to `model`."""
    events = OPENAI_STREAM if kind == "openai" else ANTHROPIC_STREAM
    if model == "golden-cut":
        return events[:3]
    if model == "golden-error":
        return events[:4] + ([_data({"error": {"message": "Overloaded", "type": "server_error"}})]
                             if kind == "openai" else [ANTHROPIC_ERROR])  # fmt: skip
    return events


def make_app(key: str) -> Starlette:
    async def chat(request: Request) -> Response:
        kind = "openai" if request.url.path.startswith("/openai") else "anthropic"
        sent = (request.headers.get("authorization", "")[7:] if kind == "openai"
                else request.headers.get("x-api-key", ""))  # fmt: skip
        if sent != key or (kind == "anthropic" and not request.headers.get("anthropic-version")):
            return JSONResponse({"error": {"message": "bad key", "type": "authentication_error"}}, status_code=401)
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(OPENAI_ANSWER if kind == "openai" else ANTHROPIC_ANSWER)

        async def replay():
            for event in golden_stream(kind, body["model"]):
                yield event
                await asyncio.sleep(0.005)
            if body["model"] == "golden-linger":
                await asyncio.sleep(LINGER_SECONDS)

        return StreamingResponse(replay(), media_type="text/event-stream")

    return Starlette(routes=[Route("/openai/v1/chat/completions", chat, methods=["POST"]),
                             Route("/anthropic/v1/messages", chat, methods=["POST"])])  # fmt: skip


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
