"""``mmdisagg serve`` as a user starts it, under a closed loop of image requests, while its
children are killed: it starts them again, the router routes around them meanwhile, requests
that can be retried are (with the same answer), the others end with an error, none hangs, and
every pool is free at the end. Also: a server that keeps crashing at start-up stops serve
with its log tail, killing serve's process group stops every child, and a stopped encoder
gets no new requests."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import openai
import psutil
import pytest

from mmdisagg.pool.shm import sweep_stale_segments
from mmdisagg.serve.launcher import free_port
from mmdisagg.serve.probe import metrics, used_blocks
from tests.conftest import SPAWNED
from tests.faults.harness import until
from tests.faults.served import API_KEY, Served
from tests.models.fixtures import image_part, text_part, user

ANSWER_DEADLINE_S = 120
BACK_WITHIN_S = 30
STARTUP_TIMEOUT_S = 60  # serve's --startup-timeout here: long enough for a loaded machine
PROMPTS = [user(image_part(56 + 8 * i, 56, seed=i), text_part(f"Picture {i}?")) for i in range(6)]


class Supervised(Served):
    """A Served that remembers which port serve gave each child at start-up."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.urls = self.servers()
        self.ports = {name: int(url.rsplit(":", 1)[1]) for name, url in self.urls.items()}


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               served: Supervised | None = None) -> None:
    """Poll ``predicate`` until it holds; fail (never hang) after ``timeout``, or at once if
    serve itself exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if served is not None and served.process.poll() is not None:
            raise AssertionError(f"serve exited ({served.process.returncode}) while waiting: "
                                 f"{what}\n{served.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.1)


def child(served: Supervised, name: str) -> psutil.Process:
    """serve's child ``name`` (encode-0, language-1, router) as it runs now: found by the
    port serve gave it at start-up, so a restarted child is found too."""
    port = served.ports[name]
    for process in served.processes()[1:]:
        with_port = re.search(r"--port (\d+)", " ".join(process.cmdline()))
        if with_port and int(with_port.group(1)) == port:
            SPAWNED.add(process.pid)  # its shared memory counts as the tests'
            return process
    raise LookupError(f"{name} (port {port}) is not running")


def running(served: Supervised, name: str) -> psutil.Process | None:
    try:
        return child(served, name)
    except (LookupError, psutil.Error):
        return None


def sample(url: str, key: str) -> float:
    try:
        return metrics(url).get(key, 0.0)
    except OSError:
        return -1.0


def healthy_in_router(served: Supervised, role: str) -> float:
    return sample(served.url, f'mmdisagg_router_servers{{role="{role}",state="healthy"}}')


def encoded(served: Supervised, name: str) -> float:
    return sample(served.urls[name], 'mmdisagg_requests_total{outcome="ok",role="encode"}')


def kill(served: Supervised, name: str, signum: int = signal.SIGKILL) -> int:
    process = child(served, name)
    process.send_signal(signum)
    return process.pid


def wait_back(served: Supervised, name: str, old_pid: int, role: str, count: int) -> None:
    """``name`` runs again under a new pid and the router sees every server of ``role``."""
    wait_until(lambda: (p := running(served, name)) is not None and p.pid != old_pid,
               BACK_WITHIN_S, f"{name} started again", served)
    wait_until(lambda: healthy_in_router(served, role) == count, BACK_WITHIN_S,
               f"the router sees {count} healthy {role} servers", served)


def wait_pools_free(served: Supervised) -> None:
    """Every server's embedding pool and KV cache back to fully free."""
    servers = [served.urls[name] for name in served.urls if name != "router"]
    wait_until(lambda: not any(used_blocks(url) for url in servers), 60, "every pool free")


@dataclass
class Outcome:
    prompt: int
    result: str  # "ok", "stream-error", an HTTP status, "connection-error"
    text: str
    streamed: bool  # a chunk reached the client before the end


async def ask(client: openai.AsyncOpenAI, prompt: int, max_tokens: int,
              stream: bool = False) -> Outcome:
    """One request, every outcome recorded; one that hangs fails the test."""
    pieces: list[str] = []

    async def run() -> str:
        try:
            if not stream:
                reply = await client.chat.completions.create(
                    model="tiny-model", messages=PROMPTS[prompt], max_tokens=max_tokens,
                    temperature=0, extra_body={"ignore_eos": True})
                pieces.append(reply.choices[0].message.content)
                return "ok"
            async for chunk in await client.chat.completions.create(
                    model="tiny-model", messages=PROMPTS[prompt], max_tokens=max_tokens,
                    temperature=0, stream=True, extra_body={"ignore_eos": True}):
                pieces.extend(choice.delta.content or "" for choice in chunk.choices)
                pieces.append("")  # a chunk arrived, even one without text
            return "ok"
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        except openai.APIConnectionError:
            return "connection-error"
        except openai.APIError:  # an error event inside a stream
            return "stream-error"

    result = await asyncio.wait_for(run(), ANSWER_DEADLINE_S)
    return Outcome(prompt, result, "".join(pieces), bool(pieces))


