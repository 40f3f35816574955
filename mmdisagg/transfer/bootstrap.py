"""Bootstrap: where a language server's receiver meets an encode server's sender.

The encode side serves ``POST /register`` over HTTP. A receiver posts its ``Registration``
once per encode server and gets the sender's ``PeerInfo`` back, or a refusal with a reason
(wrong token 401, layout or data-plane mismatch 409, malformed 400).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec

from mmdisagg.transfer.protocol import PeerInfo, Registration

log = logging.getLogger(__name__)

MAX_BODY = 1 << 16


class BootstrapRefused(RuntimeError):
    """The encode side will not take this receiver; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class BootstrapServer:
    """HTTP endpoint on the encode side; ``register`` decides and may raise BootstrapRefused."""

    def __init__(self, host: str, port: int, authentic: Callable[[str | None], bool],
                 register: Callable[[Registration], PeerInfo]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/register":
                    return self._reply(404, {"error": f"no such endpoint {self.path}"})
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if not authentic(token):
                    log.warning("bootstrap: refused %s: wrong or missing auth token",
                                self.client_address[0])
                    return self._reply(401, {"error": "wrong or missing auth token"})
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    return self._reply(400, {"error": f"body of {length} bytes"})
                try:
                    registration = msgspec.json.decode(self.rfile.read(length), type=Registration)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    return self._reply(400, {"error": f"malformed registration: {exc}"})
                try:
                    info = register(registration)
                except BootstrapRefused as exc:
                    log.warning("bootstrap: refused receiver %s: %s", registration.receiver, exc)
                    return self._reply(exc.status, {"error": str(exc)})
                self._reply(200, msgspec.to_builtins(info))

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("bootstrap: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="bootstrap",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def register_with(address: str, registration: Registration, auth_token: str,
                  timeout_s: float) -> PeerInfo:
    """Post ``registration`` to the bootstrap endpoint at ``host:port``."""
    request = urllib.request.Request(
        f"http://{address}/register", data=msgspec.json.encode(registration), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {auth_token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return msgspec.json.decode(response.read(), type=PeerInfo)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise BootstrapRefused(f"encode server {address} refused registration: {reason}",
                               exc.code) from None
    except (urllib.error.URLError, OSError, msgspec.DecodeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BootstrapRefused(f"cannot reach bootstrap endpoint {address}: {reason}",
                               503) from None
