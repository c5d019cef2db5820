"""``emit``: write the model's specialised sparse FFN kernels for a CPU target. Changes no tensor.

Attaches ``emit/kernels.py``: one self-contained module (numpy + numba only) holding the
kernels of ``sparseforge.kernels`` with the model's shapes and formats baked in as
constants (``kernels.emitgen``), ``MODEL`` (per-layer bundle layouts and activation
fields) and ``load_layer(i, bundles)``. Each layer's weight format comes from the
``quantize`` pass's annotation (``block.annotations["quant"]["format"]``) or, without
one, from ``formats`` (``auto`` = f32). Bundles are aligned to the target's
``bundle_align`` unless ``align`` is set.

``verify`` packs every layer's weights into bundles, runs the emitted module on random
inputs (dense and 25% sparse) and compares with the numpy reference FFN
(``toolchain.reference.ffn``) on the same inputs (Q8_0-rounded for quantized layers);
when the IR's weights are exactly representable in the layer's format (f32, or the
quantize pass chose that format) a relative error above ``tolerance`` fails the pass.

With ``asm`` (default on) the pass cross-compiles the kernels' per-row primitives for the
target with llvmlite (``kernels.crossasm``; ARM targets need no ARM machine) and attaches
``emit/kernels.<target>.s`` and ``emit/asm_report.json``: per kernel, its innermost loops,
the vector instructions found in the hot loop (NEON ``fmla v``/``sdot``, SVE ``z``
registers/``ld1w``/``ld1b``, x86 ``ymm``/``zmm``/``vpmaddwd``) and llvm-mca cycles per
iteration against the resource bound (``mca``; noted as unavailable when llvm-mca is not
installed). Statistics: target, formats, specialisation, vectorised kernels, verify error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sparseforge.kernels import crossasm, quant
from sparseforge.kernels.bundle import BundleLayout, encode_gate, pack_bundles
from sparseforge.kernels.emitgen import LayerSpec, generate_module
from sparseforge.targets import Target, get_target
from sparseforge.toolchain.artifact_build import gate_apart
from sparseforge.toolchain.errors import InputError, PassError
from sparseforge.toolchain.ir import FFNBlock, ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass
from sparseforge.toolchain.reference.ffn import ffn_forward

Formats = Literal["auto", "f32", "f16", "q8_0", "q4_0"]


@dataclass(frozen=True)
class EmitOptions:
    """``target``: a name from ``sparseforge targets`` or ``host``; ``formats``: weight
    format of layers the quantize pass did not annotate (``auto`` = f32); ``align``:
    bundle alignment in bytes (0 = the target's); ``verify``: run the emitted kernels
    against the numpy reference; ``tolerance``: allowed relative error; ``asm``: attach
    the cross-compiled assembly and its report; ``mca``: run llvm-mca on the hot loops."""

    target: str = "host"
    formats: Formats = "auto"
    align: int = 0
    verify: bool = True
    tolerance: float = 2e-3
    asm: bool = True
    mca: bool = True


def layer_format(block: FFNBlock, default: str) -> tuple[str, bool]:
    """(format, whether the quantize pass chose it) of a block's FFN weights."""
    quant_note = block.annotations.get("quant") or {}
    if quant_note.get("format"):
        return quant.normalize_format(quant_note["format"]), True
    return ("f32" if default == "auto" else default), False


@register_pass
class Emit(Pass):
    name = "emit"
    summary = "write the model's FFN kernels specialised for a CPU target (+ ARM assembly report)"
    Options = EmitOptions

    def check_options(self) -> None:
        o = self.options
        try:
            get_target(o.target)
        except InputError as exc:
            raise PassError(f"emit: {exc.problem}") from None
        if o.align < 0 or (o.align and o.align & (o.align - 1)):
            raise PassError(f"emit: align must be 0 or a power of two, got {o.align}")
        if not o.tolerance > 0:
            raise PassError(f"emit: tolerance must be > 0, got {o.tolerance}")

    def requires(self, ir: ModelIR) -> None:
        if not ir.blocks:
            raise PassError("emit: the model has no FFN blocks")
        for block in ir.blocks:
            fmt, _ = layer_format(block, self.options.formats)
            d = ir.store.shape(block.up)[1]
            if fmt in quant.QUANTIZED and d % quant.BLOCK:
                raise PassError(f"emit: layer {block.layer}: {fmt} needs d_model to be a multiple of "
                                f"{quant.BLOCK}, got {d}; use formats=\"f32\" or \"f16\"")

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        self.check_options()
        target = get_target(self.options.target)
        out = ir.evolve()
        folder = Path(ctx.work_dir) / "emit"
        folder.mkdir(parents=True, exist_ok=True)
        layers, exact = self._layers(out, target)
        source = generate_module(layers, target.to_dict(), header=f"{out.spec.architecture} ({out.spec.family})")
        path = folder / "kernels.py"
        path.write_text(source, encoding="utf-8")
        out.files["emit/kernels.py"] = str(path)
        stats: dict[str, Any] = {
            "target": target.name, "layers": len(layers),
            "formats": sorted({ly.layout.fmt for ly in layers}),
            "bundle_stride": sorted({ly.layout.stride for ly in layers}),
            "specialisation": json.loads(source.split("Specialisation: ", 1)[1].split(".\n", 1)[0]),
        }
        if self.options.verify:
            stats["verify"] = self._verify(out, path, layers, exact, ctx.seed)
        if self.options.asm:
            report = asm_report(path, target, mca=self.options.mca)
            (folder / f"kernels.{target.name}.s").write_text(report.pop("_asm"), encoding="utf-8")
            (folder / "asm_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            out.files[f"emit/kernels.{target.name}.s"] = str(folder / f"kernels.{target.name}.s")
            out.files["emit/asm_report.json"] = str(folder / "asm_report.json")
            stats["vectorised"] = {k: v["vectorised"] for k, v in report["kernels"].items()}
            stats["llvm_mca"] = report["llvm_mca"]
        return PassResult(out, stats, modified=True)

    def _layers(self, ir: ModelIR, target: Target) -> tuple[list[LayerSpec], list[bool]]:
        align = self.options.align or target.bundle_align
        layers, exact = [], []
        for block in ir.blocks:
            fmt, chosen = layer_format(block, self.options.formats)
            n, d = ir.store.shape(block.up)
            layout = BundleLayout(fmt, d, n, block.gate is not None, align, gate_apart(block))
            layers.append(LayerSpec(block.layer, layout, block.activation, block.up_activation,
                                    float(block.activation_threshold), float(block.output_threshold)))
            exact.append(fmt == "f32" or chosen)
        return layers, exact

    def _verify(self, ir: ModelIR, path: Path, layers: list[LayerSpec], exact: list[bool], seed: int) -> dict:
        module = load_emitted(path)
        rng = np.random.default_rng(seed)
        worst, rows = 0.0, []
        for block, spec, is_exact in zip(ir.blocks, layers, exact):
            store = ir.store
            gate = store.get_f32(block.gate) if block.gate else None
            blob = pack_bundles(gate, store.get_f32(block.up), store.get_f32(block.down), spec.layout)
            tensors = {k: store.get_f32(getattr(block, k)) for k in ("gate_bias", "up_bias", "down_bias")
                       if getattr(block, k)}
            if spec.layout.gate_apart:
                tensors["gate"] = encode_gate(gate, spec.layout)
            kern = module.load_layer(len(rows), blob, **tensors)
            x = rng.standard_normal(spec.layout.d_model).astype(np.float32)
            xk = quant.roundtrip(x, "q8_0") if spec.layout.fmt in quant.QUANTIZED else x
            ref = ffn_forward(store, block, xk[None])[0]
            err = _rel(kern.forward(x), ref)
            idx = np.sort(rng.choice(spec.layout.n_neurons, max(1, spec.layout.n_neurons // 4), replace=False))
            masked = _masked_reference(store, block, xk, idx)
            err_sparse = _rel(kern.forward(x, idx), masked)
            rows.append({"layer": block.layer, "format": spec.layout.fmt, "dense_rel_error": err,
                         "sparse_rel_error": err_sparse, "exact_weights": is_exact})
            if is_exact:
                worst = max(worst, err, err_sparse)
        if worst > self.options.tolerance:
            bad = [r for r in rows if r["exact_weights"] and max(r["dense_rel_error"], r["sparse_rel_error"])
                   > self.options.tolerance]
            raise PassError(f"emit: emitted kernels disagree with the reference FFN: {bad}")
        return {"max_rel_error": worst, "layers": rows}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-6))


def _masked_reference(store, block: FFNBlock, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The reference FFN with only neurons ``idx`` kept (the rest of h zeroed)."""
    keep = np.zeros(store.shape(block.up)[0], bool)
    keep[idx] = True
    captured = {}
    ffn_forward(store, block, x[None], capture=lambda layer, xin, h: captured.setdefault("h", h.copy()))
    h = np.where(keep, captured["h"][0], np.float32(0)).astype(np.float32)
    y = h @ store.get_f32(block.down).T
    if block.down_bias:
        y = y + store.get_f32(block.down_bias)
    return y


def load_emitted(path: str | Path):
    """Import an emitted kernels module from its file."""
    import importlib.util
    import sys

    name = f"sparseforge_emitted_{abs(hash(str(Path(path).resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def expected_vector_ops(target: Target, kernel: str) -> list[str]:
    """Instruction classes whose presence shows ``kernel``'s hot loop vectorised on ``target``."""
    quantized_dot = kernel.startswith("dot_q")
    if target.is_arm:
        if quantized_dot and target.int8_dot == "sdot" and not target.sve:
            return ["sdot"]
        if target.sve and not quantized_dot:
            return ["sve_z"]
        if quantized_dot and target.int8_dot == "sdot":
            return ["sdot", "sve_z"]
        return ["neon_v", "sve_z"]
    return ["ymm", "zmm", "xmm"] if target.vector_bits > 128 else ["xmm"]


def asm_report(module_path: str | Path, target: Target, mca: bool = True) -> dict[str, Any]:
    """Cross-compile the module's ARM_PROBES for ``target``; per kernel the hot loop's
    vector instructions and (``mca``) llvm-mca cycles per iteration."""
    res = crossasm.run_subprocess({"module": str(module_path), "targets": [
        {"name": target.name, "triple": target.triple, "cpu": target.cpu, "features": target.features}]})
    per = res[target.name]
    kernels, listing = {}, []
    mca_tool = crossasm.find_llvm_mca() if mca else None
    for kernel, info in sorted(per.items()):
        listing.append(f"// ===== {kernel} ({target.name}) =====\n{info['asm']}")
        loops = crossasm.analyse_loops(info["asm"], info["symbol"])
        hot = crossasm.hot_loop(loops)
        expect = expected_vector_ops(target, kernel)
        found = hot["vector"] if hot else {}
        entry: dict[str, Any] = {
            "loops": [{k: v for k, v in lp.items() if k != "asm"} for lp in loops],
            "hot_loop": hot["asm"] if hot else None,
            "hot_loop_instructions": hot["instructions"] if hot else 0,
            "vector_instructions": found,
            "expected_any_of": expect,
            "vectorised": any(found.get(e, 0) > 0 for e in expect),
        }
        if mca and hot:
            entry["llvm_mca"] = crossasm.llvm_mca(hot["asm"], target.triple.split("-")[0], target.mca_cpu,
                                                  target.features)
        kernels[kernel] = entry
    note = None
    if mca and mca_tool is None:
        note = "llvm-mca not installed (apt-get install llvm-19); cycles per iteration not measured"
    return {"target": target.to_dict(), "kernels": kernels,
            "llvm_mca": {"tool": mca_tool, "note": note} if mca else {"tool": None, "note": "disabled"},
            "_asm": "\n\n".join(listing)}
