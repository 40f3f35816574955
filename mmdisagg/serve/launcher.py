"""``mmdisagg serve``: everything on one host.

Starts ``--encoders`` encode servers, ``--language-servers`` language servers (shared memory
between them) and a router as child processes, waits until each answers, prints where the API
listens, and supervises: a child that dies, or does not answer within ``--startup-timeout``
of its start, is started again as it was (same ports, settings and environment) after a
backoff; one that dies ``--restart-limit`` times without staying up
``--restart-window`` seconds in between stops the service with its last log lines. SIGINT or
SIGTERM stops every child; each runs in its own process group and gets SIGTERM when serve
dies, however it dies. ``--colocated`` instead serves from this one process with both halves
and no transfer. With no ``--model-path``, a tiny random Qwen2-VL checkpoint is built once
under ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from mmdisagg.config import (
    EncodeServerSettings,
    LanguageServerSettings,
    RouterSettings,
    ServeSettings,
    add_arguments,
    load,
    to_args,
)
from mmdisagg.pool.pool import with_fast_copies
from mmdisagg.pool.shm import sweep_stale_segments

log = logging.getLogger(__name__)

TINY_MODEL = "tiny-qwen2-vl"
STOP_GRACE_S = 10.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
SUPERVISE_INTERVAL_S = 0.5
TAIL_LINES = 30
PR_SET_PDEATHSIG = 1


class ServiceFailed(RuntimeError):
    """A child keeps dying, or did not come up: the service cannot run."""


@dataclass(eq=False)
class Child:
    name: str
    url: str
    argv: list[str]
    env: dict[str, str]  # the process's environment, to start it again as it was
    process: subprocess.Popen | None = None
    started: float = 0.0  # monotonic time of the latest start
    up: bool = False  # answered /health since the latest start
    strikes: int = 0  # deaths without staying up a restart window in between
    restart_at: float | None = None  # dead, to be started again at this monotonic time
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    _forwarder: threading.Thread | None = None

    def launch(self) -> None:
        """Start the process; its output goes to serve's and into ``tail``."""
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        preexec_fn=die_with(os.getpid()))
        self.started, self.up, self.restart_at = time.monotonic(), False, None
        self._forwarder = threading.Thread(target=self._forward, args=(self.process,),
                                           name=f"output-{self.name}", daemon=True)
        self._forwarder.start()

    def _forward(self, process: subprocess.Popen) -> None:
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        for line in process.stdout:
            self.tail.append(line.decode(errors="replace").rstrip("\n"))
            with contextlib.suppress(OSError, ValueError):
                if out is not None:
                    out.write(line)
                    out.flush()
        process.stdout.close()

    def last_lines(self) -> str:
        if self._forwarder is not None:
            self._forwarder.join(timeout=5)
        return "\n".join(f"  {self.name}| {line}" for line in self.tail)


def die_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies, even by SIGKILL; its
    own process group would not get a signal sent to serve's group.

    NOTE: the kernel sends it when the *thread* that forked the child ends, so only a child
    started from the main thread gets it (the soak's fault injector restarts servers from a
    thread of its own that ends before the soak does)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # died before the hook ran
            os._exit(1)
    return hook


