"""Interrupted conversions: Ctrl-C / SIGTERM mid-pass leave no output and no half cache
entry, keep every finished pass, and the same command resumes at the first unfinished
pass with the same artifact as an uninterrupted run.

The runs pause at a known place (``toolchain.interrupt.hold``, driven by
``SPARSEFORGE_HOLD``) and are signalled there, so nothing depends on timing.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.pass_manager import PassManager

SPARSEFORGE = str(Path(sys.executable).with_name("sparseforge"))

#: a small but complete conversion of the tiny Llama: profile, predictors, quantize, reorder, pack
RECIPE = """
[[pass]]
name = "profile"
[pass.options]
calib = "ids.npy"
seq_len = 16
num_sequences = 20
heldout_fraction = 0.2
[[pass]]
name = "predictors"
[pass.options]
ranks = [8]
max_epochs = 2
patience = 1
budget = 1.0
eval_sequences = -1
[[pass]]
name = "quantize"
[[pass]]
name = "reorder"
[[pass]]
name = "pack"
"""
PASSES = ["profile", "predictors", "quantize", "reorder", "pack"]


def prepare(directory: Path) -> Path:
    """Write the recipe ``r.toml`` and its calibration ids into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "ids.npy", np.random.default_rng(0).integers(0, 128, size=(24, 16)))
    (directory / "r.toml").write_text(RECIPE)
    return directory / "r.toml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_REFERENCE: dict[str, tuple[Path, str]] = {}  # shared with test_executors, which imports this fixture


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """(checkpoint, sha256 of the artifact of an uninterrupted run without cache)."""
    if "llama" not in _REFERENCE:
        _REFERENCE["llama"] = _reference_artifact(tiny_model, tmp_path_factory)
    return _REFERENCE["llama"]


def _reference_artifact(tiny_model, tmp_path_factory) -> tuple[Path, str]:
    from sparseforge.toolchain.pipeline import convert_model

    ckpt, _ = tiny_model("llama")
    d = tmp_path_factory.mktemp("reference")
    recipe = prepare(d)
    cwd = os.getcwd()
    os.chdir(d)  # the recipe names its calibration file relative to the working directory
    try:
        convert_model(ckpt, d / "out", recipe=recipe, workers=1)
    finally:
        os.chdir(cwd)
    return ckpt, sha256(d / "out" / "model.gguf")


def _env(cwd: Path, hold: str | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(cwd / "cache"), "TMPDIR": str(cwd / "tmp"), **extra}
    (cwd / "tmp").mkdir(exist_ok=True)
    if hold:
        env.update(SPARSEFORGE_HOLD=hold, SPARSEFORGE_HOLD_FILE=str(cwd / "held"))
    return env


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as in a terminal. A shell that
    runs the test suite in the background (``pytest &``) starts it with SIGINT ignored,
    the child would inherit that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_signal(args: list[str], cwd: Path, hold: str, sig: int, *, group: bool = False,
                     **extra: str) -> subprocess.CompletedProcess:
    """Run ``sparseforge ARGS`` until it reaches ``hold``, send ``sig`` (to the whole process
    group with ``group``, as a terminal's Ctrl-C does), and wait for it to end."""
    proc = subprocess.Popen([SPARSEFORGE, *args], cwd=cwd, env=_env(cwd, hold, **extra), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 180
    while not (cwd / "held").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run never reached {hold} (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not stop after the signal")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    res.pgid = proc.pid  # its own session: the group id is its pid
    return res


def cache_entries(cache: Path) -> dict[str, str]:
    """{pass name: key} of the complete entries; fails on any incomplete one."""
    found = {}
    for entry in cache.glob("??/*"):
        assert not entry.name.startswith("."), f"temporary entry left behind: {entry}"
        record = entry / "record.json"
        assert record.is_file() and (entry / "ir" / "manifest.json").is_file(), f"half entry: {entry}"
        found[json.loads(record.read_text())["name"]] = entry.name
    return found


def assert_clean_interrupt(res: subprocess.CompletedProcess, code: int, cwd: Path) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.strip().splitlines()[-1:] == ["interrupted"], res.stderr
    assert "Traceback" not in res.stderr
    assert not (cwd / "out").exists()
    assert not [p for p in cwd.iterdir() if p.name.startswith(".out.")], "temporary output left behind"
    assert not list((cwd / "tmp").rglob("*.gguf")), "a partial artifact was left in the scratch directory"
    ours = [p.name for p in (cwd / "tmp").iterdir() if p.name.startswith("sparseforge-")]
    assert not ours, f"scratch directories left behind: {ours}"


def test_sigterm_in_pack_then_resume(reference, tmp_path):
    """SIGTERM while pack holds its freshly written .gguf (not yet cached): exit 143, no
    artifact anywhere, the four finished passes cached; the rerun loads them from the
    cache, runs pack and writes the reference artifact byte for byte."""
    ckpt, expected = reference
    prepare(tmp_path)
    args = ["convert", str(ckpt), "-r", "r.toml", "-o", "out", "--workers", "1"]
    res = start_and_signal(args, tmp_path, "pass:pack", signal.SIGTERM)
    assert_clean_interrupt(res, 143, tmp_path)
    assert sorted(cache_entries(tmp_path / "cache")) == sorted(PASSES[:-1])
    assert not list((tmp_path / "cache").rglob("*.gguf"))

    res = subprocess.run([SPARSEFORGE, *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    status = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.split()[:1] and
              line.split()[0] in PASSES}
    assert status == {**{p: "cached" for p in PASSES[:-1]}, "pack": "ran"}, res.stdout
    assert sha256(tmp_path / "out" / "model.gguf") == expected
    assert sorted(cache_entries(tmp_path / "cache")) == sorted(PASSES)


def test_sigint_while_workers_train(reference, tmp_path):
    """SIGINT while two worker processes train predictors, sent to the main process only
    (stricter than a terminal's Ctrl-C, which reaches the workers too): exit 130, one line
    on stderr, the workers are stopped rather than waited for, only profile is cached."""
    ckpt, _ = reference
    prepare(tmp_path)
    args = ["convert", str(ckpt), "-r", "r.toml", "-o", "out", "--workers", "2"]
    res = start_and_signal(args, tmp_path, "task", signal.SIGINT)
    assert_clean_interrupt(res, 130, tmp_path)
    assert list(cache_entries(tmp_path / "cache")) == ["profile"]
    deadline = time.monotonic() + 10
    while True:  # the process group empties: no orphaned worker
        try:
            os.killpg(res.pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "worker processes outlived the interrupted run"
        time.sleep(0.1)


def test_store_is_all_or_nothing(tiny_model, tmp_path, monkeypatch):
    """An interrupt while a cache entry is written leaves no entry (not a half one), and
    the next run computes the pass again."""
    from sparseforge.passes.weight_stats import WeightStats

    from sparseforge.toolchain.frontends import load_model

    model = load_model(tiny_model("llama")[0])
    real_save = ModelIR.save

    def save_then_interrupt(self, directory):
        real_save(self, directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelIR, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        PassManager([WeightStats()], cache_dir=tmp_path / "cache").run(model)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "a partial cache entry was left"
    monkeypatch.setattr(ModelIR, "save", real_save)
    (record,) = PassManager([WeightStats()], cache_dir=tmp_path / "cache").run(model).records
    assert record.status == "ran"
    (record,) = PassManager([WeightStats()], cache_dir=tmp_path / "cache").run(model).records
    assert record.status == "cached"
    assert list(cache_entries(tmp_path / "cache")) == ["weight-stats"]
