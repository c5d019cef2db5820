"""Pass contract, pass manager (instruments, cache, dumps) and recipes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from sparseforge.toolchain.errors import InputError, PassError
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.pass_base import Pass, PassResult, register_pass
from sparseforge.toolchain.pass_manager import PassManager
from sparseforge.toolchain.pipeline import convert_model
from sparseforge.toolchain.recipe import load_recipe, parse_recipe

RUNS: list[str] = []


@dataclass(frozen=True)
class ScaleOptions:
    factor: float = 2.0
    layer: int = 0


@register_pass
class ScaleUp(Pass):
    """Test pass: multiplies one layer's up weight by ``factor``."""

    name = "test-scale-up"
    Options = ScaleOptions

    def requires(self, ir):
        if self.options.layer >= len(ir.blocks):
            raise PassError(f"layer {self.options.layer} does not exist")

    def run(self, ir, ctx):
        RUNS.append(f"{self.name}:{self.options.factor}")
        out = ir.evolve()
        b = out.blocks[self.options.layer]
        out.store.set(b.up, out.store.get_f32(b.up) * self.options.factor)
        b.annotations["scaled"] = self.options.factor
        return PassResult(out, {"factor": self.options.factor})


@register_pass
class Count(Pass):
    """Test pass: counts FFN neurons; changes only annotations."""

    name = "test-count"

    def run(self, ir, ctx):
        RUNS.append(self.name)
        out = ir.evolve()
        total = 0
        for b in out.blocks:
            b.annotations["count"] = int(out.store.shape(b.up)[0])
            total += b.annotations["count"]
        return PassResult(out, {"neurons": total})


RECIPE = """
name = "t"
[[pass]]
name = "test-count"
[[pass]]
name = "test-scale-up"
[pass.options]
factor = {factor}
[[pass]]
name = "weight-stats"
"""


def _recipe(tmp_path, factor=2.0):
    p = tmp_path / f"r{factor}.toml"
    p.write_text(RECIPE.format(factor=factor))
    return load_recipe(p)


