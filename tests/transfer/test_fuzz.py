"""Fuzzing the transfer layer's untrusted inputs: control frames, hostile control messages from
a registered peer, and raw tcp data-plane streams. See docs/reliability.md.

Examples are derandomized, so CI sees the same ones every run; ``MMDISAGG_FUZZ=long`` draws
random ones, 25 times as many (``--hypothesis-seed`` then replays a run).
"""

from __future__ import annotations

import os

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdisagg.transfer.protocol import (
    VERSION,
    Abort,
    Announce,
    ChunkDone,
    ControlCodec,
    Heartbeat,
    ProtocolError,
    Received,
    Window,
)

LONG = os.environ.get("MMDISAGG_FUZZ") == "long"


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples * (25 if LONG else 1), derandomize=not LONG,
                    database=None, deadline=None, print_blob=LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the control codec --------------------------------------------------------------------

TOKEN = "fuzz-secret"
TAGS = ["window", "announce", "chunk", "received", "abort", "heartbeat"]
FIELDS = ["room", "start_token", "blocks", "allocated_tokens", "total_tokens", "num_tokens",
          "mrope_delta", "reason"]
MSGPACK_INTS = st.integers(-(2**63), 2**64 - 1)

msgpack_values = st.recursive(
    st.none() | st.booleans() | MSGPACK_INTS | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

messages = st.one_of(
    st.builds(Window, MSGPACK_INTS, MSGPACK_INTS, st.lists(MSGPACK_INTS, max_size=8),
              MSGPACK_INTS),
    st.builds(Announce, MSGPACK_INTS, MSGPACK_INTS),
    st.builds(ChunkDone, MSGPACK_INTS, MSGPACK_INTS, MSGPACK_INTS, MSGPACK_INTS, MSGPACK_INTS),
    st.builds(Received, MSGPACK_INTS),
    st.builds(Abort, MSGPACK_INTS, st.text()),
    st.just(Heartbeat()),
)


@st.composite
def tagged_dicts(draw) -> bytes:
    """A body with a real tag but fields missing, extra, or of the wrong type."""
    body = {"type": draw(st.sampled_from(TAGS) | st.text(max_size=10))}
    for name in draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=6)):
        body[name] = draw(msgpack_values)
    return msgspec.msgpack.encode(body)


@st.composite
def mutated(draw, body: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "extend", "flip", "splice"]))
    if how == "truncate":
        return body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    if how == "extend":
        return body + draw(st.binary(min_size=1, max_size=16))
    at = draw(st.integers(0, max(len(body) - 1, 0)))
    if how == "flip":
        return body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1:]
    return body[:at] + draw(st.binary(max_size=16)) + body[at:]


@st.composite
def frames(draw) -> list[bytes]:
    codec = ControlCodec(TOKEN, draw(st.text(max_size=20)))
    kind = draw(st.sampled_from(["valid", "mutated", "tagged", "nested", "random", "frames"]))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), max_size=6))
    if kind == "nested":
        return deeply_nested(draw(st.sampled_from(TAGS)), draw(st.sampled_from(DEPTHS)))
    valid = codec.encode(draw(messages))
    if kind == "mutated":
        valid[3] = draw(mutated(valid[3]))
    elif kind == "tagged":
        valid[3] = draw(tagged_dicts())
    elif kind == "frames":
        which = draw(st.integers(0, 3))
        valid[which] = draw(st.binary(max_size=32) | st.sampled_from([b"", VERSION, b"\xff"]))
        if draw(st.booleans()):
            valid = draw(st.sampled_from([valid[:-1], [*valid, b""], valid[:2], []]))
    return valid


DEPTHS = [1, 100, 10_000, 200_000]  # 200k arrays: 200 kB, well under the 1 MB frame limit


def deeply_nested(tag: str, depth: int) -> list[bytes]:
    """A message with an extra field nested ``depth`` arrays deep, which msgspec skips."""
    body = msgspec.msgpack.encode({"type": tag, "room": 1, "reason": ""})
    nested = msgspec.msgpack.encode("x") + b"\x91" * depth + b"\xc0"
    return [VERSION, TOKEN.encode(), b"peer", bytes([body[0] + 1]) + body[1:] + nested]


def well_typed(message: object) -> bool:
    fields = {name: getattr(message, name) for name in message.__struct_fields__}
    return all(isinstance(value, str) if name == "reason" else
               all(type(b) is int for b in value) if name == "blocks" else type(value) is int
               for name, value in fields.items())


@fuzz_settings(2000)
@given(frames())
def test_codec_decodes_or_raises_protocol_error(raw):
    codec = ControlCodec(TOKEN, "me")
    try:
        source, message = codec.decode(raw)
    except ProtocolError:
        return
    assert isinstance(source, str)
    assert isinstance(message, Window | Announce | ChunkDone | Received | Abort | Heartbeat)
    assert well_typed(message)
