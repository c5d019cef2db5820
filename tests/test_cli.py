"""The command line: exit codes, one-line errors naming the file, atomic outputs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

SPARSEFORGE = str(Path(sys.executable).with_name("sparseforge"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(Path(cwd or ".") / ".cache")}
    return subprocess.run([SPARSEFORGE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def assert_input_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_version_and_help():
    res = run("--version")
    assert res.returncode == 0 and "sparseforge, version" in res.stdout
    res = run("convert", "--help")
    assert res.returncode == 0
    for opt in ("--recipe", "--output", "--set", "--cache-dir", "--no-cache", "--dump-after", "--dump-dir", "--json"):
        assert opt in res.stdout


RECIPE = """
[[pass]]
name = "weight-stats"
[[pass]]
name = "profile"
[pass.options]
calib = "ids.npy"
seq_len = 16
num_sequences = 8
"""


def test_convert_inspect_and_cache(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 128, size=(12, 16)))
    (tmp_path / "r.toml").write_text(RECIPE)
    res = run("convert", str(ckpt), "-r", "r.toml", "-o", "out", "--dump-after", "weight-stats", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "weight-stats" in res.stdout and " ran " in res.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["weight-stats", "profile"]
    assert (tmp_path / "out.dumps" / "00-weight-stats" / "manifest.json").is_file()
    res = run("convert", str(ckpt), "-r", "r.toml", "-o", "out", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count(" cached ") == 2, res.stdout
    res = run("convert", str(ckpt), "-r", "r.toml", "--set", "profile.num_sequences=6", "-o", "out", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count(" cached ") == 1 and res.stdout.count(" ran ") == 1
    res = run("inspect", "out", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["spec"]["architecture"] == "LlamaForCausalLM" and d["passes"] == ["weight-stats", "profile"]
    res = run("inspect", str(ckpt))
    assert res.returncode == 0 and "LlamaForCausalLM" in res.stdout


def test_import_then_single_pass(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    assert run("import", str(ckpt), "-o", "ir", cwd=tmp_path).returncode == 0
    res = run("pass", "weight-stats", "ir", "-o", "ir2", "--set", "dead_eps=0.5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "ir2" / "manifest.json").read_text())
    assert manifest["pass_log"][0]["options"] == {"dead_eps": 0.5}
    assert_input_error(run("pass", "no-such-pass", "ir", "-o", "x", cwd=tmp_path), "unknown pass 'no-such-pass'")


def test_missing_path():
    assert_input_error(run("convert", "/no/such/model", "-o", "/tmp/x-never"), "/no/such/model", "no such file")
    assert not Path("/tmp/x-never").exists()


def test_unknown_architecture_and_corrupt_config(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    m = _copy(ckpt, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["T5Model"]}))
    assert_input_error(run("inspect", str(m)), "config.json", "unknown architecture 'T5Model'")
    (m / "config.json").write_text('{"architectures": ["BertModel"], ')
    assert_input_error(run("inspect", str(m)), "config.json", "corrupt config.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_safetensors(tiny_model, tmp_path, damage):
    ckpt, _ = tiny_model("bert")
    m = _copy(ckpt, tmp_path / "m")
    st = m / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    res = run("convert", str(m), "-o", str(tmp_path / "out"))
    assert_input_error(res, str(st), "truncated" if damage == "truncate" else "header")
    assert not (tmp_path / "out").exists()


def test_inspect_catches_a_changed_byte_in_an_ir(tiny_model, tmp_path):
    from sparseforge.toolchain.frontends.hf import load_hf_checkpoint

    ir = load_hf_checkpoint(tiny_model("bert")[0])
    ir.store.set("sparseforge.extra", np.arange(64, dtype=np.float32))
    ir.save(tmp_path / "ir")
    assert run("inspect", str(tmp_path / "ir")).returncode == 0
    st = tmp_path / "ir" / "tensors.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # a tensor's last byte: the file still parses
    st.write_bytes(bytes(data))
    assert_input_error(run("inspect", str(tmp_path / "ir")), str(st), "changed since the IR")


def test_corrupt_and_truncated_onnx(tiny_onnx, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    assert_input_error(run("inspect", str(bad)), str(bad))
    src = tiny_onnx("bert").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(src[: len(src) * 2 // 3])
    assert_input_error(run("inspect", str(cut)), str(cut))


def test_onnx_without_ffn(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), path)
    assert_input_error(run("convert", str(path), "-o", str(tmp_path / "o")), str(path), "feed-forward")


def test_bad_recipe_and_options(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    r = tmp_path / "r.toml"
    r.write_text("[[pass]]\nname = 'weight-stats'\n[pass.options]\ndead_eps = 'x'\n")
    assert_input_error(run("convert", str(ckpt), "-r", str(r), "-o", str(tmp_path / "o")), str(r), "dead_eps")
    assert_input_error(run("convert", str(ckpt), "-r", "missing.toml", "-o", str(tmp_path / "o")), "missing.toml")
    assert_input_error(run("convert", str(ckpt), "--set", "weight-stats", "-o", str(tmp_path / "o")),
                       "PASS.OPTION=VALUE")
    assert not (tmp_path / "o").exists()


def test_out_of_range_options_name_the_recipe_and_the_option(tiny_model, tiny_bert_tokenized, tmp_path):
    ckpt, _ = tiny_model("bert")
    r = tmp_path / "r.toml"
    r.write_text("[[pass]]\nname = 'profile'\n[[pass]]\nname = 'relufy'\n[pass.options]\nlocal_steps = -3\n")
    assert_input_error(run("convert", str(ckpt), "-r", str(r), "-o", str(tmp_path / "o")), str(r),
                       "relufy: local_steps = -3 is out of range (must be >= 0)")
    assert_input_error(run("profile", str(ckpt), "--seq-len", "0", "-o", str(tmp_path / "o")), "seq_len = 0")
    # an option that does not fit the model fails before the passes ahead of it run
    res = run("relufy", str(tiny_bert_tokenized), "--seq-len", "16", "--layer-sparsity", "99=0.5",
              "-o", str(tmp_path / "o"))
    assert_input_error(res, "layer_sparsity names layers ['99']")
    assert "profile" not in res.stdout
    # text calibration without the model's tokenizer: the model named, before any pass
    assert_input_error(run("relufy", str(ckpt), "--seq-len", "16", "-o", str(tmp_path / "o")), str(ckpt),
                       "the model has no tokenizer.json")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a directory no one can create files in (sysfs)")
def test_unwritable_output_fails_before_the_run(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    out = "/sys/sparseforge-test-output"  # sysfs refuses new files, root's too
    res = run("convert", str(ckpt), "-o", out, cwd=tmp_path)
    assert_input_error(res, out, "cannot be written")
    assert "weight-stats" not in res.stdout  # no pass ran
    res = run("convert", str(ckpt), "-o", str(tmp_path / "o"), "--cache-dir", "/sys/sparseforge-test-cache")
    assert_input_error(res, "/sys/sparseforge-test-cache", "cannot be written")
    assert not (tmp_path / "o").exists()


def test_config_and_tokenizer_values_that_do_not_parse(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    m = _copy(ckpt, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    for key, value, kind in (("num_hidden_layers", True, "int"), ("hidden_size", 384.5, "int"),
                             ("layer_norm_eps", False, "float")):
        (m / "config.json").write_text(json.dumps({**cfg, key: value}))
        assert_input_error(run("inspect", str(m)), "config.json", f"{key!r} = {json.dumps(value)} is not a valid {kind}")
    (m / "config.json").write_text(json.dumps(cfg))
    (m / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert_input_error(run("import", str(m), "-o", str(tmp_path / "ir")), str(m / "tokenizer.json"),
                       "not a readable tokenizer.json")
    assert not (tmp_path / "ir").exists()


def test_text_that_is_not_utf8():
    res = subprocess.run([SPARSEFORGE, "run", "model.gguf", "--embed", b"ok \xc3("], capture_output=True, text=True,
                         timeout=120)
    assert_input_error(res, "--embed", "not valid UTF-8")


def test_a_swallowed_ctrl_c_still_ends_the_run_as_interrupted(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt that a ctypes callback swallowed while Numba compiled: the
    handler saw the signal, so the CLI reports the run interrupted (130) whether the
    command then failed with another error or finished."""
    import signal

    from sparseforge.toolchain import cli, interrupt

    old = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(interrupt, "_RECEIVED", [signal.SIGINT])
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))  # main() wraps it
    try:
        for argv in (["inspect", str(tmp_path / "nothing")], ["targets"]):
            with pytest.raises(SystemExit) as exc:
                cli.main(argv)
            assert exc.value.code == 130, argv
            assert capsys.readouterr().err.strip().endswith("interrupted")
        # what the callback swallowed is not printed as "Exception ignored in ..."; other errors are
        from types import SimpleNamespace

        errors = [interrupt.Interrupted(signal.SIGINT), RuntimeError("boom")]
        for exc in errors:
            sys.unraisablehook(SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                               err_msg="Exception ignored in", object=None))
        assert seen == errors[1:]
    finally:
        signal.signal(signal.SIGINT, old)


def test_debug_shows_traceback(tmp_path):
    res = run("--debug", "inspect", str(tmp_path / "nothing"))
    assert res.returncode != 0 and "Traceback" in res.stderr


def _reference_skeleton(markdown: str) -> list[str]:
    """Headings, each command option's flags and each pass option's row (name and default):
    what docs/cli.md must hold whatever click version formats the help text."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("#"):
            out.append(line)
        elif line.startswith("| `"):
            flags = re.findall(r"(?<![\w-])--?[\w-]+", line[3:].split("` |", 1)[0])
            out.append(" ".join(flags) if flags else line)
    return out


def test_cli_reference_is_current():
    from sparseforge.toolchain.cli_docs import render

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    want = render()
    assert "| `--seq-lens TEXT` |" in want and "| `min_cosine` | unset |" in want
    assert _reference_skeleton(doc) == _reference_skeleton(want), \
        "docs/cli.md is stale: python -m sparseforge.toolchain.cli_docs docs/cli.md"
