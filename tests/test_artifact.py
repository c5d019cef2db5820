"""The GGUF artifact: convert writes OUT/model.gguf, byte-identical across runs; its
metadata; gguf-py's reader and gguf-dump read it; the validating reader turns every
corruption into the project's InputError (exit 2), including a hypothesis property test."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseforge.passes.pack import Pack
from sparseforge.toolchain import artifact_format as F
from sparseforge.toolchain import artifact_writer
from sparseforge.toolchain.artifact_build import build_metadata, layouts_for, tensor_stream
from sparseforge.toolchain.artifact_reader import Artifact
from sparseforge.toolchain.errors import InputError, PassError
from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.pipeline import convert_model

RECIPE = """
seed = 3
[[pass]]
name = "profile"
[pass.options]
calib = "{ids}"
seq_len = 16
num_sequences = 24
max_samples = 32
eps = 0.1
[[pass]]
name = "quantize"
[[pass]]
name = "reorder"
[[pass]]
name = "pack"
[pass.options]
target = "x86-64-v3"
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tiny_bert_tokenized, tmp_path_factory):
    """The tiny BERT (with tokenizer) converted twice without a cache: two output dirs."""
    d = tmp_path_factory.mktemp("artifact")
    np.save(d / "ids.npy", np.random.default_rng(0).integers(4, 120, size=(30, 16)))
    (d / "recipe.toml").write_text(RECIPE.format(ids=d / "ids.npy"))
    outs = []
    for i in range(2):
        convert_model(tiny_bert_tokenized, d / f"out{i}", recipe=d / "recipe.toml")
        outs.append(d / f"out{i}")
    return outs


def test_convert_writes_one_deterministic_artifact(converted, tiny_bert_tokenized):
    a, b = (out / "model.gguf" for out in converted)
    assert a.is_file() and sha256(a) == sha256(b)
    report = json.loads((converted[0] / "report.json").read_text())
    assert report["passes"][-1]["stats"]["sha256"] == sha256(a)
    art = Artifact.open(a)
    ir = ModelIR.load(converted[0] / "ir")
    m = art.metadata
    assert art.spec.to_dict() == ir.spec.to_dict() and m[F.K_TARGET] == "x86-64-v3"
    assert art.tokenizer_json == (tiny_bert_tokenized / "tokenizer.json").read_text()
    assert [p["name"] for p in m[F.K_RECIPE]["passes"]] == ["profile", "quantize", "reorder", "pack"]
    assert m[F.K_RECIPE]["seed"] == 3 and "tokens_per_s" not in json.dumps(m[F.K_PASS_LOG])
    assert m[F.K_SPARSITY] == [b.annotations["profile"]["sparsity"] for b in ir.blocks]
    assert m[F.K_PREDICTOR_MODES] == ["none", "none"] and m[F.K_PREDICTOR_RANKS] == [0, 0]
    for blk, lay in zip(ir.blocks, art.layouts):
        assert np.array_equal(art.neuron_order(blk.layer), ir.store.get(blk.annotations["reorder"]["order"]))
        assert lay.fmt == "q4_0" and art.bundles(blk.layer).shape == (128, lay.stride)
        assert np.array_equal(art.weight(blk.up_bias), ir.store.get_f32(blk.up_bias))
        # a float32 weight is the file's bytes, read-only, not a copy in memory
        assert art.format_of(blk.up_bias) == "f32" and np.shares_memory(art.weight(blk.up_bias), art.tensor(blk.up_bias))
        assert not art.weight(blk.up_bias).flags.writeable
    assert art.format_of("embeddings.word_embeddings.weight") == "q8_0"
    art.close()


