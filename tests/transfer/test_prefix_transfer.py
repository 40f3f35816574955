"""Prefix-aware transfer: a receiver whose prefix cache holds the start of a prompt is sent only
the rest, from its first uncached token (inside a pool block), over every data plane, between
real processes."""

from __future__ import annotations

import time

import pytest
from backends import BACKENDS
from peers import Peer
from test_transfer import assert_exact, layout, transfer

TOKEN_BYTES = 256 * 2 + 4 + 12  # hidden 256 in bfloat16, one token id, three positions


@pytest.fixture
def pair():
    started: list[Peer] = []

    def start_pair(backend: str, **receiver_kwargs) -> tuple[Peer, Peer]:
        sender = Peer("sender", backend, layout(64))
        started.append(sender)
        receiver = Peer("receiver", backend, layout(64), prefix_cache=True, **receiver_kwargs)
        started.append(receiver)
        return sender, receiver

    yield start_pair
    for peer in started:
        peer.close()


def cache(receiver: Peer, room: int, total: int, tokens: int) -> None:
    receiver.command(op="cache", room=room, total=total, tokens=tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("held", [1024, 1000])  # a hit on a pool block's edge, and inside one
def test_only_the_uncached_suffix_crosses(pair, backend, held):
    sender, receiver = pair(backend)
    cached = held // 16 * 16
    cache(receiver, 41, 2000, held)
    received, sent = transfer(sender, receiver, {41: 2000})
    assert_exact(received, {41: 2000})
    assert received[41]["cached"] == received[41]["first"] == cached
    assert sent[41]["state"] == "Success"
    receiver_stats, sender_stats = receiver.wait_pool_full(), sender.wait_pool_full()
    assert receiver_stats["bytes"] == sender_stats["bytes"] == (2000 - cached) * TOKEN_BYTES
    assert receiver_stats["cached_tokens"] == cached and receiver_stats["pinned"] == 0
    assert receiver_stats["live"] == sender_stats["live"] == 0


@pytest.mark.parametrize("total, held, cached", [
    (1024, 1024, 1008),  # all of it held: the last token is not, for prefill's logits
    (1000, 1024, 992),
    (2000, 0, 0),  # a receiver with a cache that holds nothing of it
    (10, 0, 0),  # shorter than a hash block: nothing to look up
    (3000, 200, 192),  # sent from inside the window's first block
    (3000, 96, 96),  # a hit inside the first block: the first window stays
])
def test_how_much_is_skipped(pair, total, held, cached):
    sender, receiver = pair("shm")
    room = 50 + total + held
    if held:
        cache(receiver, room, total, held)
    received, _ = transfer(sender, receiver, {room: total})
    assert_exact(received, {room: total})
    assert received[room]["cached"] == received[room]["first"] == cached
    stats = receiver.wait_pool_full()
    assert stats["bytes"] == (total - cached) * TOKEN_BYTES and stats["pinned"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepstack_rows_of_the_suffix_land_where_its_tokens_do(backend):
    """A pool with deepstack rows (Qwen3-VL): after a hit inside a pool block, the visual runs
    of the first chunk count from its first token, and each token's rows land with it."""
    sender = Peer("sender", backend, layout(64, deepstack_layers=3))
    receiver = Peer("receiver", backend, layout(64, deepstack_layers=3), prefix_cache=True)
    try:
        rooms = {43: 2000, 45: 1500}  # odd rooms carry runs of visual tokens
        for room, total in rooms.items():
            cache(receiver, room, total, 1000)
        received, _ = transfer(sender, receiver, rooms)
        assert_exact(received, rooms)
        assert all(received[room]["first"] == 992 for room in rooms)
    finally:
        sender.close()
        receiver.close()


def test_a_cache_of_another_prompt_does_not_hit(pair):
    sender, receiver = pair("shm")
    cache(receiver, 60, 2000, 1024)  # room 60's prompt; room 61's differs from its first token
    received, _ = transfer(sender, receiver, {61: 2000})
    assert_exact(received, {61: 2000})
    assert received[61]["cached"] == 0


def test_a_hit_is_released_when_the_sender_dies(pair):
    """The encode server dies after the language side pinned a hit, before sending a byte."""
    sender, receiver = pair("tcp")
    cache(receiver, 70, 3000, 1024)
    receiver.command(op="recv", room=70, encoder=sender.bootstrap)
    sender.command(op="send", room=70, total=3000, hold=True)  # announces, never sends
    deadline = time.monotonic() + 60
    while receiver.stats()["pinned"] != 1:
        assert time.monotonic() < deadline, "the receiver never pinned the hit"
        time.sleep(0.05)
    sender.proc.kill()
    failed = receiver.done([70])[70]
    assert failed["state"] == "Failed"
    stats = receiver.wait_pool_full()
    assert stats["pinned"] == 0 and stats["live"] == 0
