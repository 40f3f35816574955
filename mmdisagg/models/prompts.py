"""OpenAI-style chat messages (and tools) -> the shape a chat template expects, plus their
images and video URLs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmdisagg.models.errors import InputError

ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's newer name for the system role; chat templates know only "system".
ROLE_ALIASES = {"developer": "system"}
IMAGE_DETAILS = ("auto", "low", "high")


@dataclass(frozen=True)
class ImageRef:
    """An image part: where to read it, and ``detail`` ("low": the processor's smallest pixel
    budget; "auto"/"high": its default)."""

    url: str
    detail: str = "auto"


@dataclass(frozen=True)
class ChatPrompt:
    """Messages for ``apply_chat_template`` (image parts become ``{"type": "image"}``, video
    parts ``{"type": "video"}``; assistant ``tool_calls`` carry their arguments as objects, as
    templates expect), the images and the video URLs in order, and the tools as templates
    expect them."""

    messages: list[dict[str, Any]]
    images: list[ImageRef]
    video_urls: list[str]
    tools: list[dict[str, Any]] | None = None

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of all the text the messages and tools carry."""
        return sum(len(text.encode()) for text in self._texts())

    def _texts(self):
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                yield content
            else:
                yield from (part["text"] for part in content if part["type"] == "text")
            for call in message.get("tool_calls", ()):
                yield json.dumps(call)
        if self.tools:
            yield json.dumps(self.tools)


def parse_messages(messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Mapping[str, Any]] | None = None) -> ChatPrompt:
    """Check the messages' (and tools') shape and pull out their images and videos;
    InputError names what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("'messages' must be a non-empty list")
    parsed: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    video_urls: list[str] = []
    for number, message in enumerate(messages, start=1):
        where = f"message {number}"
        if not isinstance(message, Mapping):
            raise InputError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"{where}: 'role' must be one of {', '.join(ROLES)}")
        entry: dict[str, Any] = {"role": ROLE_ALIASES.get(role, role)}
        content = message.get("content")
        if content is None:
            entry["content"] = ""
        elif isinstance(content, str):
            entry["content"] = content
        elif isinstance(content, Sequence):
            entry["content"] = [_parse_part(part, f"{where}, part {index}", images, video_urls)
                                for index, part in enumerate(content, start=1)]
        else:
            raise InputError(f"{where}: 'content' must be a string or a list of parts")
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise InputError(f"{where}: only assistant messages carry 'tool_calls'")
            entry["tool_calls"] = _parse_tool_calls(message["tool_calls"], where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise InputError(f"{where}: a tool message needs a string 'tool_call_id'")
            entry["tool_call_id"] = call_id
        parsed.append(entry)
    return ChatPrompt(parsed, images, video_urls, parse_tools(tools) if tools else None)


def parse_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI ``tools``: a list of ``{"type": "function", "function": {"name", ...}}``."""
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise InputError("'tools' must be a list of functions")
    parsed = []
    for number, tool in enumerate(tools, start=1):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (not isinstance(tool, Mapping) or tool.get("type") != "function"
                or not isinstance(function, Mapping)
                or not isinstance(function.get("name"), str) or not function["name"]):
            raise InputError(f"tool {number}: expected {{'type': 'function', 'function': "
                             "{'name': ..., 'parameters': {...}}}")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, Mapping):
            raise InputError(f"tool {number}: 'parameters' must be a JSON schema object")
        parsed.append({"type": "function", "function": dict(function)})
    return parsed


def _parse_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise InputError(f"{where}: 'tool_calls' must be a list")
    parsed = []
    for index, call in enumerate(calls, start=1):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InputError(f"{where}, tool call {index}: needs 'function': "
                             "{'name': ..., 'arguments': ...}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InputError(f"{where}, tool call {index}: 'arguments' is not JSON") from None
        parsed.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    return parsed


def _parse_part(part: Any, where: str, images: list[ImageRef], video_urls: list[str]
                ) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": text}
    if kind in ("image_url", "video_url"):
        holder = part.get(kind)
        url = holder.get("url") if isinstance(holder, Mapping) else holder
        if not isinstance(url, str) or not url:
            raise InputError(f"{where}: a {kind} part needs '{kind}': {{'url': ...}}")
        if kind == "video_url":
            video_urls.append(url)
            return {"type": "video"}
        detail = (holder.get("detail") if isinstance(holder, Mapping) else None) or "auto"
        if detail not in IMAGE_DETAILS:
            raise InputError(f"{where}: image_url.detail must be one of "
                             f"{', '.join(IMAGE_DETAILS)} (got {detail!r})")
        images.append(ImageRef(url, detail))
        return {"type": "image"}
    raise InputError(f"{where}: unsupported content part type {kind!r} "
                     "(use text, image_url or video_url)")