def test_gguf_py_reader_and_gguf_dump(converted):
    from gguf import GGUFReader

    path = converted[0] / "model.gguf"
    r = GGUFReader(path)
    names = {t.name: t for t in r.tensors}
    assert names["blk.0.ffn_bundle"].tensor_type.name == "I8"
    assert names["encoder.layer.0.attention.self.query.weight"].tensor_type.name == "Q8_0"
    assert r.fields["general.alignment"].parts[-1][0] == 64
    dump = Path(sys.executable).with_name("gguf-dump")
    res = subprocess.run([str(dump), str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "sparseforge.metadata_sha256" in res.stdout and "blk.1.ffn_bundle" in res.stdout


# -- corruption ------------------------------------------------------------------------------
def _main(capsys, *args):
    from sparseforge.toolchain.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _assert_exit_2(capsys, path: Path, needle: str) -> None:
    code, _, err = _main(capsys, "inspect", str(path))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and needle in err, err


def _first_tensor_byte(path: Path) -> int:
    art = Artifact.open(path)
    pos = art.data_start + art.info("blk.0.ffn_bundle").offset + 5
    art.close()
    return pos


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the mapping's flags from /proc (Linux)")
def test_artifact_mapping_asks_for_huge_pages(converted, monkeypatch):
    """A small artifact's mapping carries MADV_HUGEPAGE (smaps flag ``hg``); one larger
    than half the RAM does not."""
    import mmap
    import os

    from sparseforge.toolchain import artifact_gguf

    def flags(gguf_file):
        start = np.frombuffer(gguf_file.buf, np.uint8).ctypes.data
        lines = Path("/proc/self/smaps").read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m and int(m[1], 16) <= start < int(m[2], 16):
                return next(ln for ln in lines[i + 1:] if ln.startswith("VmFlags:")).split()[1:]
        raise AssertionError("mapping not found in smaps")

    if not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/sys/kernel/mm/transparent_hugepage").exists():
        pytest.skip("no transparent huge pages here")
    path = converted[0] / "model.gguf"
    assert "hg" in flags(artifact_gguf.open_gguf(path))
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": path.stat().st_size // 4096,
                                                     "SC_PAGE_SIZE": 4096}[name])
    big = artifact_gguf.open_gguf(path)  # the RAM now counts as about the file's size
    assert "hg" not in flags(big)


