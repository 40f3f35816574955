"""The OpenAI schema: what a chat or text completion request may say, and the replies' shapes.

Unknown fields are refused (a typo must not silently change nothing). Fields a client sends
for bookkeeping (``store``, ``metadata``, ``user``, ``service_tier``) are accepted and ignored;
fields that would change results and are not implemented yet are refused with a 400 naming
them unless they hold their neutral value. Sampling fields a request leaves out take the
served checkpoint's defaults (its generation_config.json). ``return_token_ids`` (a vLLM-style
extension) adds the generated token ids to each choice. docs/api.md lists every field.
"""

from __future__ import annotations

import json
import time
import uuid
from importlib.metadata import version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmdisagg.core import GrammarSpec, PromptInput, SamplingParams
from mmdisagg.httpapp import ApiError
from mmdisagg.messages import TokenEvent
from mmdisagg.router.tools import CLOSE, OPEN, ToolCallParser, split_tool_calls

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20
SYSTEM_FINGERPRINT = f"fp_mmdisagg_{version('mmdisagg')}"
# Sampling fields with their neutral value: what a request that does not use them means.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
           "repetition_penalty": 1.0}
# Fields the sampler cannot honour yet, with the value that changes nothing.
NOT_YET = {"min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
           "frequency_penalty": 0.0, "min_tokens": 0, "n": 1}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingRequest(BaseModel):
    """What chat and text completions share: sampling, stopping, streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    min_tokens: int = Field(default=0, ge=0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    # Bookkeeping fields some clients always send: accepted, ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not stop or len(stop) > MAX_STOP_LENGTH for stop in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_LENGTH} characters")
        return value

    @property
    def asked_max_tokens(self) -> tuple[str, int | None]:
        """(field name, value) of the output limit the request set."""
        return "max_tokens", self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, Any]]:
        """(field, value) the request sets that mmdisagg cannot honour yet."""
        found = [(name, getattr(self, name)) for name, neutral in NOT_YET.items()
                 if name in type(self).model_fields and getattr(self, name) is not None
                 and getattr(self, name) != neutral]
        if self.logit_bias:
            found.append(("logit_bias", self.logit_bias))
        return found

    def sampling_params(self, defaults: dict[str, float], default_max_tokens: int
                        ) -> SamplingParams:
        """The request's sampling, with the checkpoint's ``defaults`` for what it left out;
        ApiError for what the sampler cannot honour."""
        unsupported = self.unsupported()
        for name in ("min_p", "repetition_penalty"):
            value = defaults.get(name)
            if getattr(self, name) is None and value is not None and value != NEUTRAL[name]:
                unsupported.append((name, f"{value} (the served checkpoint's default)"))
        if unsupported:
            name, value = unsupported[0]
            raise ApiError(400, f"{name}: {value} is not supported yet; leave it out or send "
                                f"{name}={NOT_YET.get(name, 'null')!r} (a checkpoint default "
                                f"can be replaced with --override-generation-config)", name)

        def pick(name: str) -> Any:
            given = getattr(self, name)
            return given if given is not None else defaults.get(name, NEUTRAL[name])

        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        max_tokens = (self.asked_max_tokens[1] or int(defaults.get("max_new_tokens", 0))
                      or default_max_tokens)
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"),
            top_k=max(int(pick("top_k")), 0), seed=self.seed, stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos)


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    store: bool = False

    @model_validator(mode="after")
    def consistent(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, dict):
            function = self.tool_choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if self.tool_choice.get("type") != "function" or not isinstance(name, str):
                raise ValueError("tool_choice must be none, auto, required or "
                                 "{'type': 'function', 'function': {'name': ...}}")
            names = [(tool.get("function") or {}).get("name") for tool in self.tools or ()
                     if isinstance(tool, dict)]
            if name not in names:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def asked_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def unsupported(self) -> list[tuple[str, Any]]:
        found = super().unsupported()
        if self.logprobs:
            found.append(("logprobs", True))
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", self.response_format.type))
        if self.tool_choice == "required" or isinstance(self.tool_choice, dict):
            found.append(("tool_choice", self.tool_choice))
        return found

    def prompt(self) -> PromptInput:
        return PromptInput(messages=self.messages, tools=self.tools)

    def grammar(self) -> GrammarSpec | None:
        """The structure the output must have: a JSON object, JSON matching the request's
        schema, or (tool_choice required or named) one well-formed tool call."""
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, dict)
        wants_json = self.response_format is not None and self.response_format.type != "text"
        if forced and wants_json:
            raise ApiError(400, "give a JSON response_format or a required tool call, not both",
                           "response_format")
        if forced:
            named = (self.tool_choice["function"]["name"]
                     if isinstance(self.tool_choice, dict) else None)
            calls = [tool_call_schema(tool["function"]) for tool in self.tools or ()
                     if named in (None, tool["function"]["name"])]
            schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
            return GrammarSpec(json.dumps(schema), begin=OPEN + "\n", end="\n" + CLOSE)
        if not wants_json:
            return None
        if self.response_format.type == "json_object":
            return GrammarSpec(json.dumps({"type": "object"}))
        schema = (self.response_format.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema: a JSON schema object is "
                                "required", "response_format")
        return GrammarSpec(json.dumps(schema))


def tool_call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one call of ``function`` as Qwen writes it between the tool-call tags."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": function["name"]},
                           "arguments": function.get("parameters") or {"type": "object"}}}


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError("one prompt per request (send several requests for more)")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    def unsupported(self) -> list[tuple[str, Any]]:
        found = super().unsupported()
        if self.logprobs is not None:
            found.append(("logprobs", self.logprobs))
        return found

    def prompt_input(self) -> PromptInput:
        return PromptInput(text=self.prompt)


def usage(event: TokenEvent) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class Reply:
    """Builds the reply to one request, whole or as stream chunks."""

    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, model: str, return_token_ids: bool) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.return_token_ids = return_token_ids

    def envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def usage_chunk(self, last: TokenEvent) -> dict[str, Any]:
        return {**self.envelope(self.object_chunk), "choices": [], "usage": usage(last)}

    def _token_ids(self, choice: dict[str, Any], events: list[TokenEvent]) -> dict[str, Any]:
        if self.return_token_ids:
            choice["token_ids"] = [t for e in events for t in e.token_ids]
        return choice


class ChatReply(Reply):
    def __init__(self, model: str, return_token_ids: bool, tools: ToolCallParser | None) -> None:
        super().__init__(model, return_token_ids)
        self.tools = tools

    def whole(self, events: list[TokenEvent]) -> dict[str, Any]:
        last = events[-1]
        text = "".join(e.text for e in events)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = last.finish_reason
        if self.tools is not None:
            message["content"], calls = split_tool_calls(text, self.tools.parallel)
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls" if finish == "stop" else finish
        choice = {"index": 0, "logprobs": None, "finish_reason": finish, "message": message}
        return {**self.envelope(self.object_whole),
                "choices": [self._token_ids(choice, events)], "usage": usage(last)}

    def first_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        """The chunks of one event: its text (or tool calls), then its finish reason."""
        if self.tools is None:
            deltas = [{"content": event.text}] if event.text else []
        else:
            deltas = self.tools.feed(event.text)
            if event.finish_reason is not None:
                deltas += self.tools.flush()
        finish = event.finish_reason
        if finish == "stop" and self.tools is not None and self.tools.calls:
            finish = "tool_calls"
        if not deltas and (finish is not None or self.return_token_ids):
            deltas = [{}]
        chunks = [self._chunk(delta, None) for delta in deltas]
        if chunks:
            chunks[-1]["choices"][0]["finish_reason"] = finish
            if self.return_token_ids:
                chunks[-1]["choices"][0]["token_ids"] = event.token_ids
        return chunks

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {**self.envelope(self.object_chunk), "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class TextReply(Reply):
    """A ``/v1/completions`` reply: text, no roles; chunks have the same shape as the whole."""

    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def whole(self, events: list[TokenEvent]) -> dict[str, Any]:
        last = events[-1]
        choice = {"index": 0, "text": "".join(e.text for e in events), "logprobs": None,
                  "finish_reason": last.finish_reason}
        return {**self.envelope(self.object_whole),
                "choices": [self._token_ids(choice, events)], "usage": usage(last)}

    def first_chunk(self) -> None:
        return None

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        if not (event.text or event.finish_reason or self.return_token_ids):
            return []
        choice = {"index": 0, "text": event.text, "logprobs": None,
                  "finish_reason": event.finish_reason}
        return [{**self.envelope(self.object_chunk),
                 "choices": [self._token_ids(choice, [event])]}]


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mmdisagg"}


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created)]}
