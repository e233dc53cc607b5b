"""ZeroMQ sockets: the only module that imports zmq.

Two patterns, both acknowledged (no PUB/SUB, which drops silently past its high-water mark,
and no plain PUSH/PULL, which loses queued messages when a peer dies):
  Server  ROUTER bound by the buffer and by learner rank 0; replies go to the sender identity.
  Client  DEALER that sends one request and waits for its reply with a timeout. On timeout
          the socket is closed and reopened (ZeroMQ "lazy pirate"), so a late reply to an
          abandoned request can never be mistaken for the answer to the next one.
Every socket closes with linger=0 so a dead peer never blocks shutdown.

Authentication (net.curve, on by default): every socket speaks CurveZMQ. A run has a server
key pair and one key pair per client role (gen0, gen1, ..., learner, evaluator), made by
`make_keys` into RUN_DIR/keys (owner-only). Servers hold the server pair and the client
roles' public keys; each server socket admits only the roles that belong on its port (the
buffer's learner port only the learner, its ingest port only generators), checked by a ZAP
handler that names the peer's role, which the socket then reports with every request
(`Request.role`), so a receiver can check that a message's sender is the role that sent it.
Clients hold their own pair and the server public key, so they also refuse an impostor server.
A refused handshake (no CURVE, a wrong server key, an unknown key, a role that does not belong
on the port) never reaches the role: it is counted through `on_auth_failure(port, reason)` and
logged once per peer address or reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

SERVER = "server"
SERVING_ROLES = ("buffer", "reward")  # roles that only serve: they hold the server pair
# Which client roles a port admits: a name, or a prefix ending in "*" for numbered roles.
GENERATORS, LEARNER, EVALUATOR = "gen*", "learner", "evaluator"


def client_roles(num_generators: int) -> list[str]:
    """The client roles of a run, one key pair each."""
    return [*(f"gen{i}" for i in range(num_generators)), "learner", "evaluator"]


def role_allowed(role: str, allow: tuple[str, ...]) -> bool:
    return any(role == a or (a.endswith("*") and role.startswith(a[:-1])
                             and role[len(a) - 1:].isdigit()) for a in allow)


@dataclass(frozen=True)
class Keys:
    """What one role holds of a run's CURVE keys (z85 text, as zmq stores them): the server's
    public key (and its secret, on the roles that serve), the role's own pair (clients), and
    every client role's public key by role (servers admit those)."""

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes | None
    client_secret: bytes | None
    clients: dict[bytes, str] = field(default_factory=dict)  # public key -> role


def make_keys(directory: str | os.PathLike, roles: list[str] | None = None) -> Path:
    """Create the run's server pair and one pair per client role (default: one generator,
    the learner and the evaluator) in `directory` (mode 0700, files 0600); pairs already
    there are kept, so an existing run keeps its keys. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    for name in [SERVER, *(roles or client_roles(1))]:
        if not (d / f"{name}.key_secret").is_file():
            zmq.auth.create_certificates(d, name)
        for f in (f"{name}.key", f"{name}.key_secret"):
            os.chmod(d / f, 0o600)
    key = d / ENDPOINT_KEY
    if not key.is_file():  # the OpenAI-compatible endpoints' bearer key (generator.endpoint)
        import secrets

        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("sk-asyncrl-" + secrets.token_hex(24) + "\n")
    os.chmod(key, 0o600)
    return d


ENDPOINT_KEY = "endpoint.token"  # not *.key: those are the CURVE public keys


def endpoint_key(directory: str | os.PathLike) -> str:
    """The bearer key of the run's OpenAI-compatible endpoints (`asyncrl keys` prints it);
    FileNotFoundError naming the file when the directory has none."""
    path = Path(directory) / ENDPOINT_KEY
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no endpoint key (made by `asyncrl keys` and by "
                                "`asyncrl run`, with the run's CURVE keys)")
    return path.read_text().strip()


def load_keys(directory: str | os.PathLike, role: str = "gen0") -> Keys:
    """The keys of `role` in `directory`: the server's (with its secret where the directory
    has it), the role's own pair (none for the buffer and the reward role, which only
    serve), and every client
    role's public key. FileNotFoundError naming what is missing."""
    d = Path(directory)
    serves_only = role in SERVING_ROLES
    need = ["server.key"] + ([f"{role}.key_secret"] if not serves_only else [])
    missing = [f for f in need if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CURVE keys missing in {d}: {', '.join(missing)}. `asyncrl run` makes them in "
            "RUN_DIR/keys; for roles started on their own run `asyncrl keys DIR --generators N` "
            "once and give every role that directory (net.keys_dir), or set net.curve=false on "
            "a trusted network")
    server_public, server_secret = zmq.auth.load_certificate(
        d / ("server.key_secret" if (d / "server.key_secret").is_file() else "server.key"))
    client_public = client_secret = None
    if not serves_only:
        client_public, client_secret = zmq.auth.load_certificate(d / f"{role}.key_secret")
        if client_secret is None:
            raise ValueError(f"CURVE keys in {d}: {role}.key_secret holds no secret key")
    clients = {}
    for f in sorted(d.glob("*.key")):
        if f.stem != SERVER:
            clients[zmq.auth.load_certificate(f)[0]] = f.stem
    return Keys(server_public, server_secret, client_public, client_secret, clients)


