"""``pack``: write the conversion's output, one GGUF artifact (docs/artifact-format.md).

Non-FFN weights in the formats the ``quantize`` pass chose (standard ggml types F32,
F16, Q8_0, Q4_0; f32 for everything when quantize has not run), each FFN layer as one
I8 blob of neuron bundles ``blk.{L}.ffn_bundle`` (``kernels.bundle``: gate row, up row,
down column per neuron, padded to ``bundle_align`` bytes; the gate of a layer the
predictors pass made gate-first apart, ``blk.{L}.ffn_gate``), predictors as F32 (or F16),
and the ``sparseforge.*`` metadata: spec, FFN semantics, bundle layouts, formats, neuron
order, sparsity, thresholds, predictor modes, the recipe and pass log (without wall
times), source digest, target, tokenizer, per-tensor sha256 and a metadata digest.
The same IR gives a byte-identical file.

Changes nothing in the model: attaches the artifact as ``pack/model.gguf`` (``convert``
and ``pack`` copy it to ``OUT/model.gguf``). Statistics: bytes, sha256, tensors, bytes
of bundles / gates kept apart / other weights / predictors, bits per FFN weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparseforge.kernels import quant
from sparseforge.kernels.runtime import activation_spec
from sparseforge.toolchain.artifact_build import build_metadata, layouts_for, tensor_stream, weight_names
from sparseforge.toolchain.artifact_format import ARTIFACT_KEY as ARTIFACT
from sparseforge.toolchain.artifact_format import MAX_NAME_BYTES
from sparseforge.toolchain.artifact_reader import Artifact
from sparseforge.toolchain.artifact_writer import write_artifact
from sparseforge.toolchain.errors import InputError, PassError
from sparseforge.toolchain.ir import ModelIR
from sparseforge.toolchain.pass_base import Pass, PassContext, PassResult, register_pass

from .quantize import formats_of



DEFAULT_ALIGN = 64


@dataclass(frozen=True)
class PackOptions:
    """``target``: the CPU target (``sparseforge.targets``) recorded in the artifact;
    ``bundle_align``: bytes each neuron bundle is padded to (a power of two; 0: the
    target's bundle alignment, 64 = a cache line when targets are not available);
    ``predictor_format``: ``f32`` or ``f16``; ``tokenizer``: embed tokenizer.json;
    ``verify``: read the artifact back through the validating reader; ``min_cosine``,
    ``max_ppl_increase``: quality gates recorded in the artifact's recipe as its
    ``[verify]`` table (a recipe's ``[verify]`` sets them), which ``sparseforge verify``
    applies when neither an option nor ``--recipe`` gives a gate."""

    target: str = "generic"
    bundle_align: int = 0
    predictor_format: str = "f32"
    tokenizer: bool = True
    verify: bool = True
    min_cosine: float | None = None
    max_ppl_increase: float | None = None


@register_pass
class Pack(Pass):
    name = "pack"
    summary = "write one GGUF artifact: quantized weights, hot-first FFN bundles, predictors, metadata"
    Options = PackOptions
    quiet_defaults = ("min_cosine", "max_ppl_increase")  # unset gates leave the recorded recipe as it was

    def check_options(self) -> None:
        o = self.options
        if o.bundle_align < 0 or o.bundle_align & (o.bundle_align - 1):
            raise PassError(f"pack: bundle_align must be a power of two (or 0: the target's), got {o.bundle_align}")
        resolve_target(o.target)
        if o.predictor_format not in ("f32", "f16"):
            raise PassError(f"pack: predictor_format must be f32 or f16, got {o.predictor_format!r}")
        if not o.target:
            raise PassError("pack: target must not be empty")

    def requires(self, ir: ModelIR) -> None:
        long = [n for n in weight_names(ir) if len(n.encode()) > MAX_NAME_BYTES]
        if long:
            raise PassError(f"pack: tensor name {long[0]!r} is longer than GGUF's {MAX_NAME_BYTES} bytes")
        for b in ir.blocks:
            try:  # the runtime's kernels compute these activations only
                activation_spec(b.activation, b.gate is not None, b.up_activation)
            except ValueError as exc:
                raise PassError(f"pack: layer {b.layer}: {exc}") from None
            fmt = (b.annotations.get("quant") or {}).get("format", "f32")
            if fmt in quant.QUANTIZED and ir.spec.hidden_size % quant.BLOCK:
                raise PassError(f"pack: layer {b.layer}: {fmt} bundles need d_model to be a multiple of 32")

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        o = self.options
        out = ir.evolve()
        target, align = resolve_target(o.target)
        layouts = layouts_for(ir, o.bundle_align or align)
        formats = formats_of(ir)
        meta = build_metadata(ir, layouts, formats, target=target, seed=ctx.seed,
                              pack_options=self.options_dict(), tokenizer=o.tokenizer)
        path = ctx.work_dir / "model.gguf"
        written = write_artifact(path, meta, tensor_stream(ir, layouts, formats, o.predictor_format))
        if o.verify:
            Artifact.open(path).close()
        out.files[ARTIFACT] = str(path)
        return PassResult(out, _stats(written, layouts), modified=True)


def resolve_target(name: str) -> tuple[str, int]:
    """(target name, bundle alignment) from ``sparseforge.targets`` when it describes
    targets; otherwise the name as given and 64 bytes."""
    try:
        from sparseforge.targets import get_target
    except ImportError:
        return name, DEFAULT_ALIGN
    try:
        t = get_target(name)
    except InputError as exc:
        raise PassError(f"pack: {exc.problem}") from None
    return t.name, int(t.bundle_align)


def _stats(written, layouts) -> dict[str, Any]:
    table = written.tensors
    bundles = sum(t["nbytes"] for t in table if t["name"].endswith(".ffn_bundle"))
    gates = sum(t["nbytes"] for t in table if t["name"].endswith(".ffn_gate"))
    preds = sum(t["nbytes"] for t in table if ".predictor." in t["name"])
    ffn_weights = sum((3 if lay.gated else 2) * lay.d_model * lay.n_neurons for lay in layouts)
    return {"bytes": written.nbytes, "sha256": written.sha256, "tensors": len(table),
            "bundle_bytes": bundles, "gate_bytes": gates, "predictor_bytes": preds,
            "other_bytes": sum(t["nbytes"] for t in table) - bundles - gates - preds,
            "ffn_bits_per_weight": 8 * (bundles + gates) / max(ffn_weights, 1),
            "bundle_formats": sorted({lay.fmt for lay in layouts}),
            "bundle_stride": sorted({lay.stride for lay in layouts})}
