"""Weight-sync sessions with a fake engine: the real WeightSender and SyncMember, real ZeroMQ
and a real gloo group, with generators as threads whose "engine" keeps the received tensors."""

import time

import pytest
import torch

from asyncrl import transport
from asyncrl.sync.sender import WeightSender
from tests.conftest import free_base_port
from tests.helpers.sync import HOST, FakeEngine, Generator


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _sender(base: int, n: int) -> WeightSender:
    server = transport.Server(transport.context(), HOST, base + 2)
    return WeightSender(server, HOST, base + 3, n, "gloo", timeout_s=30.0, ready_timeout_s=30.0)


def _same(engine: FakeEngine, model) -> bool:
    return all(torch.equal(engine.weights[n], t) for n, t in model.state_dict().items())


def test_a_restarted_generator_gets_a_new_session_and_the_current_weights(model):
    base = free_base_port()
    gens = [Generator(0, base), Generator(1, base)]
    for g in gens:
        g.start()
    sender = _sender(base, 2)
    sender.start()
    first = sender.session
    assert sender.sync(model, 1, due=True) is not None
    assert all(g.member.version == 1 and _same(g.engine, model) for g in gens)

    gens[1].stop.set()  # gen1 "dies" and a new process (new incarnation) takes its place
    gens[1].join()
    gens[1] = Generator(1, base)
    gens[1].start()
    deadline = time.monotonic() + 20
    while sender.members["gen1"].incarnation == sender.joined["gen1"]:
        assert time.monotonic() < deadline
        sender._drain(0.1)
    with torch.no_grad():
        model[0].weight += 1.0
    # Not due (interval), but the new gen1 is behind: the re-formed session pushes at once.
    assert sender.sync(model, 2, due=False) is not None
    assert sender.session != first
    assert all(g.member.version == 2 and _same(g.engine, model) for g in gens)
    assert all(g.member.session == sender.session for g in gens)

    sender.shutdown("done")
    for g in gens:
        g.join(timeout=10)
        assert g.finished == "done"


def test_a_version_older_than_the_generators_hold_is_never_pushed(model):
    base = free_base_port()
    gen = Generator(0, base, version=5)  # as after a learner restart: it holds version 5
    gen.start()
    sender = _sender(base, 1)
    sender.start()
    assert sender.versions() == {"gen0": 5}
    assert sender.sync(model, 3, due=True) is None  # replaying steps 4..5: nothing pushed
    assert sender.sync(model, 5, due=True) is None  # the same version: nothing to do
    assert gen.member.version == 5 and gen.engine.weights == {}
    assert sender.sync(model, 6, due=True) is not None
    assert gen.member.version == 6 and _same(gen.engine, model)
    gen.stop.set()
    gen.join()


def test_forming_a_session_without_a_generator_names_it_and_the_setting():
    base = free_base_port()
    server = transport.Server(transport.context(), HOST, base + 2)
    sender = WeightSender(server, HOST, base + 3, 1, "gloo", timeout_s=5.0, ready_timeout_s=0.5)
    with pytest.raises(TimeoutError, match=r"\['gen0'\] did not say hello.*net.ready_timeout_s"):
        sender.start()
