"""OpenAI-style chat messages -> the shape a chat template expects, plus their image URLs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmdisagg.models.errors import InputError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatPrompt:
    """Messages for ``apply_chat_template`` (image parts become ``{"type": "image"}``, in
    order) and the URL of each image, in the same order."""

    messages: list[dict[str, Any]]
    image_urls: list[str]

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of all the text the messages carry."""
        return sum(len(text.encode()) for text in self._texts())

    def _texts(self):
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                yield content
            else:
                yield from (part["text"] for part in content if part["type"] == "text")


def parse_messages(messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
    """Check the messages' shape and pull out their images; InputError names what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("'messages' must be a non-empty list")
    parsed: list[dict[str, Any]] = []
    image_urls: list[str] = []
    for number, message in enumerate(messages, start=1):
        where = f"message {number}"
        if not isinstance(message, Mapping):
            raise InputError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"{where}: 'role' must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            parsed.append({"role": role, "content": content})
            continue
        if not isinstance(content, Sequence):
            raise InputError(f"{where}: 'content' must be a string or a list of parts")
        parts = [_parse_part(part, f"{where}, part {index}", image_urls)
                 for index, part in enumerate(content, start=1)]
        parsed.append({"role": role, "content": parts})
    return ChatPrompt(parsed, image_urls)


def _parse_part(part: Any, where: str, image_urls: list[str]) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
        if not isinstance(url, str) or not url:
            raise InputError(f"{where}: an image_url part needs 'image_url': {{'url': ...}}")
        image_urls.append(url)
        return {"type": "image"}
    raise InputError(f"{where}: unsupported content part type {kind!r} (use text or image_url)")
