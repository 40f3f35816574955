"""The control channel: one inbound ZeroMQ PULL socket, one outbound PUSH socket per peer.

ZeroMQ sockets are not thread-safe, so only the manager's loop thread touches them. Other
threads hand outgoing messages to ``send``, which queues them and wakes the loop through a
pipe the loop polls beside the inbound socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue

import zmq

from mmdisagg.transfer.protocol import ControlCodec, Message, ProtocolError

log = logging.getLogger(__name__)

SEND_HWM = 100_000


class ControlChannel:
    def __init__(self, codec: ControlCodec, host: str, port: int, advertise_host: str) -> None:
        self.codec = codec
        self._context = zmq.Context()
        self._inbound = self._context.socket(zmq.PULL)
        self._inbound.setsockopt(zmq.LINGER, 0)
        self._inbound.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        if port:
            self._inbound.bind(f"tcp://{host}:{port}")
            bound = port
        else:
            bound = self._inbound.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{advertise_host}:{bound}"
        self._outbound: dict[str, zmq.Socket] = {}
        self._outbox: queue.SimpleQueue[tuple[str, Message]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._poller = zmq.Poller()
        self._poller.register(self._inbound, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)
        self.rejected = 0

    def send(self, endpoint: str, message: Message) -> None:
        """Queue a message for ``endpoint``; safe from any thread."""
        self._outbox.put((endpoint, message))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def receive(self, timeout_s: float) -> list[tuple[str, Message]]:
        """Loop thread only: flush the outbox, then wait up to ``timeout_s`` for messages."""
        self._flush()
        events = dict(self._poller.poll(max(0, int(timeout_s * 1000))))
        if self._wake_read in events:
            try:
                while os.read(self._wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
            self._flush()
        received = []
        while True:
            try:
                frames = self._inbound.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return received
            try:
                received.append(self.codec.decode(frames))
            except ProtocolError as exc:
                self.rejected += 1
                log.warning("control message refused: %s", exc)

    def _flush(self) -> None:
        while True:
            try:
                endpoint, message = self._outbox.get_nowait()
            except queue.Empty:
                return
            socket = self._outbound.get(endpoint)
            if socket is None:
                socket = self._context.socket(zmq.PUSH)
                socket.setsockopt(zmq.LINGER, 0)
                socket.setsockopt(zmq.SNDHWM, SEND_HWM)
                socket.connect(endpoint)
                self._outbound[endpoint] = socket
            try:
                socket.send_multipart(self.codec.encode(message), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("control queue to %s is full; dropped %s", endpoint,
                            type(message).__name__)

    def direct(self, endpoint: str) -> DirectSender:
        """A sender of its own for one thread, skipping the loop thread's hop. Messages it
        sends are not ordered with those sent through ``send``."""
        return DirectSender(self, endpoint)

    def forget(self, endpoint: str) -> None:
        """Loop thread only: drop the socket to a peer that is gone."""
        socket = self._outbound.pop(endpoint, None)
        if socket is not None:
            socket.close()

    def close(self) -> None:
        """After the loop thread stopped. Closes every socket of the context, also a
        DirectSender's whose thread did not close it, so shutdown never hangs."""
        self._context.destroy(linger=0)
        os.close(self._wake_read)
        os.close(self._wake_write)


class DirectSender:
    """One thread's own PUSH socket to one peer (the socket is created in that thread)."""

    def __init__(self, channel: ControlChannel, endpoint: str) -> None:
        self._channel = channel
        self._endpoint = endpoint
        self._socket: zmq.Socket | None = None

    def send(self, message: Message) -> None:
        if self._socket is None:
            self._socket = self._channel._context.socket(zmq.PUSH)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            self._socket.connect(self._endpoint)
        try:
            self._socket.send_multipart(self._channel.codec.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control queue to %s is full; dropped %s", self._endpoint,
                        type(message).__name__)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
