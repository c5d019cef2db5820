"""The emit pass and ARM cross-assembly: specialised kernels module, verification, and
vectorised inner loops on every ARM target (no llvm-mca needed)."""
import json

import numpy as np
import pytest

from sparseforge.kernels.bundle import BundleLayout, pack_bundles
from sparseforge.kernels.emitgen import LayerSpec, generate_module
from sparseforge.kernels.runtime import LayerKernels
from sparseforge.passes.emit import Emit, EmitOptions, asm_report, load_emitted
from sparseforge.targets import TARGETS, get_target
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.pass_base import PassContext, make_options

ARM = [t for t in TARGETS.values() if t.is_arm]


@pytest.fixture(scope="module")
def emitted_all(tmp_path_factory):
    """One module with an f32, a Q8_0 and a Q4_0 layer at a realistic d (512)."""
    d, n = 512, 96
    layers = [LayerSpec(0, BundleLayout("f32", d, n, True), "relu", "relu"),
              LayerSpec(1, BundleLayout("q8_0", d, n, True), "silu"),
              LayerSpec(2, BundleLayout("q4_0", d, n, False), "fatrelu", activation_threshold=0.1)]
    path = tmp_path_factory.mktemp("emit") / "kernels.py"
    path.write_text(generate_module(layers, get_target("neoverse-n1").to_dict(), "test"))
    return path, layers


@pytest.mark.parametrize("target", ARM, ids=lambda t: t.name)
def test_arm_inner_loops_vectorise(emitted_all, target):
    report = asm_report(emitted_all[0], target, mca=False)
    k = report["kernels"]
    assert set(k) == {"dot_f32", "axpy_f32", "dot_q8_0", "axpy_q8_0", "dot_q4_0", "axpy_q4_0"}
    for name in ("dot_f32", "axpy_f32", "dot_q8_0", "dot_q4_0"):
        assert k[name]["vectorised"], (name, k[name]["vector_instructions"])
    if target.int8_dot == "sdot" and not target.sve:
        for name in ("dot_q8_0", "dot_q4_0"):
            assert k[name]["vector_instructions"].get("sdot", 0) > 0, name
    if target.sve:
        for name in ("dot_f32", "axpy_f32"):
            assert k[name]["vector_instructions"].get("sve_z", 0) > 0, name
        assert k["dot_q4_0" if target.int8_dot else "axpy_q8_0"]["vector_instructions"].get("sve_z", 0) > 0
    if target.int8_dot == "sdot":
        assert k["dot_q8_0"]["vector_instructions"].get("sdot", 0) > 0
    assert "fmla" in report["_asm"]


def test_emitted_module_runs_like_the_library(emitted_all):
    path, layers = emitted_all
    mod = load_emitted(path)
    assert mod.SPEC_D == 512 and mod.SPEC_FMT == -1 and mod.MODEL["layers"][2]["layout"]["fmt"] == "q4_0"
    rng = np.random.default_rng(0)
    for i, spec in enumerate(layers):
        lay = spec.layout
        g = rng.standard_normal((lay.n_neurons, lay.d_model)).astype(np.float32) if lay.gated else None
        blob = pack_bundles(g, rng.standard_normal((lay.n_neurons, lay.d_model)).astype(np.float32),
                            rng.standard_normal((lay.d_model, lay.n_neurons)).astype(np.float32), lay)
        x = rng.standard_normal(lay.d_model).astype(np.float32)
        lib = LayerKernels(blob, lay, spec.activation, spec.up_activation, spec.activation_threshold)
        idx = np.arange(0, lay.n_neurons, 3)
        want = lib.forward(x, idx)
        # same arithmetic; fixed trip counts let LLVM order the float32 sums differently
        # (fast-math), so the tolerance follows the magnitude of the sums, not of each output
        np.testing.assert_allclose(mod.load_layer(i, blob).forward(x, idx), want, rtol=1e-5,
                                   atol=1e-6 * float(np.abs(want).max()))


def test_emit_pass_on_tiny_llama(tiny_model, tmp_path):
    ir = load_model(tiny_model("llama")[0])
    opts = make_options(Emit, {"target": "neoverse-v1", "formats": "q4_0", "mca": True})
    res = Emit(opts)(ir, PassContext(work_dir=tmp_path, seed=0))
    out, stats = res.ir, res.stats
    assert stats["target"] == "neoverse-v1" and stats["formats"] == ["q4_0"] and stats["layers"] == 2
    assert stats["specialisation"]["SPEC_D"] == 64 and stats["specialisation"]["SPEC_FMT"] == 2
    assert stats["verify"]["layers"][0]["dense_rel_error"] < 0.5  # q4_0 of f32 weights: quantization error
    assert not stats["verify"]["layers"][0]["exact_weights"]
    assert all(stats["vectorised"].values()), stats["vectorised"]
    for key in ("emit/kernels.py", "emit/asm_report.json", "emit/kernels.neoverse-v1.s"):
        assert key in out.files
    report = json.loads(open(out.files["emit/asm_report.json"]).read())
    mca = report["kernels"]["dot_q4_0"].get("llvm_mca", {})
    if mca.get("ok"):
        assert mca["cycles_per_iteration"] > 0 and mca["resource_bound_cycles"] > 0
    else:  # no llvm-mca, or one too old for the listing: the report says so
        assert report["llvm_mca"]["note"] or mca.get("note")
    # f32 verification is exact against the reference FFN
    res = Emit(make_options(Emit, {"target": "x86-64-v3", "asm": False}))(ir, PassContext(work_dir=tmp_path / "b"))
    assert res.stats["verify"]["max_rel_error"] < 1e-4
    assert "kernels.py" in res.ir.files["emit/kernels.py"]
    # layers the predictors pass made gate-first keep their gates apart, as in the artifact
    ir = ir.evolve()
    for b in ir.blocks:
        b.activation = "relu"
        b.annotations["predictor"] = {"mode": "gate-first"}
    res = Emit(make_options(Emit, {"target": "x86-64-v3", "asm": False}))(ir, PassContext(work_dir=tmp_path / "c"))
    assert res.stats["verify"]["max_rel_error"] < 1e-4
    assert all(m["layout"]["gate_apart"] for m in load_emitted(res.ir.files["emit/kernels.py"]).MODEL["layers"])


def test_emit_options_errors(tiny_model, tmp_path):
    with pytest.raises(PassError, match="unknown target"):
        Emit(EmitOptions(target="pentium")).check_options()
    with pytest.raises(PassError, match="align"):
        Emit(EmitOptions(align=48)).check_options()
