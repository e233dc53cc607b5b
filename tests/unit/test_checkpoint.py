"""Checkpoints restore the learner exactly, and the batch log survives a kill mid-write."""

import json

import torch

from asyncrl.launcher import _Progress
from asyncrl.learner import checkpoint
from asyncrl.learner.batch import collate
from asyncrl.learner.runlog import BatchLog, read_batch_log, weights_sha256
from asyncrl.learner.step import train_step
from tests.helpers.learner import learner_cfg, make_groups, make_learner


def _train(cfg, models, sched, tok, step):
    stats = train_step(models, collate(make_groups(step), tok.pad_token_id), cfg.learner, 1.0, 6)
    sched.step()
    return stats["loss"]


def test_resume_from_a_checkpoint_trains_exactly_like_an_uninterrupted_run(model_dir, tmp_path):
    cfg = learner_cfg(model_dir)
    model, tok, models, sched = make_learner(cfg, model_dir)
    losses = []
    for step in range(1, 5):
        losses.append(_train(cfg, models, sched, tok, step))
        if step == 2:
            checkpoint.save(tmp_path, 2, model, tok, models, sched, {"tokens_total": 7})
    uninterrupted = weights_sha256(model)

    ckpt = checkpoint.latest(tmp_path)
    assert ckpt.step == 2 and ckpt.state["tokens_total"] == 7
    torch.manual_seed(123)  # a restarted process starts from some other RNG state
    model2, tok2, models2, sched2 = make_learner(cfg, ckpt.path)
    checkpoint.restore(ckpt, models2, sched2)
    resumed = [_train(cfg, models2, sched2, tok2, step) for step in (3, 4)]
    assert resumed == losses[2:]
    assert weights_sha256(model2) == uninterrupted


def test_a_checkpoint_is_only_seen_once_complete(model_dir, tmp_path):
    cfg = learner_cfg(model_dir)
    model, tok, models, sched = make_learner(cfg, model_dir)
    checkpoint.save(tmp_path, 4, model, tok, models, sched, {})
    # A rank killed while writing step 8 leaves a temporary directory behind, never step_8.
    (tmp_path / "checkpoints" / ".step_8.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_9").mkdir()  # no asyncrl_state.json: incomplete
    assert checkpoint.latest(tmp_path).step == 4
    assert checkpoint.latest(tmp_path / "nowhere") is None


def test_the_batch_log_cuts_a_torn_frame_and_hands_back_the_steps_after_the_checkpoint(
        tmp_path):
    log = BatchLog(tmp_path, rank=0)
    for step in range(1, 5):
        log.append(step, make_groups(step), dropped_total=step)
    log.bin.close()
    path = tmp_path / "batches" / "rank0.bin"
    with path.open("ab") as f:  # killed while writing step 5
        f.write((10_000).to_bytes(8, "little") + b"partial")

    resumed = BatchLog(tmp_path, rank=0, resume_step=2)
    assert sorted(resumed.logged) == [3, 4]
    groups, dropped = resumed.logged[3]
    assert dropped == 3 and [g.created_at for g in groups] == [3.0, 3.0]
    resumed.append(5, make_groups(5), 5)
    assert [gs[0].created_at for gs in read_batch_log(path)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    rows = [json.loads(x) for x in (tmp_path / "admission.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_resuming_drops_metrics_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "elapsed_s": s * 2.0}) + "\n"
                            for s in range(7)) + '{"step": 7, "ela')  # torn last line
    elapsed = checkpoint.truncate_metrics(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert 12.0 <= elapsed < 20.0  # the last row's time plus the seconds since it was written


def test_progress_shows_the_restart_and_the_replayed_steps_once_more(tmp_path):
    path, lines = tmp_path / "metrics.jsonl", []
    progress = _Progress(path, 10, lines.append)

    def row(step, **extra):
        return json.dumps({"step": step, "reward_mean": 0.5, "staleness_mean": 1.0,
                           "tokens_per_s": 10.0, "elapsed_s": 1.0, "eval_accuracy": 0.5,
                           **extra}) + "\n"

    path.write_text(row(0) + row(1) + row(2) + row(3))
    progress.poll()
    tmp = tmp_path / "new"
    tmp.write_text(row(0) + row(1) + row(2, resumed_from_step=1))
    tmp.replace(path)  # what a resumed learner does
    progress.poll()
    assert [x.split("]")[0] for x in lines] == [
        "[step 0/10", "[step 1/10", "[step 2/10", "[step 3/10",
        "[run", "[step 2/10"]


def test_restore_loads_onto_the_ranks_own_device(model_dir, tmp_path, monkeypatch):
    """Every rank loads the optimizer state onto the device it trains on (map_location), not
    onto the device rank 0 saved it from (on GPUs all ranks would load onto cuda:0 at once)."""
    import asyncrl.learner.checkpoint as ck

    cfg = learner_cfg(model_dir)
    model, tok, models, sched = make_learner(cfg, model_dir)
    _train(cfg, models, sched, tok, 1)
    ck.save(tmp_path, 1, model, tok, models, sched, {})
    seen = []
    real_load = torch.load
    monkeypatch.setattr(ck.torch, "load", lambda *a, **k: seen.append(k.get("map_location"))
                        or real_load(*a, **k))
    ck.restore(ck.latest(tmp_path), models, sched)
    assert seen == [torch.device("cpu")] == [next(model.parameters()).device]
