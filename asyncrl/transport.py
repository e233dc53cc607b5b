"""ZeroMQ sockets: the only module that imports zmq.

Two patterns, both acknowledged (no PUB/SUB, which drops silently past its high-water mark,
and no plain PUSH/PULL, which loses queued messages when a peer dies):
  Server  ROUTER bound by the buffer and by learner rank 0; replies go to the sender identity.
  Client  DEALER that sends one request and waits for its reply with a timeout. On timeout
          the socket is closed and reopened (ZeroMQ "lazy pirate"), so a late reply to an
          abandoned request can never be mistaken for the answer to the next one.
Every socket closes with linger=0 so a dead peer never blocks shutdown.

Authentication (net.curve, on by default): every socket speaks CurveZMQ. A run has two key
pairs, made by `make_keys` into RUN_DIR/keys (owner-only): servers hold the server pair and
accept only clients presenting the client public key (checked by a ZAP handler); clients hold
the client pair and the server public key, so they also refuse an impostor server. A refused
handshake (no CURVE, a wrong server key, an unknown client key) never reaches the role: it is
counted through `on_auth_failure(port, reason)` and logged once per peer address or reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret")


@dataclass(frozen=True)
class Keys:
    """A run's CURVE keys (z85 text, as zmq stores them)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def make_keys(directory: str | os.PathLike) -> Path:
    """Create the run's two key pairs in `directory` (mode 0700, files 0600) unless they are
    all there already. Returns the directory."""
    d = Path(directory)
    if all((d / f).is_file() for f in KEY_FILES):
        return d
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    for name in ("server", "client"):
        zmq.auth.create_certificates(d, name)
    for f in KEY_FILES:
        os.chmod(d / f, 0o600)
    return d


def load_keys(directory: str | os.PathLike) -> Keys:
    """The keys in `directory`; FileNotFoundError naming what is missing."""
    d = Path(directory)
    missing = [f for f in KEY_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CURVE keys missing in {d}: {', '.join(missing)}. `asyncrl run` makes them in "
            "RUN_DIR/keys; for roles started on their own run `asyncrl keys DIR` once and give "
            "every role that directory (net.keys_dir), or set net.curve=false on a trusted "
            "network")
    server_public, server_secret = zmq.auth.load_certificate(d / "server.key_secret")
    client_public, client_secret = zmq.auth.load_certificate(d / "client.key_secret")
    if server_secret is None or client_secret is None:
        raise ValueError(f"CURVE keys in {d}: a .key_secret file holds no secret key")
    return Keys(server_public, server_secret, client_public, client_secret)


def keys_for(net, run_dir: str) -> Keys | None:
    """The keys a role uses under its NetConfig: None with net.curve off."""
    if not net.curve:
        return None
    return load_keys(Path(net.keys_dir or Path(run_dir) / "keys").expanduser())


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


class Server:
    """A bound ROUTER. `recv` returns (peer identity, payload).

    With `keys`, only clients holding the run's client key get through; each refused
    handshake calls on_auth_failure(port, reason) from the context's guard thread."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, keys: Keys | None = None,
                 on_auth_failure: Callable[[int, str], None] | None = None):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Fail loudly (EHOSTUNREACH) instead of silently dropping a reply to a vanished peer.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if keys is not None:
            _guard(ctx, keys).watch(self.sock, port, on_auth_failure)
            self.sock.curve_server = True
            self.sock.curve_publickey = keys.server_public
            self.sock.curve_secretkey = keys.server_secret
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

    def __init__(self, ctx: zmq.Context, host: str, port: int, identity: str | None = None,
                 keys: Keys | None = None):
        self.ctx, self.keys = ctx, keys
        self.addr = tcp(host, port)
        self.identity = (identity or uuid.uuid4().hex[:12]).encode()
        self.sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        _client_keys(self.sock, self.keys)
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
        """Send and wait for one reply; None (and a fresh socket) when none came in time.

        The send waits at most timeout_s too: a DEALER without a usable pipe blocks in send,
        which is what happens while libzmq drops and redials a connection whose CURVE
        handshake the server refused (a peer with the wrong keys would otherwise hang here
        instead of timing out)."""
        sent = False
        if self.sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
            try:
                self.sock.send(payload, flags=zmq.NOBLOCK)
                sent = True
            except zmq.Again:
                pass
        reply = self.poll(timeout_s) if sent else None
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
                 interval_s: float, keys: Keys | None = None):
        super().__init__(daemon=True, name="asyncrl-heartbeat")
        self.addr, self.make_frame, self.interval_s = tcp(host, port), make_frame, interval_s
        self.keys = keys

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        _client_keys(sock, self.keys)
        sock.setsockopt(zmq.SNDHWM, 4)  # a peer that is down gets a few, not a backlog
        sock.connect(self.addr)
        while True:
            try:
                sock.send(self.make_frame(), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(self.interval_s)


class _Context(zmq.Context):
    guard: _Guard | None = None  # the ZAP handler of this context, once a CURVE server exists


def context() -> zmq.Context:
    return _Context()


def poll_servers(servers: list[Server], timeout_s: float) -> list[Server]:
    """Servers with a request waiting, after at most timeout_s."""
    poller = zmq.Poller()
    for s in servers:
        poller.register(s.sock, zmq.POLLIN)
    ready = dict(poller.poll(int(timeout_s * 1000)))
    return [s for s in servers if s.sock in ready]


def _client_keys(sock: zmq.Socket, keys: Keys | None) -> None:
    if keys is not None:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.client_public
        sock.curve_secretkey = keys.client_secret


# Handshake failures the guard counts, and the reason label of each.
_FAILURES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unknown_key",
             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
             zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake"}


def _guard(ctx: zmq.Context, keys: Keys) -> _Guard:
    """The context's one guard thread (ZeroMQ allows one ZAP handler per context)."""
    if not isinstance(ctx, _Context):
        raise TypeError("CURVE servers need a context from asyncrl.transport.context()")
    if ctx.guard is None:
        ctx.guard = _Guard(ctx, keys)
        ctx.guard.start()
    return ctx.guard


