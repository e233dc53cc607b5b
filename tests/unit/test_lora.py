"""model.lora in the learner: only the adapters train, the reference is the base with them
off, checkpoints hold the adapter and resume exactly, exports load in peft (and merged in
transformers), pushes carry the adapter alone, and bad configs are named when they load."""

import json

import pytest
import torch

from asyncrl import lora, wire
from asyncrl.config import ConfigError, RunConfig, load_config
from asyncrl.config.checks import validate
from asyncrl.learner import checkpoint
from asyncrl.learner.batch import collate
from asyncrl.learner.main import _restore
from asyncrl.learner.model import load_policy, token_logprobs
from asyncrl.learner.runlog import named_sha256
from asyncrl.learner.step import train_step
from asyncrl.sync import weights
from tests.conftest import ROOT
from tests.helpers.learner import learner_cfg, make_groups

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _cfg(model_dir, rank=8, kl=0.05):
    cfg = learner_cfg(model_dir)
    cfg.model.lora.rank, cfg.model.lora.alpha = rank, 16.0
    cfg.model.lora.target_modules = list(TARGETS)
    cfg.learner.kl_coef = kl
    cfg.learner.lr = 1e-2  # the adapters must move in a few steps
    return cfg


def _learner(cfg, ckpt=None, seed=0):
    torch.manual_seed(seed)
    return _restore(cfg, ckpt, torch.device("cpu"), 1, 0)


def _train(cfg, models, sched, tok, step):
    stats = train_step(models, collate(make_groups(step), tok.pad_token_id), cfg.learner, 1.0, 6)
    sched.step()
    return stats


def _logprobs(model, seed=5):
    ids = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(seed))
    return token_logprobs(model, ids, torch.ones_like(ids), 1.0)


def test_adapters_start_at_the_base_and_only_they_train(model_dir):
    base, _ = load_policy(model_dir)
    cfg = _cfg(model_dir)
    model, tok, models, sched = _learner(cfg)
    assert torch.equal(_logprobs(model), _logprobs(base))  # B = 0: the base exactly
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(lora.is_adapter_tensor(n) for n in trained)
    assert {n.split(".")[-3] for n in trained} == set(TARGETS)
    # The optimizer holds the adapters' moments alone.
    opt_params = [p for g in models.policy_opt.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for n, p in model.named_parameters()
                                           if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for step in (1, 2, 3):
        _train(cfg, models, sched, tok, step)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()
               if not p.requires_grad)  # the base never moves
    assert not torch.allclose(_logprobs(model), _logprobs(base), atol=1e-4)
    with lora.adapters_off(model):  # the reference: the base, from the same weights
        assert torch.equal(_logprobs(model), _logprobs(base))
    assert models.ref is None and models.ref_is_base  # no second copy of the weights


def test_the_kl_to_the_reference_is_zero_before_the_adapters_move(model_dir):
    cfg = _cfg(model_dir, kl=0.1)
    cfg.learner.kl_mode, cfg.learner.minibatches = "loss", 1
    model, tok, models, sched = _learner(cfg)
    first = _train(cfg, models, sched, tok, 1)
    assert abs(first["kl_ref"]) < 1e-6
    later = [_train(cfg, models, sched, tok, s)["kl_ref"] for s in (2, 3, 4)]
    assert max(later) > 1e-6  # the adapters moved the policy off its base


def test_a_checkpoint_holds_the_adapter_and_resumes_exactly(model_dir, tmp_path):
    cfg = _cfg(model_dir)
    model, tok, models, sched = _learner(cfg)
    losses = []
    for step in range(1, 5):
        losses.append(_train(cfg, models, sched, tok, step)["loss"])
        if step == 2:
            checkpoint.save(tmp_path, 2, model, tok, models, sched, {})
    final = named_sha256(model.state_dict().items())
    ckpt = checkpoint.latest(tmp_path)
    files = {p.name for p in ckpt.path.iterdir()}
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS} <= files
    assert "model.safetensors" not in files  # the base is model.path, not copied
    model2, tok2, models2, sched2 = _learner(cfg, ckpt, seed=123)
    checkpoint.restore(ckpt, models2, sched2)
    assert [_train(cfg, models2, sched2, tok2, s)["loss"] for s in (3, 4)] == losses[2:]
    assert named_sha256(model2.state_dict().items()) == final


