"""The OpenAI schema: what a chat or text completion request may say, and the replies' shapes.

Unknown fields are refused (a typo must not silently change nothing). Fields a client sends
for bookkeeping (``store``, ``metadata``, ``user``, ``service_tier``) are accepted and ignored.
Sampling fields a request leaves out take the served checkpoint's defaults (its
generation_config.json). ``return_token_ids`` (a vLLM-style extension) adds the generated
token ids to each choice. docs/api.md lists every field.
"""

from __future__ import annotations

import json
import time
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
MAX_LOGIT_BIAS = 100.0


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

    def sampling_params(self, defaults: dict[str, float], default_max_tokens: int
                        ) -> SamplingParams:
        """The request's sampling, with the checkpoint's ``defaults`` for what it left out."""

        def pick(name: str) -> Any:
            given = getattr(self, name)
            return given if given is not None else defaults.get(name, NEUTRAL[name])

        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        max_tokens = (self.asked_max_tokens[1] or int(defaults.get("max_new_tokens", 0))
                      or default_max_tokens)
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"),
            top_k=max(int(pick("top_k")), 0), seed=self.seed, stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            min_p=pick("min_p"), repetition_penalty=pick("repetition_penalty"),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens, logit_bias=self.parsed_logit_bias(),
            logprobs=self.asked_logprobs, n=self.n, grammar=self.grammar())

    def parsed_logit_bias(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ApiError(400, f"logit_bias: keys must be token ids and biases in "
                                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (got "
                                    f"{key!r}: {bias})", "logit_bias")
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))

    @property
    def asked_logprobs(self) -> int | None:
        return None

    def grammar(self) -> GrammarSpec | None:
        return None


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
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def asked_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt(self) -> PromptInput:
        return PromptInput(messages=self.messages, tools=self.tools)

    def grammar(self) -> GrammarSpec | None:
        """The structure the output must have: a JSON object, JSON matching the request's
        schema, or (tool_choice required or named) one well-formed tool call."""
        forced = self.forces_tool_call
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

    @property
    def asked_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_input(self) -> PromptInput:
        return PromptInput(text=self.prompt)


def usage(finals: list[TokenEvent]) -> dict[str, int]:
    """Of a request whose choices ended with ``finals``: the prompt counts once."""
    prompt = finals[0].prompt_tokens
    completion = sum(event.completion_tokens for event in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def by_choice(events: list[TokenEvent]) -> list[list[TokenEvent]]:
    choices: dict[int, list[TokenEvent]] = {}
    for event in events:
        choices.setdefault(event.index, []).append(event)
    return [choices[index] for index in sorted(choices)]


class Reply:
    """Builds the reply to one request of ``n`` choices, whole or as stream chunks."""

    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, model: str, return_token_ids: bool, request_id: str, n: int = 1
                 ) -> None:
        self.id = f"{self.id_prefix}{request_id}"
        self.created = int(time.time())
        self.model = model
        self.return_token_ids = return_token_ids
        self.n = n

    def envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def whole(self, events: list[TokenEvent]) -> dict[str, Any]:
        choices = by_choice(events)
        return {**self.envelope(self.object_whole),
                "choices": [self._whole_choice(choice) for choice in choices],
                "usage": usage([choice[-1] for choice in choices])}

    def usage_chunk(self, finals: list[TokenEvent]) -> dict[str, Any]:
        return {**self.envelope(self.object_chunk), "choices": [], "usage": usage(finals)}

    def _whole_choice(self, events: list[TokenEvent]) -> dict[str, Any]:
        raise NotImplementedError

    def _token_ids(self, choice: dict[str, Any], events: list[TokenEvent]) -> dict[str, Any]:
        if self.return_token_ids:
            choice["token_ids"] = [t for e in events for t in e.token_ids]
        return choice


def chat_logprobs(events: list[TokenEvent]) -> dict[str, Any] | None:
    """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if all(event.logprobs is None for event in events):
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(item.token, item.logprob),
         "top_logprobs": [entry(token, logprob) for token, logprob in item.top]}
        for event in events for item in event.logprobs or ()]}


def text_logprobs(events: list[TokenEvent], offset: int = 0) -> dict[str, Any] | None:
    """Legacy completions ``logprobs``: parallel lists, offsets into the generated text."""
    if all(event.logprobs is None for event in events):
        return None
    items = [item for event in events for item in event.logprobs or ()]
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {"tokens": [item.token for item in items],
            "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [dict(item.top) for item in items], "text_offset": offsets}


class ChatReply(Reply):
    """With ``tool_parsing`` (True: parallel calls allowed), Qwen's tool-call blocks become
    ``tool_calls``, per choice."""

    def __init__(self, model: str, return_token_ids: bool, request_id: str, n: int = 1,
                 tool_parsing: bool | None = None) -> None:
        super().__init__(model, return_token_ids, request_id, n)
        self.tool_parsing = tool_parsing
        self.parsers = ([ToolCallParser(tool_parsing) for _ in range(n)]
                        if tool_parsing is not None else None)

    def _whole_choice(self, events: list[TokenEvent]) -> dict[str, Any]:
        text = "".join(e.text for e in events)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = events[-1].finish_reason
        if self.tool_parsing is not None:
            message["content"], calls = split_tool_calls(text, self.tool_parsing)
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls" if finish == "stop" else finish
        choice = {"index": events[0].index, "logprobs": chat_logprobs(events),
                  "finish_reason": finish, "message": message}
        return self._token_ids(choice, events)

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk(index, {"role": "assistant", "content": ""})
                for index in range(self.n)]

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        """The chunks of one event: its text (or tool calls), then its finish reason."""
        parser = self.parsers[event.index] if self.parsers is not None else None
        if parser is None:
            deltas = [{"content": event.text}] if event.text else []
        else:
            deltas = parser.feed(event.text)
            if event.finish_reason is not None:
                deltas += parser.flush()
        finish = event.finish_reason
        if finish == "stop" and parser is not None and parser.calls:
            finish = "tool_calls"
        if not deltas and (finish is not None or self.return_token_ids
                           or event.logprobs is not None):
            deltas = [{}]
        chunks = [self._chunk(event.index, delta) for delta in deltas]
        if chunks:
            last = chunks[-1]["choices"][0]
            last["finish_reason"] = finish
            last["logprobs"] = chat_logprobs([event])
            if self.return_token_ids:
                last["token_ids"] = event.token_ids
        return chunks

    def _chunk(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        return {**self.envelope(self.object_chunk), "choices": [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}


class TextReply(Reply):
    """A ``/v1/completions`` reply: text, no roles; chunks have the same shape as the whole."""

    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str, return_token_ids: bool, request_id: str, n: int = 1
                 ) -> None:
        super().__init__(model, return_token_ids, request_id, n)
        self.offsets = [0] * n

    def _whole_choice(self, events: list[TokenEvent]) -> dict[str, Any]:
        choice = {"index": events[0].index, "text": "".join(e.text for e in events),
                  "logprobs": text_logprobs(events),
                  "finish_reason": events[-1].finish_reason}
        return self._token_ids(choice, events)

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, event: TokenEvent) -> list[dict[str, Any]]:
        if not (event.text or event.finish_reason or self.return_token_ids
                or event.logprobs is not None):
            return []
        choice = {"index": event.index, "text": event.text,
                  "logprobs": text_logprobs([event], self.offsets[event.index]),
                  "finish_reason": event.finish_reason}
        self.offsets[event.index] += sum(len(item.token) for item in event.logprobs or ())
        return [{**self.envelope(self.object_chunk),
                 "choices": [self._token_ids(choice, [event])]}]


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mmdisagg"}


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, created)]}
