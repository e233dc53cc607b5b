"""CurveZMQ on the transport's sockets: only holders of the run's keys get through, and every
refusal is counted by the server (real sockets on loopback)."""

import stat
import threading
import time

import pytest

from asyncrl import transport
from tests.conftest import free_base_port

HOST = "127.0.0.1"
# How libzmq classifies a peer without CURVE, or with another run's server key, depends on
# timing (a protocol error, or a handshake dropped without detail): either is a refusal.
NO_CURVE = ("protocol", "handshake")


class Refusals:
    def __init__(self):
        self.seen: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def __call__(self, port: int, reason: str) -> None:
        with self.lock:
            self.seen.append((port, reason))

    def wait_for(self, *reasons: str, timeout_s: float = 20.0) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                hits = [s for s in self.seen if s[1] in reasons]
            if hits:
                return hits
            time.sleep(0.05)
        raise AssertionError(f"no refusal with reason in {reasons} within {timeout_s}s: "
                             f"{self.seen}")


@pytest.fixture
def served(tmp_path):
    """An echo server with the run's keys, on a real port."""
    keys = transport.load_keys(transport.make_keys(tmp_path / "keys"))
    port = free_base_port()
    refusals = Refusals()
    ctx = transport.context()
    server = transport.Server(ctx, HOST, port, keys, refusals)
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if transport.poll_servers([server], 0.1):
                got = server.recv()
                if got is not None:
                    server.send(got[0], b"echo:" + got[1])

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    yield keys, port, refusals, tmp_path
    stop.set()
    t.join(timeout=5)
    server.close()


def test_key_files_are_owner_only_one_pair_per_role(tmp_path):
    roles = transport.client_roles(2)
    assert roles == ["gen0", "gen1", "learner", "evaluator"]
    d = transport.make_keys(tmp_path / "k", roles)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    names = sorted(f.name for f in d.iterdir())
    assert names == sorted([*(f"{r}{ext}" for r in ["server", *roles]
                              for ext in (".key", ".key_secret")),
                            "endpoint.token"])  # the OpenAI-compatible endpoints' bearer key
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    before = (d / "server.key_secret").read_bytes()
    transport.make_keys(d, transport.client_roles(3))  # an existing run keeps its keys
    assert (d / "server.key_secret").read_bytes() == before and (d / "gen2.key").is_file()
    keys = {r: transport.load_keys(d, r) for r in ["gen0", "learner"]}
    assert keys["gen0"].client_public != keys["learner"].client_public
    assert keys["gen0"].clients[keys["learner"].client_public] == "learner"
    assert set(keys["gen0"].clients.values()) == {"gen0", "gen1", "gen2", "learner",
                                                  "evaluator"}
    assert transport.load_keys(d, "buffer").client_secret is None  # it only serves


def test_missing_keys_are_named(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "server.key").write_text("")
    with pytest.raises(FileNotFoundError, match=r"gen3.key_secret.*--generators.*net.keys_dir"):
        transport.load_keys(tmp_path / "k", "gen3")


def test_a_role_is_admitted_only_on_the_ports_it_belongs_on(tmp_path):
    """The buffer's learner port admits the learner's key only: a generator's key (any
    generator's) is refused and counted as wrong_role; the learner gets through and the
    server sees which role sent each request."""
    d = transport.make_keys(tmp_path / "keys", transport.client_roles(2))
    port, refusals, ctx = free_base_port(), Refusals(), transport.context()
    server = transport.Server(ctx, HOST, port, transport.load_keys(d, "buffer"), refusals,
                              allow=(transport.LEARNER,))
    roles = []
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if transport.poll_servers([server], 0.1):
                got = server.recv()
                roles.append(got.role)
                server.send(got.ident, b"echo:" + got.payload)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        for gen in ("gen0", "gen1"):
            client = transport.Client(ctx, HOST, port, gen, transport.load_keys(d, gen))
            assert client.request(b"batch_request", timeout_s=1.5) is None
        assert len(refusals.wait_for("wrong_role")) >= 1
        learner = transport.Client(ctx, HOST, port, "learner0", transport.load_keys(d, "learner"))
        assert learner.request(b"batch_request", timeout_s=20) == b"echo:batch_request"
        assert roles == ["learner"]
        # a known key in the wrong place, not an unknown one (libzmq may add a "handshake"
        # event for the dropped connection, as for NO_CURVE above)
        assert "unknown_key" not in {r for _, r in refusals.seen}
    finally:
        stop.set()
        t.join(timeout=5)
        server.close()


