"""OpenAI-style chat messages -> the shape a chat template expects, plus their image and video
URLs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmdisagg.models.errors import InputError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatPrompt:
    """Messages for ``apply_chat_template`` (image parts become ``{"type": "image"}``, video
    parts ``{"type": "video"}``) and the URL of each image and of each video, in order."""

    messages: list[dict[str, Any]]
    image_urls: list[str]
    video_urls: list[str]

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
    """Check the messages' shape and pull out their images and videos; InputError names what is
    wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("'messages' must be a non-empty list")
    parsed: list[dict[str, Any]] = []
    urls: dict[str, list[str]] = {"image": [], "video": []}
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
        parts = [_parse_part(part, f"{where}, part {index}", urls)
                 for index, part in enumerate(content, start=1)]
        parsed.append({"role": role, "content": parts})
    return ChatPrompt(parsed, urls["image"], urls["video"])


def _parse_part(part: Any, where: str, urls: dict[str, list[str]]) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": text}
    if kind in ("image_url", "video_url"):
        media = kind.removesuffix("_url")
        holder = part.get(kind)
        url = holder.get("url") if isinstance(holder, Mapping) else holder
        if not isinstance(url, str) or not url:
            raise InputError(f"{where}: a {kind} part needs '{kind}': {{'url': ...}}")
        urls[media].append(url)
        return {"type": media}
    raise InputError(f"{where}: unsupported content part type {kind!r} "
                     "(use text, image_url or video_url)")