def test_the_export_loads_in_peft_and_the_merged_export_in_transformers(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = _cfg(model_dir)
    model, tok, models, sched = _learner(cfg)
    for step in (1, 2, 3):
        _train(cfg, models, sched, tok, step)
    ours = _logprobs(model)
    checkpoint.export(tmp_path / "adapter", model, tok, 0)
    checkpoint.export(tmp_path / "merged", model, tok, 0, merged=True)
    config = json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(_logprobs(theirs), ours, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logprobs(merged), ours, atol=1e-4)


def test_a_push_sends_the_adapter_alone_in_peft_names(model_dir):
    cfg = _cfg(model_dir)
    model, *_ = _learner(cfg)
    pushed = weights.sendable(model)
    assert pushed and all(lora.is_peft_adapter_tensor(n) for n, _ in pushed)
    full = sum(p.numel() for n, p in model.named_parameters() if not lora.is_adapter_tensor(n))
    assert sum(t.numel() for _, t in pushed) * 20 < full
    # the tiny model's 4 layers x 3 targets x (A, B)
    assert len(pushed) == 4 * len(TARGETS) * 2


def test_an_adapted_model_refuses_an_adapter_of_another_shape(model_dir, tmp_path):
    cfg = _cfg(model_dir)
    model, *_ = _learner(cfg)
    other = _cfg(model_dir, rank=16)
    model16, *_ = _learner(other)
    lora.save_adapter(tmp_path / "a", lora.config_of(model16),
                      lora.adapter_tensors(model16.state_dict().items()))
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=3", "model.lora.rank=3: vLLM's LoRA takes 1, 8, 16"),
    ("model.lora.rank=-1", "model.lora.rank=-1"),
    ("model.lora.target_modules=[q_proj,qkv]", "['qkv'] is not a layer"),
    ("model.lora.target_modules=[]", "target_modules is empty"),
    ("model.lora.target_modules=[lm_head]", "lm_head"),
])
def test_bad_lora_configs_are_named_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "default.yaml", ["model.lora.rank=8", override])
    assert message in str(e.value)


def test_adapters_travel_over_gloo_whatever_the_weights_backend():
    # Colocated on one GPU (ipc) NCCL cannot form a group; a few MB go over gloo instead.
    for backend in ("ipc", "nccl", "auto", "gloo"):
        cfg = load_config(ROOT / "configs" / "default.yaml",
                          ["model.lora.rank=8", f"weight_sync.backend={backend}"])
        assert cfg.sync_backend == "gloo"
    assert load_config(ROOT / "configs" / "default.yaml",
                       ["weight_sync.backend=ipc"]).sync_backend == "ipc"


def test_target_modules_are_checked_against_a_real_models_layers(model_dir):
    cfg = RunConfig()
    cfg.model.path = str(model_dir)
    cfg.model.lora.rank = 8
    cfg.model.lora.target_modules = ["q_proj", "c_attn"]
    with pytest.raises(ConfigError, match=r"\['c_attn'\] is not a layer of"):
        validate(cfg)
    cfg.model.lora.target_modules = ["q_proj", "gate_proj"]
    validate(cfg)


def test_lora_on_expert_layers_is_refused(model_dir, tmp_path):
    moe = tmp_path / "moe"
    moe.mkdir()
    for f in model_dir.iterdir():
        (moe / f.name).write_bytes(f.read_bytes())
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    cfg = RunConfig()
    cfg.model.path = str(moe)
    cfg.model.lora.rank = 8
    cfg.model.lora.target_modules = ["q_proj", "up_proj"]
    with pytest.raises(ConfigError, match=r"\['up_proj'\] are expert \(MoE\) layers"):
        validate(cfg)
    cfg.model.lora.target_modules = ["q_proj", "v_proj"]  # attention only: fine
    validate(cfg)


@pytest.mark.parametrize("adapter, ok", [
    ({}, True),
    ({"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"]}, True),
    ({"r": 3, "lora_alpha": 16.0, "target_modules": ["q_proj"]}, False),
    ({"r": 8, "lora_alpha": 16.0, "target_modules": []}, False),
    ({"r": 8, "lora_alpha": 16.0, "target_modules": ["../etc"]}, False),
    ({"r": 8, "lora_alpha": float("nan"), "target_modules": ["q_proj"]}, False),
    ({"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"], "path": "/tmp"}, False),
    ([], False),
])
def test_the_wire_checks_a_pushed_adapters_shape(adapter, ok):
    frame = wire.encode("weights_update", 1, session="s", tensors=[], ipc=[], bucket_bytes=64,
                        adapter={}) if ok else None
    msg = {"kind": "weights_update", "schema": wire.SCHEMA_VERSION, "policy_version": 1,
           "session": "s", "tensors": [], "ipc": [], "bucket_bytes": 64, "adapter": adapter}
    import msgpack

    raw = wire.seal(msgpack.packb(msg))
    if ok:
        assert frame is not None and wire.decode(raw).adapter == adapter
    else:
        with pytest.raises(wire.MessageError):
            wire.decode(raw)