def test_role_patterns():
    gens = (transport.GENERATORS,)
    assert transport.role_allowed("gen0", gens) and transport.role_allowed("gen12", gens)
    assert not transport.role_allowed("gen", gens) and not transport.role_allowed("genx", gens)
    assert not transport.role_allowed("learner", gens)
    assert transport.role_allowed("learner", (transport.LEARNER,))


def test_run_keys_get_through(served):
    keys, port, refusals, _ = served
    client = transport.Client(transport.context(), HOST, port, "gen0", keys)
    assert client.request(b"hello", timeout_s=20) == b"echo:hello"
    assert refusals.seen == []


def test_no_curve_is_refused_and_counted(served):
    _, port, refusals, _ = served
    intruder = transport.Client(transport.context(), HOST, port, "intruder")
    assert intruder.request(b"trajectories", timeout_s=1.5) is None
    assert refusals.wait_for(*NO_CURVE)[0][0] == port


def test_unknown_client_key_is_refused_and_counted(served, tmp_path):
    keys, port, refusals, _ = served
    other = transport.load_keys(transport.make_keys(tmp_path / "other"))
    # Knows the server's public key (it is not secret) but holds another client key.
    forged = transport.Keys(keys.server_public, other.server_secret, other.client_public,
                            other.client_secret)  # gen0 of another run
    intruder = transport.Client(transport.context(), HOST, port, "intruder", forged)
    assert intruder.request(b"trajectories", timeout_s=1.5) is None
    assert refusals.wait_for("unknown_key")[0][0] == port


def test_client_refuses_an_impostor_server(served, tmp_path):
    """A client with another run's keys talks to this server: the handshake fails both ways
    (the client's idea of the server key is wrong), nothing is delivered."""
    _, port, refusals, _ = served
    other = transport.load_keys(transport.make_keys(tmp_path / "other"))
    client = transport.Client(transport.context(), HOST, port, "gen0", other)
    assert client.request(b"trajectories", timeout_s=1.5) is None
    assert refusals.wait_for(*NO_CURVE)


def test_heartbeat_without_keys_never_arrives(served):
    _, port, refusals, _ = served
    transport.Heartbeat(HOST, port, lambda: b"beat", 0.05, None).start()
    assert refusals.wait_for(*NO_CURVE)


def test_a_request_that_cannot_be_sent_times_out_instead_of_blocking(served, tmp_path):
    """While libzmq drops and redials a connection whose handshake was refused, a DEALER has
    no pipe and a blocking send would wait forever (seen in tests/e2e/test_auth.py under load).
    ZMQ_IMMEDIATE makes that state permanent here: no pipe until a handshake succeeds."""
    import zmq

    _, port, _, _ = served
    other = transport.load_keys(transport.make_keys(tmp_path / "other"))
    client = transport.Client(transport.context(), HOST, port, "gen0", other)
    client.sock.close(linger=0)
    client.sock = client.ctx.socket(zmq.DEALER)
    client.sock.setsockopt(zmq.IMMEDIATE, 1)
    transport._client_keys(client.sock, other)
    client.sock.connect(client.addr)
    t0 = time.monotonic()
    assert client.request(b"trajectories", timeout_s=0.5) is None
    assert time.monotonic() - t0 < 5