def keys_for(net, run_dir: str, role: str) -> Keys | None:
    """The keys `role` uses under its NetConfig: None with net.curve off."""
    if not net.curve:
        return None
    return load_keys(Path(net.keys_dir or Path(run_dir) / "keys").expanduser(), role)


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


class Request(NamedTuple):
    ident: bytes  # the peer's socket identity, to reply to
    payload: bytes
    role: str | None  # the client role its CURVE key authenticated (None with net.curve off)


class Server:
    """A bound ROUTER. `recv` returns a Request.

    With `keys`, only clients holding the key of a role in `allow` get through; each refused
    handshake calls on_auth_failure(port, reason) from the context's guard thread."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, keys: Keys | None = None,
                 on_auth_failure: Callable[[int, str], None] | None = None,
                 allow: tuple[str, ...] = (GENERATORS, LEARNER, EVALUATOR)):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Fail loudly (EHOSTUNREACH) instead of silently dropping a reply to a vanished peer.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.curve = keys is not None
        if keys is not None:
            self.sock.zap_domain = f"port{port}".encode()  # the guard's key for `allow`
            _guard(ctx, keys).watch(self.sock, port, on_auth_failure, allow)
            self.sock.curve_server = True
            self.sock.curve_publickey = keys.server_public
            self.sock.curve_secretkey = keys.server_secret
        try:
            self.sock.bind(tcp(host, port))
        except zmq.ZMQError as e:
            self.sock.close()
            raise OSError(f"cannot bind {tcp(host, port)}: {e} (is another run using "
                          "net.base_port? choose another)") from None

    def recv(self) -> Request | None:
        """One request, or None for a frame that does not have the DEALER shape."""
        frames = self.sock.recv_multipart(copy=False)
        if len(frames) != 2:
            return None
        role = frames[1].get("User-Id") if self.curve else None
        return Request(frames[0].bytes, frames[1].bytes, role)

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


# Handshake failures the guard counts from the sockets' events, and the reason of each. A key
# the guard itself refused ("unknown_key", "wrong_role") is counted where it is refused.
_FAILURES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
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
    admitting a client key only on the ports that admit its role (the role is handed to the
    socket as the peer's User-Id), and reads each server's handshake events so that every
    refusal is counted and logged once (per peer address and reason for a refused key; per
    port for a peer that speaks no CURVE, has the wrong server key or drops the handshake,
    whose address libzmq does not report)."""

    def __init__(self, ctx: zmq.Context, keys: Keys):
        super().__init__(daemon=True, name="asyncrl-zap")
        self.ctx = ctx
        self.roles = {z85.decode(k): role for k, role in keys.clients.items()}
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind("inproc://zeromq.zap.01")
        self._lock = threading.Lock()
        self._new: list[tuple[zmq.Socket, int, Callable | None]] = []
        self._ports: dict[bytes, tuple[int, tuple[str, ...], Callable | None]] = {}
        self._logged: set = set()

    def watch(self, sock: zmq.Socket, port: int, on_failure: Callable | None,
              allow: tuple[str, ...]) -> None:
        addr = f"inproc://asyncrl-monitor-{id(sock)}"
        sock.monitor(addr, sum(_FAILURES))
        # Connected here, before the server binds, so that no event is emitted before anyone
        # listens (libzmq drops those); handed to the guard thread under the lock.
        mon = self.ctx.socket(zmq.PAIR)
        mon.connect(addr)
        with self._lock:
            self._new.append((mon, port, on_failure))
            self._ports[f"port{port}".encode()] = (port, allow, on_failure)

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
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        with self._lock:
            port, allow, on_failure = self._ports.get(domain, (0, (), None))
        role = self.roles.get(credentials[0]) if mechanism == b"CURVE" and credentials else None
        reason = ("unknown_key" if role is None else
                  "" if role_allowed(role, allow) else "wrong_role")
        if reason:
            if on_failure is not None:
                on_failure(port, reason)
            key = (address, reason)
            if key not in self._logged and len(self._logged) < 1024:
                self._logged.add(key)
                log.warning("port %d refused a peer at %s: %s; further refusals are counted, "
                            "not logged", port, address.decode(errors="replace"),
                            "its CURVE key is none of this run's (net.keys_dir)"
                            if role is None else f"role {role} does not belong on this port")
        self.zap.send_multipart([version, request_id, b"400" if reason else b"200",
                                 reason.encode() or b"OK", (role or "").encode(), b""])

    def _refused(self, port: int, on_failure: Callable | None, reason: str) -> None:
        if reason == "refused":  # counted and logged by _answer, which refused it
            return
        if on_failure is not None:
            on_failure(port, reason)
        if port not in self._logged:
            self._logged.add(port)
            log.warning("port %d: a peer failed the CURVE handshake (%s: no CURVE, or not this "
                        "run's server key); further failures are counted, not logged", port,
                        reason)