def test_damaged_artifacts_exit_2(converted, tmp_path, capsys):
    good = (converted[0] / "model.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[: len(good) - 1000])
    _assert_exit_2(capsys, bad, "truncated")
    flipped = bytearray(good)
    flipped[_first_tensor_byte(converted[0] / "model.gguf")] ^= 0x40
    bad.write_bytes(bytes(flipped))
    _assert_exit_2(capsys, bad, "checksum mismatch in tensor blk.0.ffn_bundle")
    version = bytearray(good)
    version[4] = 2
    bad.write_bytes(bytes(version))
    _assert_exit_2(capsys, bad, "GGUF version 2 is not supported")
    bad.write_bytes(b"")
    _assert_exit_2(capsys, bad, "not a GGUF file")


def _rewrite(ir: ModelIR, path: Path, drop: str | None = None) -> None:
    layouts = layouts_for(ir, 64)
    formats = {}
    meta = [kv for kv in build_metadata(ir, layouts, formats, target="t", seed=0, pack_options={}, tokenizer=False)
            if kv.key != drop]
    artifact_writer.write_artifact(path, meta, tensor_stream(ir, layouts, formats))


def test_missing_key_and_wrong_format_version_exit_2(converted, tmp_path, capsys, monkeypatch):
    ir = ModelIR.load(converted[0] / "ir")
    _rewrite(ir, tmp_path / "ok.gguf")
    code, out, _ = _main(capsys, "inspect", str(tmp_path / "ok.gguf"))
    assert code == 0 and "all checks passed" in out
    _rewrite(ir, tmp_path / "nokey.gguf", drop=F.K_TARGET)
    _assert_exit_2(capsys, tmp_path / "nokey.gguf", f"missing metadata key {F.K_TARGET}")
    monkeypatch.setattr(artifact_writer, "FORMAT_VERSION", 99)
    _rewrite(ir, tmp_path / "v99.gguf")
    _assert_exit_2(capsys, tmp_path / "v99.gguf", "artifact format version 99 is not supported")


def test_an_activation_the_kernels_do_not_compute_is_refused(converted, tmp_path, capsys):
    """An edited IR's unknown activation: the pack pass refuses it, and an artifact that
    carries one anyway fails validation (exit 2) rather than the runtime (exit 1)."""
    ir = ModelIR.load(converted[0] / "ir")
    ir.blocks[1].activation = "bogus"
    with pytest.raises(PassError, match="pack: layer 1: unsupported activation 'bogus'"):
        Pack().requires(ir)
    _rewrite(ir, tmp_path / "bogus.gguf")
    _assert_exit_2(capsys, tmp_path / "bogus.gguf", "layer 1: unsupported activation 'bogus'")


@pytest.fixture(scope="module")
def artifact_bytes(converted) -> bytes:
    return (converted[0] / "model.gguf").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_raises_input_error(artifact_bytes, tmp_path_factory, data):
    """Every byte is covered (header, metadata digest, tensor table, zero padding, tensor
    checksums): one changed byte anywhere, or a truncation anywhere, is always an
    InputError, never another exception and never a successful read."""
    b = bytearray(artifact_bytes)
    if data.draw(st.booleans(), label="truncate"):
        b = b[: data.draw(st.integers(0, len(b) - 1), label="length")]
    else:
        pos = data.draw(st.integers(0, len(b) - 1), label="offset")
        b[pos] ^= data.draw(st.integers(1, 255), label="xor")
    path = tmp_path_factory.mktemp("corrupt") / "c.gguf"
    path.write_bytes(bytes(b))
    with pytest.raises(InputError) as exc:
        Artifact.open(path).close()
    assert str(path) in str(exc.value)


# -- commands --------------------------------------------------------------------------------
def test_quantize_pack_and_inspect_commands(converted, tiny_model, tmp_path, capsys):
    code, out, err = _main(capsys, "quantize", str(tiny_model("llama")[0]), "-o", str(tmp_path / "q"),
                           "--ffn", "Q8_0", "--no-cache")
    assert code == 0, err
    assert "q8_0" in out and "SQNR" in out and (tmp_path / "q" / "quantize.json").is_file()
    code, out, err = _main(capsys, "pack", str(tmp_path / "q" / "ir"), "-o", str(tmp_path / "p"), "--no-cache",
                           "--target", "neoverse-n1")
    assert code == 0, err
    assert "quantize " not in out and "all checks passed" in out and "q8_0" in out
    code, out, _ = _main(capsys, "inspect", str(tmp_path / "p" / "model.gguf"), "--json")
    d = json.loads(out)
    assert code == 0 and d["target"] == "neoverse-n1" and d["passes"] == ["quantize", "pack"]
    assert [row["format"] for row in d["layers"]] == ["q8_0", "q8_0"]
    code, _, err = _main(capsys, "pack", str(tmp_path / "q" / "ir"), "-o", str(tmp_path / "p128"), "--no-cache",
                         "--bundle-align", "128")
    assert code == 0, err
    assert all(lay.stride % 128 == 0 for lay in Artifact.open(tmp_path / "p128" / "model.gguf").layouts)
    code, _, err = _main(capsys, "pack", str(tmp_path / "q" / "ir"), "-o", str(tmp_path / "p3"), "--bundle-align", "3")
    assert code == 2 and "bundle_align must be a power of two" in err and not (tmp_path / "p3").exists()
    code, out, _ = _main(capsys, "inspect", str(converted[0] / "model.gguf"))
    assert code == 0 and "hot-first" in out and "tokenizer.json" in out
    code, _, err = _main(capsys, "inspect", str(tmp_path / "missing.gguf"))
    assert code == 2 and "file not found" in err


def test_predictors_and_modes_in_the_artifact(converted, tmp_path):
    from sparseforge.toolchain.ir import ANNOTATION_PREFIX

    ir = ModelIR.load(converted[0] / "ir").evolve()
    rng = np.random.default_rng(0)
    names = {w: f"{ANNOTATION_PREFIX}predictor.1.{w}" for w in ("w1", "w2")}
    ir.store.set(names["w1"], rng.standard_normal((4, 64)).astype(np.float32))
    ir.store.set(names["w2"], rng.standard_normal((128, 4)).astype(np.float32))
    ir.blocks[1].annotations["predictor"] = {"mode": "predictor", "rank": 4, "threshold": 0.25, "tensors": names}
    ir.blocks[0].annotations["predictor"] = {"mode": "dense", "rank": 0, "threshold": None, "tensors": {}}
    _rewrite(ir, tmp_path / "p.gguf")
    art = Artifact.open(tmp_path / "p.gguf")
    m = art.metadata
    assert m[F.K_PREDICTOR_MODES] == ["dense", "predictor"] and m[F.K_PREDICTOR_RANKS] == [0, 4]
    assert np.isnan(m[F.K_PREDICTOR_THRESHOLDS][0]) and m[F.K_PREDICTOR_THRESHOLDS][1] == 0.25
    assert np.array_equal(art.tensor("blk.1.predictor.w2"), ir.store.get(names["w2"]))
    assert "blk.0.predictor.w1" not in art.tensor_names
    art.close()


def _mapped_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_release_drops_pages_from_the_resident_set(tmp_path):
    """GGUFFile.release (what the runtime calls for weights it copied): the range leaves
    the map's resident set, and reading it again gives the same bytes."""
    import mmap

    from sparseforge.toolchain.artifact_gguf import GGUFFile

    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    g = GGUFFile(path, buf, 3)
    assert int(g.bytes_at(0, data.size).sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # all resident
    before = _mapped_rss_kb(path)
    g.release(8192 + 100, 2 << 20)
    after = _mapped_rss_kb(path)
    assert before >= 4096 - 8 and before - after >= 2048 - 8, (before, after)
    np.testing.assert_array_equal(g.bytes_at(0, data.size), data)
    del g
    buf.close()
