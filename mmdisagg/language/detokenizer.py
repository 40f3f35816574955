"""Generated token ids -> text deltas that are safe to stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INCOMPLETE = "\ufffd"  # what a decode ends with while a character's bytes are still arriving


class Detokenizer:
    """Incremental detokenization for one request, with stop strings.

    ``push`` returns only text that can no longer change: never part of a UTF-8 character
    whose bytes are split across tokens, and never a tail that might turn out to be the start
    of a stop string. Once a stop string appears, ``stopped`` is set and the text ends just
    before it. ``flush`` releases whatever was held back when the request ends otherwise.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        # NOTE: ids[_context:_read] are already decoded into _text; decoding from _context
        # (not from 0) keeps each push cheap while giving the tokenizer the left context.
        self._context = 0
        self._read = 0
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        context_text = self._decode(self._ids[self._context:self._read])
        text = self._decode(self._ids[self._context:])
        if not text.endswith(INCOMPLETE):
            self._text += text[len(context_text):]
            self._context, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """All text not yet returned, an unfinished character included (as U+FFFD)."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            context_text = self._decode(self._ids[self._context:self._read])
            self._text += self._decode(self._ids[self._context:])[len(context_text):]
            self._read = len(self._ids)
        delta = self._text[self._emitted:]
        self._emitted = len(self._text)
        return delta

    def _release(self) -> str:
        start = self._emitted
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._text = self._text[:min(hits)]
            end = len(self._text)
        else:
            end = len(self._text) - self._held_back(start)
        self._emitted = max(start, end)
        return self._text[start:self._emitted]

    def _held_back(self, start: int) -> int:
        """Length of the longest tail after ``start`` that a stop string begins with."""
        tail = self._text[start:]
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)


class TokenTexts:
    """Each token id's own text (what logprobs report), decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tokenizer.decode([token])
        return text