async def closed_loop(served: Supervised, total: int, concurrency: int, max_tokens: int,
                      stream: bool = False,
                      fault: Callable[[list[Outcome]], Awaitable[None]] | None = None,
                      sending: Callable[[], bool] = lambda: True) -> list[Outcome]:
    """Up to ``total`` requests over the prompts, ``concurrency`` at a time, each worker
    sending its next one when the last is answered, while ``sending()``; ``fault`` runs beside
    them."""
    client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0,
                                timeout=ANSWER_DEADLINE_S)
    outcomes: list[Outcome] = []
    numbers = iter(range(total))

    async def worker() -> None:
        for number in numbers:
            if not sending():
                return
            outcomes.append(await ask(client, number % len(PROMPTS), max_tokens, stream))

    try:
        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        if fault is not None:
            tasks.append(asyncio.ensure_future(fault(outcomes)))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return outcomes


def references(served: Supervised, max_tokens: int) -> list[str]:
    """Each prompt's answer while nothing is broken."""
    outcomes = asyncio.run(closed_loop(served, len(PROMPTS), 1, max_tokens))
    assert [o.result for o in outcomes] == ["ok"] * len(PROMPTS), outcomes
    return [o.text for o in sorted(outcomes, key=lambda o: o.prompt)]


@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory):
    """2 encode + 2 language servers; heartbeats quick so that a dead peer is found soon."""
    log = tmp_path_factory.mktemp("supervised") / "serve.log"
    served = Supervised(tiny_checkpoints["qwen2_vl"], log, "--encoders", "2",
                        "--language-servers", "2", "--heartbeat-interval", "0.3",
                        "--heartbeat-timeout", "2", "--health-interval", "0.5",
                        "--startup-timeout", str(STARTUP_TIMEOUT_S))
    yield served
    served.stop()
    sweep_stale_segments()  # those of children killed outright (serve sweeps on its way out,
    # unless the last test killed it outright too)


def test_encoder_killed_under_load(served):
    expected = references(served, 8)
    victim: list[int] = []

    async def fault(outcomes: list[Outcome]) -> None:
        await until(lambda: len(outcomes) >= 4, ANSWER_DEADLINE_S, "4 answers before the kill")
        victim.append(kill(served, "encode-0"))

    outcomes = asyncio.run(closed_loop(served, 30, 6, 8, fault=fault))
    assert [o.result for o in outcomes] == ["ok"] * 30, outcomes
    assert [o.text for o in outcomes] == [expected[o.prompt] for o in outcomes]
    wait_back(served, "encode-0", victim[0], "encode", 2)
    wait_pools_free(served)


def test_language_server_killed_under_load(served):
    expected = references(served, 48)
    victim: list[int] = []

    async def fault(outcomes: list[Outcome]) -> None:
        language = served.urls["language-0"]
        await until(lambda: sample(language, 'mmdisagg_queue_length{queue="running"}') >= 1,
                    ANSWER_DEADLINE_S, "language-0 decoding")
        victim.append(kill(served, "language-0"))

    outcomes = asyncio.run(closed_loop(served, 24, 6, 48, stream=True, fault=fault))
    ended = [o for o in outcomes if o.result != "ok"]
    assert all(o.result == "stream-error" and o.streamed for o in ended), ended
    assert len(ended) < len(outcomes), "no request survived the kill"
    done = [o for o in outcomes if o.result == "ok"]
    assert [o.text for o in done] == [expected[o.prompt] for o in done]
    after = asyncio.run(closed_loop(served, 20, 4, 8))
    assert [o.result for o in after] == ["ok"] * 20, after
    wait_back(served, "language-0", victim[0], "language", 2)
    wait_pools_free(served)


def test_router_killed_is_started_again(served):
    old = kill(served, "router")
    wait_until(lambda: (p := running(served, "router")) is not None and p.pid != old,
               BACK_WITHIN_S, "the router started again", served)
    wait_until(lambda: healthy_in_router(served, "encode") == 2
               and healthy_in_router(served, "language") == 2, BACK_WITHIN_S,
               "the new router sees every server", served)
    outcomes = asyncio.run(closed_loop(served, 6, 3, 8))
    assert [o.result for o in outcomes] == ["ok"] * 6, outcomes


