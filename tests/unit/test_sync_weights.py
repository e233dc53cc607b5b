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
