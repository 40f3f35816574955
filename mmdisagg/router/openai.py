"""The OpenAI chat-completions schema: what a request may say, and the shapes of replies.

Unknown fields are refused (a typo must not silently change nothing); OpenAI fields that
mmdisagg does not implement are accepted only at their no-op values. ``return_token_ids`` (a
vLLM-style extension) adds the generated token ids to each choice.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmdisagg.core import SamplingParams
from mmdisagg.messages import TokenEvent

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    # OpenAI fields accepted only at the value that changes nothing here.
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logprobs: Literal[False] = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not stop or len(stop) > MAX_STOP_LENGTH for stop in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def one_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=self.max_tokens or self.max_completion_tokens or default_max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            seed=self.seed, stop=tuple(stops), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos)


class Completion:
    """Builds the reply to one request, whole or as stream chunks."""

    def __init__(self, model: str, return_token_ids: bool, request_id: str) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.return_token_ids = return_token_ids

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(event: TokenEvent) -> dict[str, int]:
        return {"prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def whole(self, events: list[TokenEvent]) -> dict[str, Any]:
        last = events[-1]
        choice: dict[str, Any] = {
            "index": 0, "logprobs": None, "finish_reason": last.finish_reason,
            "message": {"role": "assistant", "content": "".join(e.text for e in events)}}
        if self.return_token_ids:
            choice["token_ids"] = [t for e in events for t in e.token_ids]
        return {**self._envelope("chat.completion"), "choices": [choice],
                "usage": self.usage(last)}

    def chunk(self, event: TokenEvent | None) -> dict[str, Any]:
        """The first chunk (``None``: the assistant role) or the chunk of one event."""
        if event is None:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            finish = None
        else:
            delta = {"content": event.text} if event.text else {}
            finish = event.finish_reason
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
        if self.return_token_ids and event is not None:
            choice["token_ids"] = event.token_ids
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, last: TokenEvent) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk"), "choices": [],
                "usage": self.usage(last)}


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "mmdisagg"}]}