class _Guard(threading.Thread):
    """Answers ZeroMQ's authentication (ZAP) requests for every CURVE server of a context,
    admitting only the run's client key, and reads each server's handshake events so that
    every refusal is counted and logged once (per peer address for an unknown key; per port
    for a peer that speaks no CURVE, has the wrong server key or drops the handshake, whose
    address libzmq does not report)."""

    def __init__(self, ctx: zmq.Context, keys: Keys):
        super().__init__(daemon=True, name="asyncrl-zap")
        self.ctx, self.client_key = ctx, z85.decode(keys.client_public)
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind("inproc://zeromq.zap.01")
        self._lock = threading.Lock()
        self._new: list[tuple[zmq.Socket, int, Callable | None]] = []
        self._logged: set = set()

    def watch(self, sock: zmq.Socket, port: int, on_failure: Callable | None) -> None:
        addr = f"inproc://asyncrl-monitor-{id(sock)}"
        sock.monitor(addr, sum(_FAILURES))
        # Connected here, before the server binds, so that no event is emitted before anyone
        # listens (libzmq drops those); handed to the guard thread under the lock.
        mon = self.ctx.socket(zmq.PAIR)
        mon.connect(addr)
        with self._lock:
            self._new.append((mon, port, on_failure))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        monitors: dict[zmq.Socket, tuple[int, Callable | None]] = {}
        while True:
            with self._lock:
                new, self._new = self._new, []
            for mon, port, cb in new:
                poller.register(mon, zmq.POLLIN)
                monitors[mon] = (port, cb)
            try:
                events = poller.poll(200)
            except zmq.ZMQError:  # the context was closed under us: the process is ending
                return
            for sock, _ in events:
                if sock is self.zap:
                    self._answer(self.zap.recv_multipart())
                else:
                    event = parse_monitor_message(sock.recv_multipart())
                    self._refused(*monitors[sock], _FAILURES.get(event["event"], "handshake"))

    def _answer(self, request: list[bytes]) -> None:
        version, request_id, _domain, address, _identity, mechanism, *credentials = request
        ok = mechanism == b"CURVE" and credentials[:1] == [self.client_key]
        if not ok and address not in self._logged and len(self._logged) < 1024:
            self._logged.add(address)
            log.warning("refused a peer at %s: its CURVE key is not this run's client key "
                        "(net.keys_dir); further refusals are counted, not logged",
                        address.decode(errors="replace"))
        self.zap.send_multipart([version, request_id, b"200" if ok else b"400",
                                 b"OK" if ok else b"unknown key", b"", b""])

    def _refused(self, port: int, on_failure: Callable | None, reason: str) -> None:
        if on_failure is not None:
            on_failure(port, reason)
        if reason != "unknown_key" and port not in self._logged:
            self._logged.add(port)
            log.warning("port %d: a peer failed the CURVE handshake (%s: no CURVE, or not this "
                        "run's server key); further failures are counted, not logged", port,
                        reason)