def test_passes_run_then_come_from_the_cache(tiny_model, tmp_path):
    ckpt, _ = tiny_model("llama")
    cache = tmp_path / "cache"
    RUNS.clear()
    first = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    assert [r.status for r in first.records] == ["ran", "ran", "ran"]
    assert RUNS == ["test-count", "test-scale-up:2.0"]
    for r in first.records:
        assert r.wall_s > 0 and r.peak_rss_mb > 0
    ref = load_hf_checkpoint(ckpt)
    up = ref.blocks[0].up
    assert np.array_equal(first.ir.store.get(up), ref.store.get_f32(up) * 2.0)

    RUNS.clear()
    second = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    assert [r.status for r in second.records] == ["cached"] * 3
    assert RUNS == []
    assert np.array_equal(second.ir.store.get(up), first.ir.store.get(up))
    assert second.ir.blocks[0].annotations == first.ir.blocks[0].annotations
    assert [p["pass"] for p in second.ir.pass_log] == ["test-count", "test-scale-up", "weight-stats"]

    RUNS.clear()
    third = PassManager(_recipe(tmp_path, 3.0).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    assert [r.status for r in third.records] == ["cached", "ran", "ran"]
    assert RUNS == ["test-scale-up:3.0"]
    assert np.array_equal(third.ir.store.get(up), ref.store.get_f32(up) * 3.0)


def test_changed_model_reruns_everything(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    cache = tmp_path / "cache"
    PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    ir = load_hf_checkpoint(ckpt)
    ir.store.set(ir.blocks[1].down, ir.store.get_f32(ir.blocks[1].down) + 1)
    again = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(ir)
    assert [r.status for r in again.records] == ["ran"] * 3


def test_damaged_cache_entry_is_a_miss(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    cache = tmp_path / "cache"
    res = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    for f in cache.rglob("tensors.safetensors"):
        f.write_bytes(b"garbage")
    again = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    assert again.records[0].status == "cached"  # count changes no tensor: its entry is intact
    assert again.records[1].status == "ran"
    up = res.ir.blocks[0].up
    assert np.array_equal(again.ir.store.get(up), res.ir.store.get(up))


def test_cache_entry_with_a_changed_byte_is_a_miss(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    cache = tmp_path / "cache"
    res = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    for st in cache.rglob("tensors.safetensors"):
        data = bytearray(st.read_bytes())
        data[-1] ^= 1  # the file still parses; only its digest differs from the manifest's
        st.write_bytes(bytes(data))
    again = PassManager(_recipe(tmp_path).instantiate(), cache_dir=cache).run(load_hf_checkpoint(ckpt))
    assert [r.status for r in again.records][:2] == ["cached", "ran"]
    up = res.ir.blocks[0].up
    assert np.array_equal(again.ir.store.get(up), res.ir.store.get(up))


def test_dump_after_writes_loadable_ir(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    dumps = tmp_path / "dumps"
    PassManager(_recipe(tmp_path).instantiate(), dump_after=["test-scale-up"], dump_dir=dumps).run(
        load_hf_checkpoint(ckpt))
    assert [p.name for p in dumps.iterdir()] == ["01-test-scale-up"]
    ir = ModelIR.load(dumps / "01-test-scale-up")
    assert ir.blocks[0].annotations["scaled"] == 2.0 and "weights" not in ir.blocks[0].annotations


def test_requires_is_checked(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    with pytest.raises(PassError, match="layer 9"):
        PassManager([ScaleUp(ScaleOptions(layer=9))]).run(load_hf_checkpoint(ckpt))


def test_weight_stats_against_numpy(tiny_model):
    ckpt, _ = tiny_model("llama")
    from sparseforge.passes.weight_stats import WeightStats
    from sparseforge.toolchain.pass_base import PassContext

    ir = load_hf_checkpoint(ckpt)
    res = WeightStats()(ir, PassContext(work_dir=ckpt))
    b = res.ir.blocks[1]
    up = ir.store.get_f32(b.up)
    w = b.annotations["weights"]
    assert w["up_row_norm"]["max"] == pytest.approx(np.sqrt((up.astype(np.float64) ** 2).sum(1)).max(), rel=1e-5)
    assert w["params"] == 3 * up.size
    total = sum(ir.store.get(n).size for n in ir.store.names())
    assert res.stats["model_params"] == total
    assert ir.blocks[1].annotations == {}  # the input IR is untouched


@pytest.mark.parametrize(
    "text, message",
    [
        ("name = 'x'", "at least one"),
        ("[[pass]]\nname = 'nope'", "unknown pass 'nope'"),
        ("[[pass]]\nname = 'test-scale-up'\n[pass.options]\nfactr = 2.0", "no option 'factr'"),
        ("[[pass]]\nname = 'test-scale-up'\n[pass.options]\nfactor = 'big'", "expected float"),
        ("[[pass]]\nname = 'test-count'\nfactor = 2", "unknown keys"),
        ("[[pass]\nname = 'x'", "invalid TOML"),
        ("seeed = 3\n[[pass]]\nname = 'test-count'", "unknown top-level keys \\['seeed'\\]"),
        ("[verify]\nmin_cosin = 0.9\n[[pass]]\nname = 'test-count'", "unknown gates \\['min_cosin'\\]"),
        ("[verify]\nmin_cosine = 'high'\n[[pass]]\nname = 'test-count'", "must be a finite number"),
        ("verify = 0.9\n[[pass]]\nname = 'test-count'", "must be a table"),
    ],
)
def test_recipe_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_recipe(text, "r.toml")


def test_recipe_override_and_builtin():
    r = load_recipe(None)
    assert r.name == "default" and r.passes
    r = parse_recipe("[[pass]]\nname = 'test-scale-up'", "r.toml")
    r.override(["test-scale-up.factor=0.5", "test-scale-up.layer=1"])
    (p,) = r.instantiate()
    assert p.options == ScaleOptions(factor=0.5, layer=1)
    with pytest.raises(InputError, match="no pass 'other'"):
        r.override(["other.x=1"])
    with pytest.raises(InputError, match="--set test-scale-up.factor=abc: option test-scale-up.factor"):
        r.override(["test-scale-up.factor=abc"])  # the error names the --set, not the recipe file
    with pytest.raises(InputError, match="no such recipe"):
        load_recipe("no-such-recipe")


def test_recipe_verify_gates_go_to_pack():
    """A recipe's [verify] gates become the pack pass's options (its own win); unset, they
    stay out of the recorded options (test_verify: the artifact carries them)."""
    r = parse_recipe("[verify]\nmin_cosine = 0.99\nmax_ppl_increase = 1\n[[pass]]\nname = 'test-count'\n"
                     "[[pass]]\nname = 'pack'\n[pass.options]\nmax_ppl_increase = 0.2\n", "r.toml")
    assert r.verify == {"min_cosine": 0.99, "max_ppl_increase": 1.0} and r.to_dict()["verify"] == r.verify
    count, pack = r.instantiate()
    assert (pack.options.min_cosine, pack.options.max_ppl_increase) == (0.99, 0.2)
    assert "min_cosine" in pack.options_dict()
    (plain,) = parse_recipe("[[pass]]\nname = 'pack'", "r.toml").instantiate()
    assert "min_cosine" not in plain.options_dict()  # unset gates are not recorded


def test_convert_leaves_nothing_partial_on_failure(tiny_model, tmp_path):
    ckpt, _ = tiny_model("bert")
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[[pass]]\nname = 'test-count'\n[[pass]]\nname = 'test-scale-up'\n[pass.options]\nlayer = 7\n")
    out = tmp_path / "out"
    with pytest.raises(PassError):
        convert_model(ckpt, out, recipe=recipe)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "bad.toml"] == []


def test_convert_replaces_only_its_own_outputs(tiny_model, tmp_path):
    """An existing directory sparseforge did not write, a file, or a path under a file is
    bad output (checked before the run, nothing touched); its own output is replaced."""
    ckpt, _ = tiny_model("bert")
    recipe = tmp_path / "r.toml"
    recipe.write_text("[[pass]]\nname = 'test-count'\n")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((precious, "not written by sparseforge"), (afile, "not a directory"),
                         (afile / "sub", "is not a directory")):
        with pytest.raises(InputError, match=message):
            convert_model(ckpt, out, recipe=recipe)
    assert (precious / "data.txt").read_text() == "keep" and afile.read_text() == "x"
    for _ in range(2):
        convert_model(ckpt, tmp_path / "out", recipe=recipe)
    assert (tmp_path / "out" / "report.json").is_file()
    with pytest.raises(InputError, match="--dump-after nope"):
        convert_model(ckpt, tmp_path / "out2", recipe=recipe, dump_after=["nope"])


def test_convert_output_does_not_depend_on_the_cache(tiny_model, tmp_path):
    import shutil

    ckpt, _ = tiny_model("bert")
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(factor=2.0))
    report = convert_model(ckpt, tmp_path / "out", recipe=recipe, cache_dir=tmp_path / "cache")
    assert [p["status"] for p in report["passes"]] == ["ran"] * 3
    shutil.rmtree(tmp_path / "cache")
    ir = ModelIR.load(tmp_path / "out" / "ir")
    ref = load_hf_checkpoint(ckpt)
    assert np.array_equal(ir.store.get(ref.blocks[0].up), ref.store.get_f32(ref.blocks[0].up) * 2)
