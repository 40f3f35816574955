"""The router reads a language server's token events line by line: a token's text may hold
characters that ``str.splitlines`` takes for line breaks, which JSON leaves unescaped."""

from __future__ import annotations

import asyncio

import msgspec

from mmdisagg.messages import Event, TokenEvent
from mmdisagg.router.dispatch import ndjson_lines

# Found by the soak: a random-weight model emitted one of these and the router answered
# "sent a bad event: Input data was truncated".
ODD_BREAKS = "a\u2028b\u2029c\x85d\x0be\x1cf\rg"


async def _chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def _lines(data: bytes, size: int) -> list[bytes]:
    return [line async for line in ndjson_lines(_chunks(data, size))]


def test_events_whose_text_holds_unicode_line_breaks_arrive_whole():
    events = [TokenEvent(ODD_BREAKS * i, [i], None, 5, i) for i in range(3)]
    data = b"".join(msgspec.json.encode(e) + b"\n" for e in events)
    for size in range(1, len(data) + 1):  # every way the bytes can be cut into chunks
        lines = asyncio.run(_lines(data, size))
        assert [msgspec.json.decode(line, type=Event) for line in lines] == events


def test_blank_lines_are_skipped_and_a_last_line_without_newline_is_kept():
    assert asyncio.run(_lines(b'\n{"a":1}\n\n  \n{"b":2}', 3)) == [b'{"a":1}', b'{"b":2}']