def test_merged_state_folds_each_adapter_into_its_weight():
    torch.manual_seed(0)
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    out = lora.merged_state([("m.q_proj.weight", w), ("m.q_proj.lora_A.weight", a),
                             ("m.q_proj.lora_B.weight", b), ("m.norm.weight", torch.ones(4))],
                            0.5)
    assert set(out) == {"m.q_proj.weight", "m.norm.weight"}
    assert torch.allclose(out["m.q_proj.weight"], w + 0.5 * b @ a)


class _Engine:
    """The three LoRA calls of vLLM's LLMEngine, recorded."""

    def __init__(self):
        self.loaded, self.calls = {}, []

    def add_lora(self, req):
        self.calls.append(("add", req.lora_int_id))
        self.loaded[req.lora_int_id] = req

    def remove_lora(self, lora_id):
        self.calls.append(("remove", lora_id))
        del self.loaded[lora_id]


def test_the_engine_keeps_an_adapter_while_a_request_runs_on_it(tmp_path):
    from asyncrl.generator.engine import Adapters

    eng = _Engine()
    ad = Adapters(eng, tmp_path)
    assert ad.request(None, "r0") is None  # before any push: the base
    for v in (1, 2):
        ad.path(v).mkdir()
    ad.add(1, ad.path(1))
    req = ad.request(None, "r1")  # the newest: version 1
    assert req.lora_name == "asyncrl-v1" and req.lora_int_id == 1
    ad.add(2, ad.path(2))
    assert set(eng.loaded) == {1, 2}  # r1 still runs on version 1
    assert ad.request(1, "r2").lora_int_id == 1  # a request tagged 1 gets 1, not the newest
    ad.finished(["r1"])
    assert set(eng.loaded) == {1, 2}  # r2 still on it
    ad.finished(["r2", "r0"])
    assert set(eng.loaded) == {2} and not ad.path(1).exists() and ad.path(2).is_dir()
    with pytest.raises(RuntimeError, match="no adapter of policy version 1"):
        ad.request(1, "r3")
    ad.path(2).mkdir(exist_ok=True)
    ad.add(2, ad.path(2))  # the same version again (a re-formed session): replaced, not doubled
    assert eng.calls[-2:] == [("remove", 2), ("add", 2)] and set(eng.loaded) == {2}


def test_adapter_directories_of_dead_generators_are_removed():
    import os
    import subprocess
    import sys

    from asyncrl.generator import engine

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    root = engine.adapter_root("gen7")
    mine = root.parent
    stale, live = mine / f"gen7-{dead}", mine / f"gen7-{os.getppid()}"
    stale.mkdir(exist_ok=True)
    live.mkdir(exist_ok=True)
    again = engine.adapter_root("gen7")
    try:
        assert again == root and root.is_dir()
        assert not stale.exists() and live.is_dir()  # only the gone process's
        assert oct(mine.stat().st_mode & 0o777) == oct(0o700)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_an_adapter_directory_merges_into_its_base(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(model_dir)
    model, tok, models, sched = _learner(cfg)
    for step in (1, 2):
        _train(cfg, models, sched, tok, step)
    checkpoint.export(tmp_path / "adapter", model, tok, 0)
    out = lora.merge_into(tmp_path / "adapter", model_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(_logprobs(merged), _logprobs(model), atol=1e-4)
    assert (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("lora_rank, adapter, names, reason", [
    (0, {}, ["model.w"], None),
    (8, {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"]},
     ["base_model.model.m.q_proj.lora_A.weight"], None),
    (0, {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"]},
     ["base_model.model.m.q_proj.lora_A.weight"], "adapter_unexpected"),
    (8, {}, ["model.w"], "adapter_expected"),
    (8, {"r": 16, "lora_alpha": 16.0, "target_modules": ["q_proj"]},
     ["base_model.model.m.q_proj.lora_A.weight"], "adapter_rank"),
    (8, {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"]},
     ["model.layers.0.mlp.down_proj.weight"], "bad_adapter"),
])
def test_a_generator_refuses_a_push_its_engine_does_not_load(lora_rank, adapter, names, reason):
    from asyncrl.sync.member import SyncMember

    member = SyncMember(None, None, "gen0", 1, "i", "127.0.0.1", 1, "gloo", 1.0, 1.0, 1.0,
                        lora_rank=lora_rank)
    msg = wire.WeightsUpdate(policy_version=3, session="s", ipc=[], bucket_bytes=64,
                             adapter=adapter, tensors=[[n, "float32", [2, 2]] for n in names])
    got = member._refuse_adapter(msg)
    assert (got[0] if got else None) == reason