def free_port(host: str, taken: Collection[int] = ()) -> int:
    """A free port below the kernel's ephemeral range, and not one of ``taken``: ports bound
    "to any" (ZeroMQ, data planes) and outgoing connections come from that range, so they
    cannot take it between now and the moment its server binds it; ``taken`` holds the ports
    already handed out for servers that have not bound them yet."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = max(1024, ephemeral_low - 12000)
    for candidate in random.sample(range(low, ephemeral_low), ephemeral_low - low):
        if candidate in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free port in {low}-{ephemeral_low - 1} on {host}")


def tiny_model(cache_dir: str) -> str:
    """The default checkpoint, built once (a few seconds) and reused."""
    path = Path(cache_dir).expanduser() / "models" / TINY_MODEL
    if not (path / "config.json").is_file():
        from mmdisagg.models.tiny import make_tiny_model
        print(f"mmdisagg serve: building a tiny random Qwen2-VL checkpoint in {path}", flush=True)
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        make_tiny_model(partial, family="qwen2_vl", size="tiny", seed=0)
        partial.rename(path)
    return str(path)


class Launcher:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.host = settings.network.host
        # handed out or set, but maybe not bound yet (the router binds its own last of all)
        self.ports = {settings.port, settings.transfer.data_port,
                      settings.transfer.control_port} - {0}
        self.env = {**os.environ, "MMDISAGG_AUTH_TOKEN": settings.network.auth_token,
                    "MMDISAGG_API_KEY": settings.api_key}

    def spawn(self, name: str, command: str, port: int, args: list[str],
              env: dict[str, str] | None = None) -> Child:
        argv = [sys.executable, "-m", "mmdisagg.cli", command, "--port", str(port), *args]
        child = Child(name, f"http://{self.host}:{port}", argv, env or self.env)
        child.launch()
        self.children.append(child)
        return child

    def port(self) -> int:
        port = free_port(self.host, self.ports)
        self.ports.add(port)
        return port

    def start(self) -> str:
        """Every child started and answering (dead ones started again meanwhile); the
        router's URL."""
        settings = self.settings
        flags = {cls: to_args(settings, cls, exclude=("port",)) for cls in
                 (EncodeServerSettings, LanguageServerSettings, RouterSettings)}
        encoders = [self.spawn(f"encode-{i}", "encode", self.port(),
                               ["--bootstrap-port", str(self.port()),
                                *flags[EncodeServerSettings]], with_fast_copies(self.env))
                    for i in range(settings.encoders)]
        languages = [self.spawn(f"language-{i}", "language", self.port(),
                                flags[LanguageServerSettings])
                     for i in range(settings.language_servers)]
        self.wait_healthy(encoders + languages, self.supervise)
        router = self.spawn("router", "router", settings.port, [
            "--encode", *(c.url for c in encoders), "--language", *(c.url for c in languages),
            *flags[RouterSettings]])
        self.wait_healthy([router], self.supervise)
        return router.url

    def supervise(self) -> None:
        """One round of supervision: a child found dead is started again after a backoff
        that doubles with each death; ServiceFailed once it has died ``restart_limit`` times
        without staying up ``restart_window`` seconds in between."""
        now = time.monotonic()
        for child in self.children:
            code = child.process.poll()
            if code is None:
                if not child.up and answers_health(child.url + "/health", child.process.pid):
                    child.up = True
                    if child.strikes:
                        say(f"{child.name} (pid {child.process.pid}) is back")
                elif not child.up and now - child.started > self.settings.startup_timeout:
                    self._hung(child, now)
                continue
            if child.restart_at is None:
                self._died(child, f"exited with code {code}", now)
            elif now >= child.restart_at:
                child.launch()
                say(f"{child.name} started again (pid {child.process.pid})")

    def _hung(self, child: Child, now: float) -> None:
        """A child that runs but never answered /health counts as a death: killed, then
        started again like one that exited (a restart must not wait forever on a stuck
        start-up)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()
        self._died(child, f"did not answer /health within "
                          f"{self.settings.startup_timeout:g}s of its start and was killed", now)

    def _died(self, child: Child, why: str, now: float) -> None:
        if now - child.started >= self.settings.restart_window:
            child.strikes = 0
        child.strikes += 1
        if child.strikes >= self.settings.restart_limit:
            raise ServiceFailed(
                f"{child.name} (pid {child.process.pid}) {why}, "
                f"{child.strikes} times without staying up {self.settings.restart_window:g}s; "
                f"its last lines:\n{child.last_lines()}")
        backoff = min(FIRST_BACKOFF_S * 2 ** (child.strikes - 1), MAX_BACKOFF_S)
        child.restart_at = now + backoff
        say(f"{child.name} (pid {child.process.pid}) {why}; starting it again in {backoff:g}s")

    def restart(self, child: Child) -> None:
        """Start a dead ``child`` again with the same command line, port and environment, and
        wait until it answers (a fault test or a soak that supervises by itself)."""
        if child.process.poll() is None:
            raise RuntimeError(f"{child.name} (pid {child.process.pid}) is still running")
        child.launch()
        self.wait_healthy([child], self.check_alive)

    def wait_healthy(self, children: list[Child], watch: Callable[[], None]) -> None:
        """Until each of ``children`` answers /health; ``watch`` runs between checks."""
        deadline = time.monotonic() + self.settings.startup_timeout
        waiting = list(children)
        while waiting:
            watch()
            waiting = [c for c in waiting if not (c.process.poll() is None
                                                  and answers_health(c.url + "/health",
                                                                     c.process.pid))]
            if waiting and time.monotonic() > deadline:
                raise ServiceFailed(f"{', '.join(c.name for c in waiting)} did not come up "
                                    f"within {self.settings.startup_timeout:g}s")
            time.sleep(0.2)

    def check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise RuntimeError(f"{child.name} (pid {child.process.pid}) exited with code "
                                   f"{code}")

    def stop(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        sweep_stale_segments()  # a child killed outright could not unlink its pool


def say(message: str) -> None:
    print(f"mmdisagg serve: {message}", file=sys.stderr, flush=True)


def answers_health(url: str, pid: int | None = None) -> bool:
    """True when ``url`` answers 200 now (a server that is up and ready) and, given ``pid``,
    the answer comes from that process: a server already on the port must not pass for a
    child still starting (which will then fail to bind it)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status != 200:
                return False
            if pid is None:
                return True
            body = json.loads(response.read())
            return isinstance(body, dict) and body.get("pid") == pid
    except (OSError, http.client.HTTPException, ValueError):
        return False


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ServeSettings)


