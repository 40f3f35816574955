"""An encode server killed during vision work, in the middle of a chunk, and between the windows
of a resumed transfer; an encode server hung (SIGSTOP) and resumed; a data connection cut
mid-chunk. Each time the request in flight is retried on the other encoder (or fails cleanly),
nothing waits forever, every pool returns to fully free, and the cluster serves again (the
fixture checks that after each test)."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.faults.harness import FaultCluster, ask, image, wait_until
from tests.models.fixtures import text_part, user

ENCODERS = ("encode-0", "encode-1")
BIG = 2048  # pixels a side: ~5,400 prompt tokens, seconds of vision work


def big_request(seed: int = 0) -> list[dict]:
    return user(image(BIG, BIG, seed), text_part("What is in this big picture?"))


def busy_encoder(cluster: FaultCluster, queue: str, timeout: float = 60) -> str:
    """The encode server with a request in ``queue`` (polled until one has)."""
    found: list[str] = []

    def look() -> bool:
        found[:] = [name for name in ENCODERS if cluster.queue(name, queue) >= 1]
        return bool(found)

    wait_until(look, timeout, f"an encode server with a request in {queue}")
    return found[0]


def retries(cluster: FaultCluster) -> float:
    return cluster.sample("router", 'mmdisagg_requests_total{outcome="encoder_retries",'
                                    'role="router"}')


def serves_again(cluster: FaultCluster, name: str, within: float = 120) -> None:
    """``name`` completes transfers again: ask (text) until it has served two more rooms.

    NOTE: first its vision forward must end (one that was running when it stopped goes on for
    a request already aborted) and its stale rooms' pool blocks come free: until then it
    reports that load (or fewer free blocks, the tie-break), and the router, which picks by
    load, sends sequential requests to the other encoder; it learns the new load at its next
    health check, so requests go on until then, not for a fixed count."""
    wait_until(lambda: all(cluster.queue(name, queue) == 0
                           for queue in ("waiting", "admitted", "encoding", "sending"))
               and cluster.used_blocks(name) == 0, 120,
               f"{name} idle (its vision forward over, its stale rooms failed, its pool free)")
    client = cluster.client()
    before = cluster.rooms(name, "succeeded")
    deadline, sent = time.monotonic() + within, 0
    while time.monotonic() < deadline:
        client.chat.completions.create(model="tiny-model", messages=user(text_part(f"n{sent}")),
                                       max_tokens=2, temperature=0)
        sent += 1
        if cluster.rooms(name, "succeeded") >= before + 2:
            return
    raise AssertionError(f"{name} served no transfer in {sent} requests over {within:g}s")


def run_with_fault(cluster: FaultCluster, inject) -> tuple[str | int, float]:
    """Send one big request, call ``inject()`` (in a thread; it waits for its moment), and
    return the request's outcome and how long after the fault it came."""
    async def scenario():
        client = cluster.async_client()
        request = asyncio.create_task(ask(client, big_request()))
        await asyncio.to_thread(inject)
        injected = time.monotonic()
        outcome = await request
        await client.close()
        return outcome, time.monotonic() - injected

    return asyncio.run(scenario())


def test_encoder_killed_during_vision_work(fault_cluster):
    cluster, _ = fault_cluster
    before = retries(cluster)
    outcome, _ = run_with_fault(cluster, lambda: cluster.kill(busy_encoder(cluster, "encoding")))
    assert outcome == "ok"  # retried on the other encoder
    assert retries(cluster) == before + 1


def test_encoder_killed_mid_chunk(fault_cluster):
    cluster, proxy = fault_cluster
    proxy.arm("hold", "mid")

    def inject():
        wait_until(proxy.fired.is_set, 60, "a chunk half forwarded")
        cluster.kill(busy_encoder(cluster, "sending"))
        proxy.release()  # what the dead encoder had sent goes on, then its stream ends

    outcome, _ = run_with_fault(cluster, inject)
    assert outcome == "ok"


