"""SGLang's wire format as the simulator (`sglang_sim.server`) writes it.

Flat SGLang errors, compact JSON, SSE framing, and the chat.completion / text_completion bodies
and stream chunks, shaped the way SGLang's OpenAI-compatible serving code shapes them.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from sglang_sim.jobs import EngineState, Job

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class SimError(Exception):
    """An error answered in SGLang's flat shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type or error_type(status)

    def payload(self) -> dict[str, Any]:
        return {
            "object": "error",
            "message": self.message,
            "type": self.err_type,
            "param": None,
            "code": self.status,
        }

    def response(self) -> web.Response:
        return json_response(self.payload(), status=self.status)


def error_type(status: int) -> str:
    if status == 400:
        return "BadRequestError"
    if status == 500:
        return "InternalServerError"
    try:
        words = HTTPStatus(status).name.split("_")
    except ValueError:
        return "Error"
    return "".join(word.title() for word in words) + "Error"


def dumps(payload: Any) -> bytes:
    # Compact UTF-8, as SGLang's orjson/pydantic/msgspec encoders write it.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(payload), status=status, content_type="application/json")


def sse(payload: Any) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
METADATA = {"weight_version": "default"}


def simulated_failure() -> SimError:
    return SimError("Simulated failure (sim error_after_tokens)", 500)


# --- Wire formats -------------------------------------------------------------------------------


def usage_of(job: Job, *, drop_none: bool = False) -> dict[str, Any]:
    """SGLang's UsageInfo; prompt_tokens_details only when some prompt tokens were cached."""
    prompt, completion = job.prompt_tokens, job.generated
    details = {"cached_tokens": job.cached_tokens} if job.cached_tokens else None
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": details,
        "reasoning_tokens": 0,
    }
    return {k: v for k, v in usage.items() if v is not None} if drop_none else usage


def envelope(job: Job, kind: str, choices: list[Any], **extra: Any) -> dict[str, Any]:
    head = {"id": job.rid, "object": kind, "created": job.created, "model": job.model}
    return {**head, "choices": choices, **extra}


def choice(finish: str | None = None, matched: int | None = None, **body: Any) -> dict[str, Any]:
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish, "matched_stop": matched}


class ChatWire:
    """chat.completion bodies; chunks shaped like SGLang's build_sse_content (no null usage)."""

    CHUNK = "chat.completion.chunk"

    def __init__(self, sim: EngineState) -> None:
        self.sim = sim

    def opening(self, job: Job) -> list[bytes]:
        return [
            sse(envelope(job, self.CHUNK, [choice(delta={"role": "assistant", "content": ""})]))
        ]

    def piece(self, job: Job, text: str, last: bool) -> bytes:
        extra = {"usage": usage_of(job)} if job.continuous_usage else {}
        return sse(envelope(job, self.CHUNK, [choice(delta={"content": text})], **extra))

    def closing(self, job: Job) -> list[bytes]:
        end = choice(job.finish_reason, self.sim.matched_stop(job), delta={})
        out = [sse(envelope(job, self.CHUNK, [end]))]
        if job.include_usage:
            out.append(sse(envelope(job, self.CHUNK, [], usage=usage_of(job))))
        return out

    def body(self, job: Job, text: str) -> dict[str, Any]:
        message = {
            "role": "assistant",
            "content": text or None,
            "reasoning_content": None,
            "tool_calls": None,
        }
        end = choice(job.finish_reason, self.sim.matched_stop(job), message=message)
        return envelope(job, "chat.completion", [end], usage=usage_of(job), metadata=METADATA)


class CompletionWire:
    """text_completion bodies; the last text chunk carries finish_reason, as in SGLang."""

    KIND = "text_completion"

    def __init__(self, sim: EngineState) -> None:
        self.sim = sim

    def text(self, job: Job, text: str, finish: str | None) -> dict[str, Any]:
        return choice(finish, self.sim.matched_stop(job) if finish else None, text=text)

    def opening(self, job: Job) -> list[bytes]:
        return []

    def piece(self, job: Job, text: str, last: bool) -> bytes:
        usage = usage_of(job) if job.continuous_usage else None
        chosen = self.text(job, text, job.finish_reason if last else None)
        return sse(envelope(job, self.KIND, [chosen], usage=usage))

    def closing(self, job: Job) -> list[bytes]:
        out = []
        if job.finish_reason == "abort":
            out.append(sse(envelope(job, self.KIND, [self.text(job, "", "abort")], usage=None)))
        if job.include_usage:  # SGLang dumps this one with exclude_none
            out.append(sse(envelope(job, self.KIND, [], usage=usage_of(job, drop_none=True))))
        return out

    def body(self, job: Job, text: str) -> dict[str, Any]:
        chosen = self.text(job, text, job.finish_reason)
        return envelope(job, self.KIND, [chosen], usage=usage_of(job), metadata=METADATA)
