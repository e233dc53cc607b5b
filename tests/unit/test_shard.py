"""learner.strategy=fsdp on 2 gloo ranks trains exactly like ddp (float32, same seed); the
model's final hidden states give the same token logprobs chunk by chunk as all at once."""

import json

import pytest
import torch
import torch.multiprocessing as mp

from asyncrl.learner.model import forward_logprobs
from asyncrl.learner.packing import pack
from tests.helpers import dist_worker


def _run(tmp_path, model_dir, strategy, steps=5, **overrides):
    out = tmp_path / f"{strategy}.json"
    mp.start_processes(dist_worker.train, nprocs=2, start_method="spawn", join=True,
                       args=(2, str(tmp_path / f"{strategy}.store"), str(model_dir), strategy,
                             steps, str(out), overrides))
    return json.loads(out.read_text())


def test_fsdp_and_ddp_give_the_same_losses_over_five_steps(model_dir, tmp_path):
    # _cfg: PPO with a critic, a KL reference model and two minibatches, so all three models
    # are shared out by the strategy and the optimizer steps twice per batch.
    ddp = _run(tmp_path, model_dir, "ddp")
    fsdp = _run(tmp_path, model_dir, "fsdp")
    for rank in range(2):
        for a, b in zip(ddp["losses"][rank], fsdp["losses"][rank], strict=True):
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-8), (rank, ddp["losses"], fsdp["losses"])
    assert len(ddp["losses"][0]) == 5


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_logprobs_equal_the_full_logits_computation(model_dir, packed,
                                                             with_entropy):
    from asyncrl.learner.model import load_policy

    torch.manual_seed(0)
    model, _ = load_policy(model_dir)
    ids = torch.randint(3, 60, (4, 23))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[3, 9:] = 0
    p = pack(ids, mask, 64) if packed else None

    def run(chunk):
        model.zero_grad(set_to_none=True)
        lp, ent = forward_logprobs(model, ids, mask, 0.7, with_entropy=with_entropy, packing=p,
                                   chunk_tokens=chunk)
        loss = (lp * mask[:, 1:]).sum() + (0 if ent is None else (ent * mask[:, 1:]).sum())
        loss.backward()
        return lp.detach(), ent, [q.grad.clone() for q in model.parameters()]

    full_lp, full_ent, full_grads = run(0)
    for chunk in (1, 7, 1000):  # one position, ragged chunks, all in one
        lp, ent, grads = run(chunk)
        keep = mask[:, 1:].bool()
        assert torch.allclose(lp[keep], full_lp[keep], rtol=0, atol=1e-6)
        if with_entropy:
            # A sum over the vocabulary of values near 5: float32 keeps ~7 digits of it.
            assert torch.allclose(ent[keep], full_ent.detach()[keep], rtol=1e-6, atol=0)
        for g, f in zip(grads, full_grads):  # summed in another order: float32 rounding
            assert (g - f).abs().max() <= 1e-5 * f.abs().max()
    assert model.get_output_embeddings() is model.lm_head  # the head was put back


def test_a_push_from_a_sharded_learner_gives_the_generator_the_unsharded_weights(
        model_dir, tmp_path):
    from tests.conftest import free_base_port

    out = tmp_path / "push.json"
    bucket = 256 << 10  # the tiny model's 10 MB in ~40 buckets; its embedding alone in one
    mp.start_processes(dist_worker.push, nprocs=2, start_method="spawn", join=True,
                       args=(2, str(tmp_path / "store"), str(model_dir), free_base_port(),
                             bucket, str(out)))
    got = json.loads(out.read_text())
    assert got["received"] == got["unsharded"] != got["initial"]  # trained, then pushed
    assert got["pushed_bytes"] > 20 * bucket
    assert got["peak_buffer_bytes"] <= 2 * max(bucket, got["pushed_bytes"] // 10)


def test_a_sharded_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(
        model_dir, tmp_path):
    def run(resumed):
        out = tmp_path / f"resumed{int(resumed)}.json"
        mp.start_processes(dist_worker.resume, nprocs=2, start_method="spawn", join=True,
                           args=(2, str(tmp_path / f"store{int(resumed)}"), str(model_dir),
                                 str(tmp_path / "run"), resumed, str(out)))
        return json.loads(out.read_text())

    uninterrupted = run(False)
    step_2 = tmp_path / "run" / "checkpoints" / "step_2"
    assert (step_2 / "sharded" / ".metadata").is_file()
    assert not list(step_2.glob("*.safetensors"))  # sharded only: no rank held it all
    resumed = run(True)
    assert resumed["sha256"] == uninterrupted["sha256"]
    assert resumed["export"] == uninterrupted["export"] == uninterrupted["sha256"]


def test_lora_under_fsdp_trains_like_ddp_and_leaves_the_base_alone(model_dir, tmp_path):
    # model.lora: frozen base weights and trained adapters in the same FSDP2 groups; the
    # reference (KL) is the policy with its adapters off, under either strategy.
    ddp = _run(tmp_path, model_dir, "ddp", steps=3, lr=1e-2, lora_rank=8)
    fsdp = _run(tmp_path, model_dir, "fsdp", steps=3, lr=1e-2, lora_rank=8)
    for rank in range(2):
        for a, b in zip(ddp["losses"][rank], fsdp["losses"][rank], strict=True):
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-8), (rank, ddp["losses"], fsdp["losses"])
    assert ddp["adapter_moved"] and fsdp["adapter_moved"]
    assert ddp["base_kept"] and fsdp["base_kept"]


def test_a_sharded_lora_checkpoint_holds_the_adapters_and_resumes_exactly(model_dir, tmp_path):
    def run(resumed):
        out = tmp_path / f"lora{int(resumed)}.json"
        mp.start_processes(dist_worker.resume, nprocs=2, start_method="spawn", join=True,
                           args=(2, str(tmp_path / f"lstore{int(resumed)}"), str(model_dir),
                                 str(tmp_path / "lora-run"), resumed, str(out), 8))
        return json.loads(out.read_text())

    uninterrupted = run(False)
    resumed = run(True)
    assert resumed["sha256"] == uninterrupted["sha256"]
    assert resumed["export"] == uninterrupted["export"]
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    # the adapters and their AdamW moments, not the frozen base
    assert uninterrupted["checkpoint_bytes"] < model_bytes / 4

