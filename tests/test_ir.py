"""Safetensors I/O, the lazy tensor store and the IR's save/load round trip."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.safetensors_io import SafetensorsFile, write_safetensors


def _tensors(rng):
    return {
        "b.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "a.half": rng.standard_normal((3,)).astype(np.float16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "e.empty": np.zeros((0, 4), np.float32),
    }


def test_writer_output_is_read_by_the_safetensors_library(tmp_path):
    t = _tensors(np.random.default_rng(0))
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {k: v for k, v in t.items() if k != "d.bf16"}, metadata={"format": "np"})
    ref = safetensors.numpy.load_file(path)
    assert sorted(ref) == sorted(k for k in t if k != "d.bf16")
    for k, v in ref.items():
        assert v.dtype == t[k].dtype and np.array_equal(v, t[k])


def test_reader_matches_safetensors_library_and_is_memory_mapped(tmp_path):
    t = _tensors(np.random.default_rng(1))
    plain = {k: v for k, v in t.items() if k != "d.bf16"}
    path = tmp_path / "y.safetensors"
    safetensors.numpy.save_file(plain, path)
    f = SafetensorsFile(path)
    assert f.keys() == sorted(plain)
    for k, v in plain.items():
        got = f.get(k)
        assert got.shape == v.shape and got.dtype == v.dtype and np.array_equal(got, v)
    assert isinstance(f.get("b.weight"), np.memmap)


def test_overlapping_tensor_data_is_refused_as_the_safetensors_library_does(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}  # b's first half is a's second
    raw = json.dumps(header).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(24))
    with pytest.raises(Exception, match="invalid offset"):  # the library's own check
        safetensors.numpy.load_file(path)
    with pytest.raises(InputError, match="'a' and 'b' overlap"):
        SafetensorsFile(path)
    header["b"]["data_offsets"] = [16, 32]  # adjacent: fine
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    assert SafetensorsFile(path).keys() == ["a", "b"]


def test_bf16_round_trip_and_deterministic_bytes(tmp_path):
    t = _tensors(np.random.default_rng(2))
    write_safetensors(tmp_path / "1.safetensors", t)
    write_safetensors(tmp_path / "2.safetensors", dict(reversed(list(t.items()))))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    got = SafetensorsFile(tmp_path / "1.safetensors").get("d.bf16")
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(got.astype(np.float32), t["d.bf16"].astype(np.float32))


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncated_file_is_an_input_error(tmp_path, cut):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": np.ones((16, 16), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(InputError) as exc:
        SafetensorsFile(path)
    assert str(path) in str(exc.value) and "truncated" in str(exc.value)


def test_corrupt_header_is_an_input_error(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64)
    with pytest.raises(InputError, match="corrupt safetensors header"):
        SafetensorsFile(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(InputError, match="offsets do not match shape"):
        SafetensorsFile(path)


def test_ir_round_trip_keeps_spec_blocks_tensors_and_hash(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    ir = load_hf_checkpoint(ckpt)
    ir.blocks[1].annotations["note"] = {"x": [1, 2, 3]}
    extra = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    ir.store.set("sparseforge.test.extra", extra)
    h = ir.content_hash()
    ir.save(tmp_path / "ir")
    assert ir.content_hash() != ""  # overlays now reference the saved file
    back = ModelIR.load(tmp_path / "ir")
    assert back.spec == ir.spec
    assert [b.to_dict() for b in back.blocks] == [b.to_dict() for b in ir.blocks]
    assert back.store.names() == ir.store.names()
    for name in back.store.names():
        assert np.array_equal(back.store.get(name), ir.store.get(name))
    assert np.array_equal(back.store.get("sparseforge.test.extra"), extra)
    # unchanged tensors are references to the checkpoint, not copies
    assert back.store.ref(ir.blocks[0].up).file == str(ckpt / "model.safetensors")
    # the hash depends on content only: same before and after the save
    assert back.content_hash() == ModelIR.load(tmp_path / "ir").content_hash()
    ir2 = load_hf_checkpoint(ckpt)
    ir2.blocks[1].annotations["note"] = {"x": [1, 2, 3]}
    ir2.store.set("sparseforge.test.extra", extra + 1)
    assert ir2.content_hash() != h


def test_ir_load_errors(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    ir = load_hf_checkpoint(ckpt)
    ir.store.set("sparseforge.extra", np.ones(3, np.float32))
    ir.save(tmp_path / "ir")
    manifest = tmp_path / "ir" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["version"] = 99
    manifest.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="version 99"):
        ModelIR.load(tmp_path / "ir")
    doc["version"] = 1
    manifest.write_text(json.dumps(doc))
    (tmp_path / "ir" / "tensors.safetensors").unlink()
    with pytest.raises(InputError, match="does not exist"):
        ModelIR.load(tmp_path / "ir")
    manifest.write_text("[]")  # valid JSON, not a manifest
    with pytest.raises(InputError, match="not a sparseforge IR manifest"):
        ModelIR.load(tmp_path / "ir")
    manifest.write_text("{")
    with pytest.raises(InputError, match="corrupt IR manifest"):
        ModelIR.load(tmp_path / "ir")
    with pytest.raises(InputError, match="not a sparseforge IR"):
        ModelIR.load(tmp_path)


def test_ir_load_refuses_an_edited_manifest(tiny_model, tmp_path):
    ir = load_hf_checkpoint(tiny_model("bert")[0])
    ir.save(tmp_path / "ir")
    manifest = tmp_path / "ir" / "manifest.json"
    good = json.loads(manifest.read_text())
    edits = {
        "no checksum for": lambda d: d.update(checksums={}),  # would switch the integrity check off
        "names the tensor 'nope.weight'": lambda d: d["blocks"][0].update(up="nope.weight"),
        "'hidden_size' = \"big\" is not of type int": lambda d: d["spec"].update(hidden_size="big"),
        "'causal' = 1 is not of type bool": lambda d: d["spec"].update(causal=1),
        'RoPE scaling {"type": "ntk"} is not one of the supported types':
            lambda d: d["spec"].update(rope_scaling={"type": "ntk"}),
        "'yarn': truncate = 1 is not true or false": lambda d: d["spec"].update(rope_scaling={
            "type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
            "truncate": 1, "attention_factor": 1.1}),
        "'llama3': original_max_position_embeddings = 8.5 is not a positive integer": lambda d: d["spec"].update(
            rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 8.5}),
        "sliding_window 0 is not a positive number of positions": lambda d: d["spec"].update(sliding_window=0),
        "'sliding_window' = 4.5 is not of type int": lambda d: d["spec"].update(sliding_window=4.5),
        "rotary_dim 7 is not an even number of dimensions below head_dim 16": lambda d: d["spec"].update(rotary_dim=7),
        "rotary_dim 16 is not an even number": lambda d: d["spec"].update(rotary_dim=16),
        "logits_scaling 0 is not a positive number": lambda d: d["spec"].update(logits_scaling=0),
        "per layer with a sliding_window": lambda d: d["spec"].update(layer_types=["full_attention"] * 2),
        "'longrope': short_factor has 2 values, not one per rotary frequency (4)": lambda d: d["spec"].update(
            rotary_dim=8, rope_scaling={"type": "longrope", "short_factor": [1, 1], "long_factor": [2, 2, 2, 2],
                                        "original_max_position_embeddings": 16, "attention_factor": 1.2}),
        "(rows (5, 2) of 'pooler.dense.weight': a non-empty range":
            lambda d: d["tensors"]["pooler.dense.weight"].update(rows=[5, 2]),
    }
    for message, edit in edits.items():
        doc = json.loads(json.dumps(good))
        edit(doc)
        manifest.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=re.escape(message)):
            ModelIR.load(tmp_path / "ir")
    manifest.write_text(json.dumps(good))
    assert ModelIR.load(tmp_path / "ir").spec == ir.spec


def _flip_last_byte(path) -> None:
    """Flip the file's last byte (tensor data, not the header) and move its mtime on: the
    in-process digest memo is keyed by (path, size, mtime), and a rewrite within the same
    clock tick keeps the mtime (a new process, as on the command line, hashes anew)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_ir_checksums_cover_every_file_it_reads_and_catch_a_changed_byte(tiny_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model("bert")[0], ckpt)
    ir = load_hf_checkpoint(ckpt)
    ir.store.set("sparseforge.extra", np.arange(64, dtype=np.float32))
    ir.save(tmp_path / "ir")
    recorded = json.loads((tmp_path / "ir" / "manifest.json").read_text())["checksums"]
    expected = {"tensors.safetensors", str(ckpt / "model.safetensors")} | (
        {"tokenizer.json"} if ir.tokenizer else set())
    assert set(recorded) == expected
    for rel, digest in recorded.items():  # against hashlib over the bytes on disk
        assert digest == hashlib.sha256(((tmp_path / "ir") / rel).read_bytes()).hexdigest()
    for damaged in (tmp_path / "ir" / "tensors.safetensors", ckpt / "model.safetensors"):
        good = damaged.read_bytes()
        _flip_last_byte(damaged)
        with pytest.raises(InputError, match="changed since the IR") as exc:
            ModelIR.load(tmp_path / "ir")
        assert str(damaged) in str(exc.value)
        ModelIR.load(tmp_path / "ir", verify=False)  # the bytes still parse: only the digest tells
        damaged.write_bytes(good)
    assert np.array_equal(ModelIR.load(tmp_path / "ir").store.get("sparseforge.extra"), np.arange(64))
