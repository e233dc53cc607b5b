"""A hub-format checkout on local disk (here a tiny random Qwen2 with tied embeddings, the
layout of Qwen2.5-0.5B) goes through the same loop via model.path, weight sync included."""

import json
import subprocess
import sys

import pytest
import torch

from asyncrl.learner.model import load_policy, token_logprobs
from asyncrl.task.tiny_model import build_tokenizer
from tests.conftest import ROOT, free_base_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("qwen2-tiny")
    build_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def test_hub_format_model_runs_through_the_loop_and_syncs_exactly(qwen2_dir, tmp_path):
    # A random model earns no reward, so the only update is AdamW's weight decay: enough to
    # move every weight and check that the tied-embedding model reloads exactly in vLLM.
    args = [f"model.path={qwen2_dir}", f"run_dir={tmp_path}", f"net.base_port={free_base_port()}",
            "learner.total_steps=2", "learner.lr=0.01", "learner.weight_decay=0.5",
            "learner.groups_per_step=2", "generator.group_size=2", "generator.prompts_per_call=2",
            "learner.eval_interval=1", "task.eval_size=8"]
    r = subprocess.run([sys.executable, "-m", "asyncrl", "run", "configs/default.yaml", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    probes = [json.loads(x) for x in (tmp_path / "sync_probe.jsonl").read_text().splitlines()]
    # A due push is held back while the generator evaluates (asyncrl/learner/lead.py
    # push_due), so version 1 may be skipped when the evaluation of version 0 is still
    # running at step 1; the last step is always pushed.
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    pushed = [r["step"] for r in rows[1:] if r["sync_s"] is not None]
    # (a push owed at the end goes out after the last row, which then shows sync_s None)
    versions = [p["policy_version"] for p in probes]
    assert versions[0] == 0 and versions[-1] == 2 and versions == sorted(set(versions))
    assert set(pushed) <= set(versions)
    model, _ = load_policy(tmp_path / "checkpoints" / "step_2")
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings

    def diff(p):
        ids = torch.tensor([p["prompt_tokens"] + p["tokens"]])
        with torch.no_grad():
            lp = token_logprobs(model, ids, torch.ones_like(ids), p["temperature"])
        return (lp[0, len(p["prompt_tokens"]) - 1 :] - torch.tensor(p["logprobs"])).abs().max()

    assert diff(probes[-1]) < 1e-4
    assert diff(probes[0]) > 1e-4
