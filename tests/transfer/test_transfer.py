"""The transfer layer between real processes on 127.0.0.1, over every data plane."""

from __future__ import annotations

import os
import random
import signal

import pytest
import zmq
from backends import BACKENDS
from peer import make_prompt
from peers import Peer

from mmdisagg.pool.layout import PoolLayout
from mmdisagg.transfer.protocol import ControlCodec, Window

SIZES = [1, 127, 128, 129, 1024, 2000, 8000, 20000]


def layout(blocks: int, hidden: int = 256, dtype: str = "bfloat16",
           deepstack_layers: int = 0) -> dict:
    return {"num_blocks": blocks, "block_size": 128, "hidden_size": hidden, "dtype": dtype,
            "deepstack_layers": deepstack_layers}


@pytest.fixture
def start():
    started: list[Peer] = []

    def start_peer(role: str, backend: str, blocks: int, **kwargs) -> Peer:
        peer = Peer(role, backend, layout(blocks, kwargs.pop("hidden", 256),
                                          kwargs.pop("dtype", "bfloat16"),
                                          kwargs.pop("deepstack_layers", 0)), **kwargs)
        started.append(peer)
        return peer

    yield start_peer
    for peer in started:
        peer.ask_to_exit()
    for peer in started:
        peer.close()


def transfer(sender: Peer, receiver: Peer, rooms: dict[int, int], timeout: float = 120):
    for room, total in rooms.items():
        receiver.command(op="recv", room=room, encoder=sender.bootstrap, total=total)
        sender.command(op="send", room=room, total=total)
    return receiver.done(rooms, timeout), sender.done(rooms, timeout)


