"""Hosts for multi-host tests: network namespaces joined by a bridge that lives in a namespace
of its own, so the machine's own network is never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SUBNET = "10.77.{}.{}"


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def why_unavailable() -> str | None:
    """None if namespaces can be made here, else the reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"mmd-probe-{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
        run("ip", "netns", "del", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        return f"cannot create network namespaces here: {str(detail).strip()}"
    return None


class Hosts:
    """``names`` hosts, each a namespace with one address on a shared private subnet."""

    def __init__(self, names: list[str]) -> None:
        tag = os.getpid() % 250 + 1
        self.switch = f"mmd-sw-{tag}"
        self.namespaces = {name: f"mmd-{name}-{tag}" for name in names}
        self.addresses = {name: SUBNET.format(tag, i + 1) for i, name in enumerate(names)}
        self.processes: list[subprocess.Popen] = []
        run("ip", "netns", "add", self.switch)
        self.exec_in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self.exec_in(self.switch, "ip", "link", "set", "br0", "up")
        for i, (name, namespace) in enumerate(self.namespaces.items()):
            run("ip", "netns", "add", namespace)
            host_end, switch_end = f"mmd{tag}h{i}", f"mmd{tag}s{i}"
            run("ip", "link", "add", host_end, "netns", namespace, "type", "veth", "peer",
                "name", switch_end, "netns", self.switch)
            self.exec_in(self.switch, "ip", "link", "set", switch_end, "master", "br0")
            self.exec_in(self.switch, "ip", "link", "set", switch_end, "up")
            self.exec_in(namespace, "ip", "addr", "add", f"{self.addresses[name]}/24", "dev",
                         host_end)
            self.exec_in(namespace, "ip", "link", "set", host_end, "up")
            self.exec_in(namespace, "ip", "link", "set", "lo", "up")

    def exec_in(self, namespace: str, *argv: str) -> None:
        run("ip", "netns", "exec", namespace, *argv)

    def start(self, host: str, *argv: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """A process on ``host`` (stdout/stderr inherited, so logs show up in test output)."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *argv],
                                   env=env, start_new_session=True)
        self.processes.append(process)
        return process

    def python(self, host: str, code: str, timeout: float = 120) -> dict:
        """Run Python ``code`` on ``host``; it prints one JSON line as its last output."""
        result = subprocess.run(["ip", "netns", "exec", self.namespaces[host], sys.executable,
                                 "-c", code], capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_healthy(self, host: str, url: str, timeout: float = 120) -> None:
        code = ("import urllib.request; urllib.request.urlopen("
                f"'{url}/health', timeout=2); print('{{}}')")
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                assert process.poll() is None, f"{process.args} exited with {process.returncode}"
            try:
                self.python(host, code, timeout=10)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        for namespace in [*self.namespaces.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)

