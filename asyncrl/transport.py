"""ZeroMQ sockets: the only module that imports zmq.

Two patterns, both acknowledged (no PUB/SUB, which drops silently past its high-water mark,
and no plain PUSH/PULL, which loses queued messages when a peer dies):
  Server  ROUTER bound by the buffer and by learner rank 0; replies go to the sender identity.
  Client  DEALER that sends one request and waits for its reply with a timeout. On timeout
          the socket is closed and reopened (ZeroMQ "lazy pirate"), so a late reply to an
          abandoned request can never be mistaken for the answer to the next one.
Every socket closes with linger=0 so a dead peer never blocks shutdown.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import zmq


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


class Server:
    """A bound ROUTER. `recv` returns (peer identity, payload)."""

    def __init__(self, ctx: zmq.Context, host: str, port: int):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Fail loudly (EHOSTUNREACH) instead of silently dropping a reply to a vanished peer.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            self.sock.bind(tcp(host, port))
        except zmq.ZMQError as e:
            self.sock.close()
            raise OSError(f"cannot bind {tcp(host, port)}: {e} (is another run using "
                          "net.base_port? choose another)") from None

    def recv(self) -> tuple[bytes, bytes] | None:
        """One request, or None for a frame that does not have the DEALER shape."""
        frames = self.sock.recv_multipart(copy=True)
        if len(frames) != 2:
            return None
        return frames[0], frames[1]

    def send(self, ident: bytes, payload: bytes) -> bool:
        try:
            self.sock.send_multipart([ident, payload], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # peer gone or its queue full: it will time out and retry
            return False

    def close(self) -> None:
        self.sock.close(linger=0)


class Client:
    """A DEALER that does request/reply with a timeout, reconnecting after a timeout."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, identity: str | None = None):
        self.ctx = ctx
        self.addr = tcp(host, port)
        self.identity = (identity or uuid.uuid4().hex[:12]).encode()
        self.sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A fresh identity per reconnect so ROUTER never routes a stale reply to the new socket.
        self.sock.setsockopt(zmq.IDENTITY, self.identity + b"." + uuid.uuid4().hex[:6].encode())
        self.sock.connect(self.addr)

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def try_send(self, payload: bytes) -> bool:
        """Queue without blocking; False when the queue to an absent peer is full (its
        high-water mark, 1000 messages), so a periodic message never stalls the caller."""
        try:
            self.sock.send(payload, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def poll(self, timeout_s: float) -> bytes | None:
        """The next reply if one arrives within timeout_s, else None."""
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return self.sock.recv()
        return None

    def request(self, payload: bytes, timeout_s: float) -> bytes | None:
        """Send and wait for one reply; None (and a fresh socket) when none came in time."""
        self.sock.send(payload)
        reply = self.poll(timeout_s)
        if reply is None:
            self.sock.close(linger=0)
            self._open()
        return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)


class Heartbeat(threading.Thread):
    """Sends `make_frame()` to a peer every interval_s from its own socket and thread, so a
    process that is frozen (or dead) stops sending and its silence can be noticed."""

    def __init__(self, host: str, port: int, make_frame: Callable[[], bytes],
                 interval_s: float):
        super().__init__(daemon=True, name="asyncrl-heartbeat")
        self.addr, self.make_frame, self.interval_s = tcp(host, port), make_frame, interval_s

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a peer that is down gets a few, not a backlog
        sock.connect(self.addr)
        while True:
            try:
                sock.send(self.make_frame(), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(self.interval_s)


def context() -> zmq.Context:
    return zmq.Context()


def poll_servers(servers: list[Server], timeout_s: float) -> list[Server]:
    """Servers with a request waiting, after at most timeout_s."""
    poller = zmq.Poller()
    for s in servers:
        poller.register(s.sock, zmq.POLLIN)
    ready = dict(poller.poll(int(timeout_s * 1000)))
    return [s for s in servers if s.sock in ready]
