"""The router's choice of server: least load (what this router has on it now, plus the other
requests the server reported in /info), then most free blocks; an encoder's request counts
until /encode answers."""

from __future__ import annotations

import contextlib

from mmdisagg.messages import ServerInfo
from mmdisagg.router.dispatch import ServerSet


def servers(*loads: int, free: tuple[int, ...] = ()) -> ServerSet:
    group = ServerSet("encode", tuple(f"http://127.0.0.1:{9000 + i}" for i in range(len(loads))))
    for i, server in enumerate(group.servers):
        server.healthy = True
        server.info = ServerInfo("encode", "m", loads[i],
                                 pool_free_blocks=free[i] if free else 0)
    return group


def test_least_reported_load_wins():
    group = servers(3, 1, 2)
    assert {group.pick(set()).url for _ in range(20)} == {group.servers[1].url}


def test_requests_sent_since_the_last_report_count_until_answered():
    group = servers(0, 1)
    idle, busy = group.servers
    with contextlib.ExitStack() as sent:
        for _ in range(2):
            sent.enter_context(idle.hold())
        assert (idle.load, busy.load) == (2, 1)
        assert group.pick(set()) is busy
    # both answered (/encode returned): their slots are free at once
    assert idle.load == 0 and group.pick(set()) is idle


def test_a_report_taken_after_sending_already_counts_those_requests():
    group = servers(0, 0)
    first, second = group.servers
    with first.hold():
        first.in_flight_at_info = 1  # the next poll saw it: its report says load 1
        first.info = ServerInfo("encode", "m", 1)
        assert first.load == 1 and group.pick(set()) is second


def test_requests_a_report_counted_no_longer_count_once_answered():
    """A server reported 3 of this router's requests and 1 of another's; 2 of ours were
    answered since: its load is 2, not the 4 of the stale report. Counting the report whole
    made a frozen encoder (whose report predates its stuck requests) look less loaded than a
    busy one, and get one request too many."""
    group = servers(4, 3)
    busy, other = group.servers
    answered, still = contextlib.ExitStack(), contextlib.ExitStack()
    with still:
        with answered:
            for stack in (answered, answered, still):
                stack.enter_context(busy.hold())
            busy.in_flight_at_info = 3  # the poll saw them
            assert busy.load == 4
        assert (busy.load, other.load) == (2, 3) and group.pick(set()) is busy


def test_equal_load_prefers_more_free_blocks_and_skips_unhealthy_and_excluded():
    group = servers(1, 1, 1, free=(10, 50, 90))
    group.servers[2].healthy = False
    assert group.pick(set()) is group.servers[1]
    assert group.pick({group.servers[1].url}) is group.servers[0]
