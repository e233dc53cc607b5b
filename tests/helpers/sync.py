"""A generator's side of weight sync without vLLM: the real SyncMember in a thread, with an
engine that keeps the tensors it receives. Used by the sync-session, sharded-push and port
fuzzing tests."""

import threading
import uuid

import torch

from asyncrl import transport
from asyncrl.sync import group, transfer, weights
from asyncrl.sync.member import LearnerFinished, SyncMember

HOST = "127.0.0.1"


class FakeEngine:
    """The three sync calls of asyncrl.generator.engine.VLLMEngine, without vLLM."""

    def __init__(self):
        self.pg = None
        self.weights: dict[str, torch.Tensor] = {}

    def init_sync(self, host, port, rank, world_size, backend, timeout_s, prefix):
        self.pg = group.init_group(host, port, rank, world_size, backend, timeout_s, prefix)

    def leave_sync(self):
        self.pg = None

    def receive_weights(self, specs, ipc=None, bucket_bytes=weights.DEFAULT_BUCKET_BYTES):
        pool = weights.BucketPool(torch.device("cpu"))  # as asyncrl/sync/receiver.py does:
        got = transfer.Broadcast.incoming(specs, bucket_bytes, self.pg, 30.0, pool)
        self.weights = {n: t.clone() for n, t in got}
        return 0.0, sum(t.numel() * t.element_size() for t in self.weights.values())


class Generator(threading.Thread):
    """A generator's serving loop; the control socket is created and used in this thread."""

    def __init__(self, index: int, base: int, version: int = 0, keys=None):
        super().__init__(daemon=True)
        self.index, self.base, self.start_version, self.keys = index, base, version, keys
        self.engine = FakeEngine()
        self.stop = threading.Event()
        self.finished = None
        self.member: SyncMember | None = None

    def run(self):
        control = transport.Client(transport.context(), HOST, self.base + 2, f"gen{self.index}",
                                   self.keys)
        self.member = SyncMember(control, self.engine, f"gen{self.index}", self.index + 1,
                                 uuid.uuid4().hex[:8], HOST, self.base + 3, "gloo", 30.0,
                                 hello_interval_s=0.2, alone_timeout_s=60.0)
        self.member.version = self.start_version
        try:
            while not self.stop.is_set():
                self.member.serve(timeout_s=0.05)
        except LearnerFinished as e:
            self.finished = str(e)
        control.close()
