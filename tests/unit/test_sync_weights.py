import torch

from asyncrl.sync import weights


def test_pack_unpack_round_trip_and_buffer_reuse():
    named = [("a", torch.randn(3, 4)), ("b", torch.randn(5)), ("c", torch.randn(2, 2).half())]
    bufs = weights.pack(named)
    assert set(bufs) == {"float32", "float16"} and bufs["float32"].numel() == 17
    for (n, t), (m, v) in zip(named, weights.unpack(weights.specs_of(named), bufs)):
        assert n == m and torch.equal(t, v)
    named2 = [(n, t + 1) for n, t in named]
    again = weights.pack(named2, bufs)
    assert again["float32"].data_ptr() == bufs["float32"].data_ptr()  # refilled in place
    assert torch.equal(next(weights.unpack(weights.specs_of(named2), again))[1], named2[0][1])
    recv = weights.empty_buffers(weights.specs_of(named), torch.device("cpu"), reuse=again)
    assert recv is again


def test_tied_lm_head_is_still_sent():
    # vLLM on CPU holds its own processed lm_head: skipping it left the engine stale
    # (tests/e2e/test_hub_model.py fails with a 1.3e-3 logprob gap when it is skipped).
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    names = [n for n, _ in weights.sendable(LlamaForCausalLM(cfg))]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


def test_the_wire_allows_exactly_the_dtypes_that_can_be_allocated():
    from asyncrl import wire

    assert set(weights._DT) == set(wire.WEIGHT_DTYPES)
    for name, size in wire.WEIGHT_DTYPES.items():
        assert torch.empty(0, dtype=weights._DT[name]).element_size() == size


def test_a_push_is_bounded_by_the_model_files(tmp_path):
    from asyncrl import wire

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text("{}")  # not a weight file
    assert weights.push_bytes_bound(tmp_path) == 4000 + 2**26
    assert weights.push_bytes_bound(tmp_path / "absent") == wire.MAX_WEIGHT_BYTES


def test_buckets_hold_at_most_bucket_bytes_unless_one_tensor_is_larger():
    named = [("a", torch.randn(10)), ("big", torch.randn(100)), ("b", torch.randn(3).half()),
             ("c", torch.randn(5)), ("d", torch.randn(7))]
    specs = weights.specs_of(named)
    plan = weights.plan_buckets(specs, 128)
    assert [[specs[i][0] for i, _ in b.entries] for b in plan] == [["a"], ["big"],
                                                                   ["b", "c"], ["d"]]
    assert all(b.nbytes <= 128 or len(b.entries) == 1 for b in plan)
    assert all(off % weights.ALIGN == 0 for b in plan for _, off in b.entries)
    # Filled by the sender, received into a pool by the other end: the same tensors.
    bufs = [torch.empty(weights.largest_bucket(plan), dtype=torch.uint8) for _ in range(2)]
    sent = [b.clone() for b in weights.fill_buckets(specs, plan, named, bufs)]
    it = iter(sent)
    got = dict(weights.received_tensors(specs, plan, lambda buf: buf.copy_(next(it)),
                                        weights.BucketPool(torch.device("cpu"))))
    assert all(torch.equal(got[n], t) for n, t in named)


def test_with_overlap_the_next_bucket_is_on_the_wire_while_this_one_loads():
    named = [(f"t{i}", torch.full((16,), float(i))) for i in range(6)]
    specs = weights.specs_of(named)
    plan = weights.plan_buckets(specs, 128)  # two tensors per bucket
    assert [len(b.entries) for b in plan] == [2, 2, 2]
    events = []

    class Transfer:  # what group.start_broadcast returns: the data is there after wait()
        def __init__(self, buf, k):
            self.buf, self.k = buf, k
            events.append(f"start {k}")

        def wait(self):
            for j in range(2):
                self.buf[64 * j: 64 * j + 64].view(torch.float32).copy_(named[2 * self.k + j][1])
            events.append(f"wait {self.k}")

    started = iter(range(3))
    pool = weights.BucketPool(torch.device("cpu"))
    for name, t in weights.received_tensors(specs, plan, lambda buf: Transfer(buf, next(started)),
                                            pool, overlap=True):
        events.append(f"load {name}")
        assert torch.equal(t, dict(named)[name])
        t.clone()  # taken and let go, as a loader copying into its parameter does
    # Bucket k+1 goes on the wire once bucket k's first tensor is taken, before its second.
    assert events == ["start 0", "wait 0", "load t0", "start 1", "load t1", "wait 1", "load t2",
                      "start 2", "load t3", "wait 2", "load t4", "load t5"]
    assert pool.allocated_bytes <= 2 * 128  # the one loading and the one arriving, reused


def test_a_bucket_the_engine_still_holds_is_not_overwritten():
    # vLLM's layerwise reload keeps a layer's weights until the whole layer has arrived.
    named = [(f"t{i}", torch.full((16,), float(i))) for i in range(6)]
    specs = weights.specs_of(named)
    plan = weights.plan_buckets(specs, 64)  # one tensor per bucket
    it = iter(t for _, t in named)
    pool = weights.BucketPool(torch.device("cpu"))
    held = [t for _, t in weights.received_tensors(
        specs, plan, lambda buf: buf.view(torch.float32).copy_(next(it)), pool)]
    assert [float(t[0]) for t in held] == [0, 1, 2, 3, 4, 5]  # nothing overwritten
    assert pool.allocated_bytes == 6 * 64  # each bucket needed a buffer of its own
    del held
    pool2 = weights.BucketPool(torch.device("cpu"))
    it = iter(t for _, t in named)
    for _, t in weights.received_tensors(specs, plan,
                                         lambda buf: buf.view(torch.float32).copy_(next(it)),
                                         pool2):
        t.clone()  # taken and let go, as a loader copying into its parameter does
    assert pool2.allocated_bytes <= 2 * 64  # two buffers, reused