def test_stopped_encoder_gets_no_new_requests(served):
    """encode-1 frozen (SIGSTOP) while 6 workers send: it gets requests only while its load
    (the ones stuck there) is not above encode-0's, then none once the router finds that it
    does not answer; encode-0 serves the rest."""
    before = {name: encoded(served, name) for name in ("encode-0", "encode-1")}
    stopped = child(served, "encode-1")
    thawed = asyncio.Event()

    async def fault(outcomes: list[Outcome]) -> None:
        try:
            await until(lambda: encoded(served, "encode-0") - before["encode-0"] >= 16, 60,
                        "16 requests encoded by encode-0 while encode-1 is frozen")
        finally:
            stopped.send_signal(signal.SIGCONT)
            thawed.set()

    stopped.send_signal(signal.SIGSTOP)
    try:
        outcomes = asyncio.run(closed_loop(served, 60, 6, 4, fault=fault,
                                           sending=lambda: not thawed.is_set()))
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert {o.result for o in outcomes} == {"ok"}, outcomes
    wait_until(lambda: encoded(served, "encode-1") >= 0, 30, "encode-1 answers again")
    # Random or round-robin choice would leave all 6 workers stuck there (and encode-0 would
    # never reach 16); by load, the ones stuck only while encode-0 looked as busy.
    assert encoded(served, "encode-1") - before["encode-1"] <= 4
    wait_until(lambda: healthy_in_router(served, "encode") == 2, BACK_WITHIN_S,
               "the router sees encode-1 again", served)
    wait_pools_free(served)


def test_health_is_degraded_while_a_server_is_down(served):
    old = kill(served, "language-1")
    wait_until(lambda: httpx.get(f"{served.url}/health").json().get("status") == "degraded",
               BACK_WITHIN_S, "/health says degraded", served)
    wait_until(lambda: (p := running(served, "language-1")) is not None and p.pid != old,
               BACK_WITHIN_S, "language-1 started again", served)
    wait_until(lambda: httpx.get(f"{served.url}/health").json().get("status") == "ok",
               BACK_WITHIN_S, "/health says ok again", served)
    health = httpx.get(f"{served.url}/health").json()
    assert health["servers"]["language"] == {"healthy": 2, "configured": 2}


def test_restarted_server_stuck_at_start_is_killed_and_started_again(served):
    """encode-1 killed, and its new process frozen (SIGSTOP) before it can answer: serve kills
    it once --startup-timeout has passed since its start and starts it once more."""
    old = kill(served, "encode-1")
    wait_until(lambda: (p := running(served, "encode-1")) is not None and p.pid != old,
               BACK_WITHIN_S, "encode-1 started again", served)
    stuck = child(served, "encode-1")
    stuck.send_signal(signal.SIGSTOP)  # long before it has loaded torch, let alone a model
    line = f"encode-1 (pid {stuck.pid}) did not answer /health within {STARTUP_TIMEOUT_S}s"
    wait_until(lambda: line in served.log.read_text(), STARTUP_TIMEOUT_S + BACK_WITHIN_S,
               f"serve says: {line}", served)
    wait_back(served, "encode-1", stuck.pid, "encode", 2)
    outcomes = asyncio.run(closed_loop(served, 6, 3, 8))
    assert [o.result for o in outcomes] == ["ok"] * 6, outcomes


def test_killing_serves_process_group_stops_every_child(served):
    """Last: serve dies outright (SIGKILL to its group); its children, each in its own group,
    follow it."""
    children = served.processes()[1:]
    SPAWNED.update(p.pid for p in children)
    os.killpg(served.process.pid, signal.SIGKILL)
    served.process.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"children left running: {alive}"


def test_server_crashing_at_start_up_stops_serve(tiny_checkpoints, tmp_path):
    """A checkpoint whose weights cannot load: each server dies at start-up, is started again
    once, dies again, and serve exits non-zero with the server's last lines."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    process = subprocess.Popen(
        [sys.executable, "-m", "mmdisagg.cli", "serve", "--model-path", str(broken),
         "--port", str(free_port("127.0.0.1")), "--restart-limit", "2", "--torch-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    SPAWNED.add(process.pid)
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 1, text[-3000:]
    assert re.search(r"(encode|language)-0 \(pid \d+\) exited with code 1, 2 times", text), \
        text[-3000:]
    assert re.search(r"(encode|language)-0\| .*(Error|error)", text), text[-3000:]




class Impostor(http.server.BaseHTTPRequestHandler):
    """Another server, already on the port serve is told to use: healthy, but not the
    router."""

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "pid": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_port_another_server_answers_on_is_not_taken_for_the_router(tiny_checkpoints):
    """The router cannot bind a port that another healthy server holds: serve must see its
    router die, not take the other server's /health for the router's and report it up."""
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port = impostor.server_address[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mmdisagg.cli", "serve", "--model-path",
         str(tiny_checkpoints["qwen2_vl"]), "--port", str(port), "--restart-limit", "2",
         "--torch-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    SPAWNED.add(process.pid)
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        impostor.shutdown()
        impostor.server_close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 1, text[-3000:]
    assert "OpenAI API at" not in text, text[-3000:]
    assert re.search(r"router \(pid \d+\) exited with code \d+, 2 times", text), text[-3000:]
    assert "address already in use" in text.lower(), text[-3000:]


def test_ports_handed_out_are_never_handed_out_again():
    """Ports picked for children that have not bound them yet are skipped: with every other
    port of the range taken, the one left is the answer."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    low = max(1024, ephemeral_low - 12000)
    left = free_port("127.0.0.1")
    taken = set(range(low, ephemeral_low)) - {left}
    assert free_port("127.0.0.1", taken) == left