def test_encoder_killed_between_windows_of_a_resumed_transfer(fault_cluster):
    cluster, proxy = fault_cluster
    resumes = cluster.sample("language-0", "mmdisagg_transfer_resumes_total")
    proxy.arm("hold", "before", lambda notice: notice.start_token > 0)

    def inject():
        wait_until(proxy.fired.is_set, 60, "the first window landed, the next held")
        cluster.kill(busy_encoder(cluster, "sending"))
        proxy.release()

    outcome, _ = run_with_fault(cluster, inject)
    assert outcome == "ok"
    assert proxy.fired_on.start_token > 0
    assert cluster.sample("language-0", "mmdisagg_transfer_resumes_total") > resumes


def test_encoder_hung_then_resumed(fault_cluster):
    """SIGSTOP during vision work: heartbeats declare it dead, the request goes to the other
    encoder; SIGCONT: the hung encoder finds its peers gone, frees what it held, and serves
    again."""
    cluster, _ = fault_cluster
    victim: list[str] = []

    def inject():
        victim.append(busy_encoder(cluster, "encoding"))
        cluster.signal(victim[0], signal.SIGSTOP)

    try:
        outcome, after = run_with_fault(cluster, inject)
        assert outcome == "ok", outcome
        assert after < 60
        wait_until(lambda: cluster.healthy_in_router("encode") == 1, 30,
                   "the router stops using the hung encoder")
    finally:
        if victim:
            cluster.signal(victim[0], signal.SIGCONT)
    assert cluster.child(victim[0]).process.poll() is None, "the resumed encoder died"
    cluster.wait_router_sees_all()
    wait_until(lambda: cluster.used_blocks(victim[0]) == 0, 60, "the resumed encoder's pool free")
    serves_again(cluster, victim[0])


def test_data_connection_cut_mid_chunk(fault_cluster):
    cluster, proxy = fault_cluster
    failed = {name: cluster.rooms(name, "failed") for name in ENCODERS}
    proxy.arm("cut", "mid")
    outcome, _ = run_with_fault(cluster, lambda: wait_until(proxy.fired.is_set, 60,
                                                            "a chunk cut"))
    assert outcome == "ok"
    cut = [name for name in ENCODERS if cluster.rooms(name, "failed") > failed[name]]
    assert cut, "no encoder saw its transfer fail"
    assert cluster.sample("language-0", 'mmdisagg_transfer_rooms_total{outcome="failed"}') >= 1
    serves_again(cluster, cut[0])


def test_a_prompt_is_prefilled_as_it_arrives_and_a_cut_before_its_end_leaks_nothing(
        fault_cluster):
    """Two big images take two vision forwards: the first image's rows go to the language
    server, which prefills them while the second is encoded. The chunk that ends the prompt is
    held until that prefill is seen, then cut: the language server drops the half-prefilled
    request (its KV blocks and pool blocks come free, the fixture checks), and the router
    retries it on the other encoder, where it is answered."""
    cluster, proxy = fault_cluster
    prefilled = lambda: cluster.sample(  # noqa: E731
        "language-0", "mmdisagg_prefill_while_arriving_tokens_total")
    failed, before = cluster.rooms("language-0", "failed"), prefilled()
    proxy.arm("hold", "before", lambda notice: (
        notice.start_token + notice.num_tokens == notice.total_tokens))

    def inject() -> None:
        wait_until(proxy.fired.is_set, 120, "the prompt's last chunk held")
        wait_until(lambda: prefilled() > before, 60, "a prefill of the rows that landed")
        proxy.cut_held()

    async def scenario():
        client = cluster.async_client()
        request = asyncio.create_task(ask(client, user(
            image(BIG, BIG, 1), image(BIG, BIG, 2), text_part("Compare the two pictures."))))
        await asyncio.to_thread(inject)
        outcome = await request
        await client.close()
        return outcome

    assert asyncio.run(scenario()) == "ok"
    assert cluster.rooms("language-0", "failed") > failed
