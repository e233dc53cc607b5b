"""rm.rounds (iterated preferences, asyncrl/rm/rounds.py): where the reward models are cached,
what each round trains on, and that a stopped build goes on without redoing a finished part.
The rounds' RL runs are replaced here by directories of checkpoints (the real `asyncrl run`
inside a round: tests/e2e/test_rm_rounds.py, slow)."""

import json

import pytest

from asyncrl.cli import main
from asyncrl.config import load_config
from asyncrl.rm import builtin, train
from asyncrl.rm import rounds as rounds_mod
from asyncrl.testing import build_tiny_model


def _cfg(tmp_path, *more):
    cfg = load_config("configs/rlhf.yaml", [f"warm_start.cache_dir={tmp_path}", *more])
    cfg.model.path = str(tmp_path / "tiny-addition-0123")  # as resolve_model leaves it
    return cfg


def test_the_first_reward_model_keeps_its_cache_key_whatever_the_rounds(tmp_path):
    first, last = builtin.builtin_rm_dirs(_cfg(tmp_path))
    assert last is not None and last != first
    for more in (["rm.rounds=0"], ["rm.rounds=3"], ["rm.round_pairs=100"], ["learner.lr=3e-5"]):
        assert builtin.builtin_rm_dirs(_cfg(tmp_path, *more))[0] == first, more
    assert builtin.builtin_rm_dirs(_cfg(tmp_path, "rm.rounds=0"))[1] is None
    # the rounds' RL runs are this config's: what they train changes the last model's key
    for more in (["rm.rounds=3"], ["rm.round_lr=0.001"], ["learner.lr=3e-5"],
                 ["learner.kl_coef=0.1"], ["generator.group_size=4"]):
        assert builtin.builtin_rm_dirs(_cfg(tmp_path, *more))[1] != last, more
    # where the roles run does not
    for more in (["net.base_port=30000"], ["generator.threads=2"], ["run_dir=elsewhere"]):
        assert builtin.builtin_rm_dirs(_cfg(tmp_path, *more)) == (first, last), more
    assert builtin.builtin_rm_dirs(_cfg(tmp_path, "rm.pairs=500"))[0] != first


