"""The HTTP API's request schema and its answers to bad input.

Requests are OpenAI's chat-completions (and completions) bodies: unknown fields are ignored,
known ones are strict. Bad input gets an OpenAI-shaped 4xx (`error_body`) whose message names
the field: malformed JSON 400, wrong types 422, empty or whitespace messages 400, lone
surrogates 400, control tokens typed into a message (a forged turn) 400.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from veritune.core.params import ServeParams

# Control tokens a client could type to forge a turn (prompt injection through the template).
_RESERVED = re.compile(
    r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|python_tag|"
    r"im_start|im_end|endoftext|"
    r"finetune_right_pad_id|reserved_special_token_\d+)\|>"
)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request; unknown fields are ignored, known ones are strict."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool = False
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    user: StrictStr | None = None
    retrieval: StrictBool | None = None  # veritune extension: None = the server's default (serve.retrieval)


class CompletionRequest(BaseModel):
    """OpenAI's completions request (one prompt string), with vLLM's `skip_special_tokens` and
    `stop_token_ids` (the server's own end-of-turn tokens end a completion either way). A
    `temperature` above 0 samples (with `seed`, reproducibly): another veritune's agent turns
    come here sampled as `agent_eval` samples them."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool = False
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    skip_special_tokens: StrictBool = True
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=16)] | None = None
    seed: StrictInt | None = None


class ApiError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        408: "timeout_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def checked_limits(max_tokens: int | None, stop: str | list[str] | None, p: ServeParams) -> tuple[int, list[str]]:
    """A request's token budget (the server's when unset) and stop sequences, or a 400."""
    max_new = max_tokens or p.max_new_tokens
    if max_new > p.max_new_tokens:
        raise ApiError(
            400, f"max_tokens is {max_new}; this server allows at most {p.max_new_tokens}", param="max_tokens"
        )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return max_new, stops


def check_messages(body: ChatRequest, p: ServeParams) -> list[dict]:
    """The conversation as plain dicts, or a 400 naming the message and what is wrong with it."""
    if len(body.messages) > p.max_messages:
        raise ApiError(400, f"{len(body.messages)} messages; the limit is {p.max_messages}", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if not text.strip():
            raise ApiError(400, f"messages[{i}].content is empty", param=f"messages.{i}.content")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, f"messages[{i}].content is not valid Unicode (lone surrogate)", param=f"messages.{i}.content"
            ) from None
        found = _RESERVED.search(text)
        if found:
            raise ApiError(
                400,
                f"messages[{i}].content contains the reserved control token {found.group(0)}",
                param=f"messages.{i}.content",
            )
        out.append({"role": m.role, "content": text})
    if out[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be from the user, got {out[-1]['role']!r}", param="messages")
    return out