def run(args: argparse.Namespace) -> int:
    settings = load(ServeSettings, args)
    settings.process.apply("serve")
    if not settings.model.model_path:
        path = tiny_model(settings.cache_dir)
        settings = replace(settings, model=replace(settings.model, model_path=path))
    settings.model.require_path()
    if settings.colocated:
        return run_colocated(settings)
    if settings.transfer.transfer_backend != "shm":
        log.info("serve: %s data plane on one host", settings.transfer.transfer_backend)
    if not settings.network.auth_token:
        settings = replace(settings, network=replace(settings.network,
                                                     auth_token=secrets.token_hex(16)))
    launcher = Launcher(settings)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        url = launcher.start()
        print(f"mmdisagg serve: OpenAI API at {url}/v1 (model {settings.model.name}; "
              f"{settings.encoders} encode + {settings.language_servers} language servers)",
              flush=True)
        while True:
            launcher.supervise()
            time.sleep(SUPERVISE_INTERVAL_S)
    except ServiceFailed as exc:
        say(f"{exc}\nstopping")
        return 1
    except KeyboardInterrupt:
        print("mmdisagg serve: stopping", flush=True)
        return 0
    finally:
        launcher.stop()


def run_colocated(settings: ServeSettings) -> int:
    from mmdisagg.httpapp import serve
    from mmdisagg.router.app import build_app
    from mmdisagg.serve.colocated import ColocatedBackend

    backend = ColocatedBackend(settings)
    app = build_app(backend, api_key=settings.api_key,
                    default_max_tokens=settings.default_max_tokens,
                    max_request_bytes=settings.max_request_bytes)
    print(f"mmdisagg serve --colocated: OpenAI API at http://{settings.network.host}:"
          f"{settings.port}/v1 (model {settings.model.name})", flush=True)
    serve(app, settings.network.host, settings.port)
    return 0