@pytest.fixture()
def fake_runs(monkeypatch, tmp_path):
    """Each round's 'RL run': a directory whose checkpoints are tiny random models; their
    samples (and the SFT policy's): the right answer, a wrong one and a rambling one, so that
    every prompt gives the raters pairs (a random model's samples mostly tie)."""
    from asyncrl.rm import gold

    def samples(policy_dir, prompts, k, max_tokens, seed, progress=print, temperature=1.0,
                who=""):
        right = [str(sum(map(int, p.rstrip("=").split("+")[-2:]))) for p in prompts]
        return [[a, a + "1", a + " so", "x"][:k] * (k // 4) for a in right]

    monkeypatch.setattr(gold, "sample_responses", samples)
    runs = []

    def fake(cfg, rm, here, r, progress):
        runs.append((r, rm))
        run = here / "run"
        for step in (2, 4):
            build_tiny_model(run / "checkpoints" / f"step_{step}", seed=10 * r + step)
        (run / "win_rate.json").write_text(json.dumps({"win_rate": 0.5}))
        return run

    monkeypatch.setattr(rounds_mod, "_rl_run", fake)
    return runs


def _small(tmp_path, rounds=2):
    policy = build_tiny_model(tmp_path / "policy")
    cfg = load_config("configs/rlhf.yaml", [
        f"model.path={policy}", "rm.base=", f"rm.rounds={rounds}", "rm.round_pairs=24",
        "rm.round_steps=2", "rm.batch_size=4", "rm.eval_interval=100", "task.eval_size=8"])
    first = build_tiny_model(tmp_path / "rm0")  # a causal LM: load_base gives it a head
    return cfg, first


def test_each_round_trains_on_every_rounds_pairs_and_the_sft_policys(tmp_path, fake_runs,
                                                                     monkeypatch):
    cfg, first = _small(tmp_path)
    seen = []
    real = train.train_reward_model
    monkeypatch.setattr(train, "train_reward_model", lambda c, out, progress, data: (
        seen.append((c.rm.base, c.rm.steps, c.rm.lr, len(data[0].rows), len(data[1])))
        or real(c, out, progress, data)))
    lines = []
    out = rounds_mod.iterate(cfg, first, tmp_path / "rm", tmp_path / "work", lines.append)
    assert [r for r, _ in fake_runs] == [1, 2]
    assert fake_runs[0][1] == first and fake_runs[1][1] == tmp_path / "work" / "round-1" / "rm"
    sft = len((tmp_path / "work" / "sft.train.jsonl").read_text().splitlines())
    assert sft == 24
    # round 1: the SFT pairs and 12 of each of its two checkpoints; round 2: also round 2's
    assert [s[3] for s in seen] == [sft + 24, sft + 48]
    assert seen[0][:3] == (str(first), 2, 1e-4)
    assert seen[1][0] == str(tmp_path / "work" / "round-1" / "rm")
    assert seen[1][4] > seen[0][4]  # the held-out pairs grow with each round's policies
    report = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in report] == [1, 2]
    assert set(report[-1]["agreement"]) == {"SFT policy", "round 1", "round 2"}
    values = [v for r in report for v in [r["before"], *r["agreement"].values()]]
    assert all(0 <= v <= 1 for v in values), values
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert any("round 2/2" in line and "agreed with the gold preference" in line
               for line in lines)


def test_a_stopped_build_goes_on_without_redoing_a_finished_part(tmp_path, fake_runs,
                                                               monkeypatch):
    cfg, first = _small(tmp_path)
    real = rounds_mod._fine_tune
    calls = {"n": 0}

    def dies_in_round_2(cfg, rm, sft, rounds, out, r, progress):
        calls["n"] += 1
        if r == 2:
            raise KeyboardInterrupt
        return real(cfg, rm, sft, rounds, out, r, progress)

    monkeypatch.setattr(rounds_mod, "_fine_tune", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        rounds_mod.iterate(cfg, first, tmp_path / "rm", tmp_path / "work", lambda _: None)
    assert not (tmp_path / "rm").exists()  # no half-built reward model
    work = tmp_path / "work"
    made = {p: p.stat().st_mtime_ns for p in work.rglob("*.jsonl")}
    round1 = (work / "round-1" / "rm" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(rounds_mod, "_fine_tune", real)
    runs_before = len(fake_runs)
    rounds_mod.iterate(cfg, first, tmp_path / "rm", work, lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in made} == made  # no pair sampled again
    assert (work / "round-1" / "rm" / "model.safetensors").stat().st_mtime_ns == round1
    assert (tmp_path / "rm" / "rounds.json").is_file()
    # the fake stands for asyncrl run, which skips a finished run itself (summary.json)
    assert len(fake_runs) == runs_before + 2
    rounds_mod.iterate(cfg, first, tmp_path / "rm", work, lambda _: None)  # built: nothing
    assert len(fake_runs) == runs_before + 2


def test_rounds_are_for_the_builtin_raters_and_a_users_file_trains_alone(tmp_path, capsys):
    """configs/rlhf.yaml has rm.rounds=2; `train-rm configs/rlhf.yaml rm.data=FILE` trains on
    the file (nobody can label new samples for it), saying so."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2}"}) + "\n" for i in range(20)))
    policy = build_tiny_model(tmp_path / "policy")
    assert main(["train-rm", "configs/rlhf.yaml", f"model.path={policy}", "rm.base=",
                 f"rm.data={data}", "rm.steps=2", "rm.eval_interval=2",
                 f"rm.out={tmp_path / 'o'}"]) == 0
    out = capsys.readouterr().out
    assert "rm.rounds=2 is for the builtin preferences" in out
    assert (tmp_path / "o" / "config.json").is_file()
    assert not (tmp_path / "o.rounds").exists() and not (tmp_path / "o" / "rounds.json").exists()
    for bad in ("rm.rounds=-1", "rm.rounds=21", "rm.round_pairs=1", "rm.round_steps=0",
                "rm.round_lr=0"):
        with pytest.raises(Exception, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("configs/rlhf.yaml", [bad])


def test_a_second_builder_waits_for_the_first_and_takes_its_model(tmp_path, fake_runs):
    """Two runs started at once on a fresh machine would run two RL runs in one run
    directory: the second waits on WORK/.lock and then finds the model built."""
    import fcntl
    import threading

    cfg, first = _small(tmp_path, rounds=1)
    work = tmp_path / "work"
    work.mkdir()
    lines, done = [], []
    with (work / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first builder
        t = threading.Thread(target=lambda: done.append(
            rounds_mod.iterate(cfg, first, tmp_path / "rm", work, lines.append)))
        t.start()
        t.join(timeout=3)
        assert t.is_alive() and not done and not fake_runs
        assert any("another process is building" in line for line in lines), lines
        (tmp_path / "rm").mkdir()
        (tmp_path / "rm" / "config.json").write_text("{}")  # what the first one built
    t.join(timeout=60)
    assert done == [tmp_path / "rm"] and not fake_runs  # it built nothing itself