def assert_exact(results: dict, rooms: dict[int, int]) -> None:
    for room, total in rooms.items():
        event = results[room]
        assert event["state"] == "Success", event
        assert event["exact"] and event["total"] == total, event


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_exact_round_trip_all_sizes(start, backend, dtype):
    sender = start("sender", backend, 400, dtype=dtype)
    receiver = start("receiver", backend, 64, dtype=dtype)
    rooms = {1000 + size: size for size in SIZES}
    received, sent = transfer(sender, receiver, rooms)
    assert_exact(received, rooms)
    assert all(event["state"] == "Success" for event in sent.values())
    assert receiver.wait_pool_full()["live"] == 0
    assert sender.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_resume_after_announce(start, backend):
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 64, default_blocks=8)
    received, _ = transfer(sender, receiver, {7: 2000})
    assert_exact(received, {7: 2000})
    stats = receiver.stats()
    assert (stats["windows"], stats["resumes"], stats["spills"]) == (2, 1, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_resumes_with_tiny_windows(start, backend):
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 64, default_blocks=1,
                     transfer={"window_blocks": 2})
    received, _ = transfer(sender, receiver, {8: 2000})
    assert_exact(received, {8: 2000})
    assert receiver.stats()["resumes"] == 8  # 128 tokens, then 8 windows of up to 256


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_smaller_than_prompt_reuses_the_same_block_ids(start, backend):
    """Seed note 03: 2 blocks carry 1000 tokens, so every window reuses ids just freed."""
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 2, default_blocks=1, transfer={"window_blocks": 1})
    received, _ = transfer(sender, receiver, {9: 1000})
    assert_exact(received, {9: 1000})
    stats = receiver.stats()
    assert stats["windows"] == 8 and stats["spills"] >= 6 and stats["free_blocks"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_with_stale_data_from_an_earlier_request(start, backend):
    """Seed note 05: blocks still hold an older, longer prompt; only messages say the length."""
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 8, default_blocks=8)
    first, _ = transfer(sender, receiver, {21: 1000})
    assert_exact(first, {21: 1000})
    second, _ = transfer(sender, receiver, {22: 100})
    assert_exact(second, {22: 100})


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepstack_rows_travel_with_visual_tokens_only(start, backend):
    """Qwen3-VL's pools: odd rooms have runs of visual tokens, each carrying 3 deepstack rows;
    even rooms are text. Every room arrives exact (deepstack rows and visual mask included)
    over several windows (resumes after announce) and through spills (a receiver pool smaller
    than the prompt); the bytes moved are exactly a text token's for each token plus 3 rows for
    each visual one."""
    sender = start("sender", backend, 256, deepstack_layers=3)
    receiver = start("receiver", backend, 6, default_blocks=2, deepstack_layers=3,
                     transfer={"window_blocks": 2})
    rooms = {71: 1, 72: 300, 73: 129, 75: 700, 77: 2000}
    received, _ = transfer(sender, receiver, rooms)
    assert_exact(received, rooms)
    stats = receiver.stats()
    assert stats["resumes"] > 0 and stats["spills"] > 0
    pool = PoolLayout(**layout(1, deepstack_layers=3))
    prompts = [make_prompt(room, total, pool) for room, total in rooms.items()]
    visual = sum(int(prompt.visual_mask.sum()) for prompt in prompts)
    assert 0 < visual < sum(rooms.values())
    assert stats["bytes"] == sender.stats()["bytes"] == (
        sum(rooms.values()) * pool.token_bytes + visual * pool.deepstack_bytes)
    assert receiver.wait_pool_full()["live"] == 0
    assert sender.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_prompt_moves_the_same_bytes_with_or_without_deepstack_rows(start, backend):
    rooms = {82: 1000, 84: 129}
    moved = []
    for layers in (0, 3):
        sender = start("sender", backend, 64, deepstack_layers=layers)
        receiver = start("receiver", backend, 64, deepstack_layers=layers)
        received, _ = transfer(sender, receiver, rooms)
        assert_exact(received, rooms)
        moved.append(receiver.stats()["bytes"])
    assert moved[0] == moved[1] == sum(rooms.values()) * PoolLayout(**layout(1)).token_bytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_ready_in_stages_fill_windows_in_several_chunks(start, backend):
    """A sender whose rows are ready in 5 stages of 400 tokens sends each as it is ready, so a
    window takes several chunks (stages end at 400 and 800 inside the first 1024-token window,
    1200 and 1600 inside the second). A receiver that takes the prompt at its first chunk sees
    exact rows each time it looks, and the prompt it took early is the one it finally gets."""
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 64, default_blocks=8)
    receiver.command(op="recv", room=41, encoder=sender.bootstrap, total=2000, early=True)
    sender.command(op="send", room=41, total=2000, stages=5)
    receiver.command(op="recv", room=42, encoder=sender.bootstrap, total=700)
    sender.command(op="send", room=42, total=700, stages=3)
    received = receiver.done([41, 42])
    assert_exact(received, {41: 2000, 42: 700})
    early = received[41]
    assert early["same_object"] and early["partial_exact"], early
    assert early["landed_seen"][-1] == 2000 and early["landed_seen"] == sorted(
        early["landed_seen"]), early
    stats = receiver.stats()
    assert stats["chunks"] == 6 + 3 and stats["windows"] == 3, stats
    assert receiver.wait_pool_full()["live"] == 0 and sender.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_room_aborted_between_stages_leaves_its_source_to_the_encoder(start, backend):
    """Only the first of 5 stages is ever ready; the receiver aborts once it landed. The
    sender must not free the blocks the encoder still writes into: the encoder frees them (a
    double free or a leak shows in the pool's check)."""
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 64)
    receiver.command(op="recv", room=47, encoder=sender.bootstrap, abort_after_tokens=400)
    sender.command(op="send", room=47, total=2000, stages=5, hold_stages=True)
    assert receiver.done([47])[47]["state"] == "Failed"
    assert sender.done([47])[47]["state"] == "Failed"
    assert sender.wait_pool_full()["live"] == 0 and receiver.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepstack_rows_ready_in_stages(start, backend):
    """Stages cut visual runs; each chunk carries the deepstack rows of its own tokens."""
    sender = start("sender", backend, 64, deepstack_layers=3)
    receiver = start("receiver", backend, 64, default_blocks=2, deepstack_layers=3)
    rooms = {room: 1500 for room in (61, 63, 65)}
    for room, total in rooms.items():
        receiver.command(op="recv", room=room, encoder=sender.bootstrap, total=total)
        sender.command(op="send", room=room, total=total, stages=4)
    assert_exact(receiver.done(rooms), rooms)
    assert receiver.stats()["chunks"] > 2 * len(rooms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepstack_layout_mismatch_is_refused(start, backend):
    sender = start("sender", backend, 64, deepstack_layers=3)
    receiver = start("receiver", backend, 64)
    receiver.command(op="recv", room=53, encoder=sender.bootstrap)
    result = receiver.done([53])[53]
    assert result["state"] == "Failed"
    assert "layout mismatch: deepstack_layers 3 here vs 0" in result["failure"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_either_side_may_come_first(start, backend):
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 64)
    receiver.command(op="recv", room=31, encoder=sender.bootstrap)
    # the window waits at the encode side for its request
    sender.wait_until(lambda stats: stats["early_windows"] == 1)
    sender.command(op="send", room=31, total=900)
    sender.command(op="send", room=32, total=1500)
    # the announce waits for the receiver's first window
    sender.wait(lambda e: e["event"] == "announced" and e["room"] == 32, 30)
    receiver.command(op="recv", room=32, encoder=sender.bootstrap)
    assert_exact(receiver.done([31, 32]), {31: 900, 32: 1500})


@pytest.mark.parametrize("backend", BACKENDS)
def test_64_concurrent_rooms_two_senders_two_receivers(start, backend):
    senders = [start("sender", backend, 512) for _ in range(2)]
    receivers = [start("receiver", backend, 64) for _ in range(2)]
    rng = random.Random(5)
    plan = {}
    for i in range(64):
        room = rng.getrandbits(63)
        plan[room] = (i % 2, (i // 2) % 2, rng.randint(1, 3000))
    for room, (s, r, total) in plan.items():
        receivers[r].command(op="recv", room=room, encoder=senders[s].bootstrap, total=total)
        senders[s].command(op="send", room=room, total=total)
    for r, receiver in enumerate(receivers):
        mine = {room: total for room, (_, rr, total) in plan.items() if rr == r}
        assert_exact(receiver.done(mine, 180), mine)
    for peer in senders + receivers:
        assert peer.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_killed_mid_transfer(start, backend):
    """The receiver fails the room when the sender's heartbeats stop, or sooner, on tcp, when
    the kill lands inside a chunk and cuts its data stream."""
    sender = start("sender", backend, 256, hidden=1024)
    receiver = start("receiver", backend, 4, hidden=1024, default_blocks=1,
                     transfer={"window_blocks": 1})
    receiver.command(op="recv", room=41, encoder=sender.bootstrap)
    sender.command(op="send", room=41, total=20000, kill_after_tokens=2000)
    sender.wait(lambda e: e["event"] == "killing", 60)
    assert sender.proc.wait(timeout=30) != 0
    result = receiver.done([41], 30)[41]
    assert result["state"] == "Failed", result
    causes = ["stopped answering"] + (["stream broke mid-chunk"] if backend == "tcp" else [])
    assert any(cause in result["failure"] for cause in causes), result["failure"]  # not a timeout
    assert receiver.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_mid_transfer(start, backend):
    """The sender frees the room's blocks once the receiver's heartbeats stop (tcp and
    mooncake may see their connection break first; shm has none)."""
    sender = start("sender", backend, 256, hidden=1024)
    receiver = start("receiver", backend, 4, hidden=1024, default_blocks=1,
                     transfer={"window_blocks": 1})
    receiver.command(op="recv", room=48, encoder=sender.bootstrap)
    sender.command(op="send", room=48, total=20000)
    receiver.wait(lambda e: e["event"] == "transferring", 60)
    receiver.proc.kill()
    result = sender.done([48], 30)[48]
    assert result["state"] == "Failed", result
    if backend == "shm":
        assert "stopped answering" in result["failure"], result
    assert sender.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_killed_while_encoding(start, backend):
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 64, default_blocks=2)
    receiver.command(op="recv", room=42, encoder=sender.bootstrap)
    sender.command(op="send", room=42, total=3000, hold=True)  # announce, then "vision work"
    sender.wait(lambda e: e["event"] == "bound" and e["room"] == 42, 60)
    sender.proc.kill()
    result = receiver.done([42], 30)[42]
    assert result["state"] == "Failed" and "stopped answering" in result["failure"]
    assert receiver.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_hung_then_resumed_writes_nothing(start, backend):
    """SIGSTOP a sender whose room waits for its vision work: the receiver declares it dead and
    takes the room's blocks back. On SIGCONT the sender must not write into them (a one-sided
    write would land in whatever room has them now), though messages queued while it was
    stopped make its peer look alive; it drops its peers and serves a new room afresh."""
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 8, default_blocks=8)
    receiver.command(op="recv", room=45, encoder=sender.bootstrap)
    sender.command(op="send", room=45, total=500, hold=True)  # "vision work" until "go"
    sender.wait(lambda e: e["event"] == "bound" and e["room"] == 45, 60)
    os.kill(sender.proc.pid, signal.SIGSTOP)
    try:
        result = receiver.done([45], 30)[45]
        assert result["state"] == "Failed" and "stopped answering" in result["failure"]
        assert receiver.wait_pool_full()["live"] == 0
        sender.command(op="go", room=45)  # read on resuming: its data is ready at once
    finally:
        os.kill(sender.proc.pid, signal.SIGCONT)
    assert sender.done([45], 30)[45]["state"] == "Failed"
    assert sender.stats()["chunks"] == 0
    assert sender.wait_pool_full()["live"] == 0
    receiver.command(op="recv", room=46, encoder=sender.bootstrap)
    sender.command(op="send", room=46, total=700)
    assert_exact(receiver.done([46]), {46: 700})


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_abort_frees_sender_pool_and_spares_the_other_rooms(start, backend):
    """Room 44 shares the sender, the receiver and (tcp) the data connection with room 43."""
    sender = start("sender", backend, 512, hidden=1024)
    receiver = start("receiver", backend, 8, hidden=1024, default_blocks=1,
                     transfer={"window_blocks": 1})
    receiver.command(op="recv", room=43, encoder=sender.bootstrap, abort_after_tokens=1000)
    receiver.command(op="recv", room=44, encoder=sender.bootstrap, total=20000)
    sender.command(op="send", room=43, total=20000)
    sender.command(op="send", room=44, total=20000)
    assert receiver.done([43])[43]["failure"] == "test abort"
    result = sender.done([43])[43]
    assert result["state"] == "Failed" and "aborted by the language server" in result["failure"]
    assert_exact(receiver.done([44]), {44: 20000})
    assert sender.wait_pool_full()["live"] == 0
    assert receiver.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_auth_token_is_refused(start, backend):
    sender = start("sender", backend, 64)
    intruder = start("receiver", backend, 64, network={"auth_token": "guess"})
    intruder.command(op="recv", room=51, encoder=sender.bootstrap)
    result = intruder.done([51])[51]
    assert result["state"] == "Failed" and "auth token" in result["failure"]
    forged = ControlCodec("guess", intruder.id).encode(Window(51, 0, [0], 128))
    push(sender.control, forged)
    sender.wait_until(lambda stats: stats["rejected"] >= 1)
    assert intruder.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_is_refused(start, backend):
    sender = start("sender", backend, 64, hidden=256)
    receiver = start("receiver", backend, 64, hidden=128)
    receiver.command(op="recv", room=52, encoder=sender.bootstrap)
    result = receiver.done([52])[52]
    assert result["state"] == "Failed"
    assert "layout mismatch: hidden_size 256 here vs 128" in result["failure"]
    assert receiver.wait_pool_full()["live"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forged_window_aimed_at_another_rooms_blocks_is_refused(start, backend):
    sender = start("sender", backend, 64)
    receiver = start("receiver", backend, 32, default_blocks=8)
    receiver.command(op="recv", room=61, encoder=sender.bootstrap)
    sender.command(op="send", room=61, total=500, hold=True)
    # room 61 bound at the sender, its data not sent until "go"
    sender.wait(lambda e: e["event"] == "bound" and e["room"] == 61, 60)
    sender.command(op="send", room=62, total=300)
    # A fresh pool hands room 61 blocks 0..7, trimmed to 0..3 once 500 tokens are announced.
    forged = ControlCodec("secret", receiver.id).encode(Window(62, 0, [0, 1, 2, 3], 512))
    push(sender.control, forged)
    sender.wait_until(lambda stats: stats["refused"] >= 1)
    sender.command(op="go", room=61)
    receiver.command(op="recv", room=62, encoder=sender.bootstrap)
    assert_exact(receiver.done([61, 62]), {61: 500, 62: 300})


def push(endpoint: str, frames: list[bytes]) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(endpoint)
    socket.send_multipart(frames)
    socket.close()
    context.term()
