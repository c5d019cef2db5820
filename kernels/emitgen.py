"""Generate a deployable kernels module specialised to one model's FFN layers.

The module is the text of :mod:`.quant`, :mod:`.bundle`, :mod:`.ffn` and :mod:`.runtime`
joined into one file (needs only numpy and numba), with :mod:`.ffn`'s ``SPEC_*``
constants set to the values all layers share (d_model always; format, gating and
activation when every layer agrees), followed by ``MODEL`` (per-layer layouts and
activation fields), ``load_layer(i, blob, ...)`` and ``ARM_PROBES()`` (the per-row
primitives with example arguments, for :mod:`.crossasm`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ffn, runtime
from .bundle import BundleLayout

_HERE = Path(__file__).parent
_PARTS = ("quant.py", "bundle.py", "ffn.py", "runtime.py")
_DROP = re.compile(r"^(from __future__ import annotations|from \. import .*|from \.\w+ import .*)$", re.M)


@dataclass(frozen=True)
class LayerSpec:
    """What the emitted code needs to know of one FFN layer."""

    layer: int
    layout: BundleLayout
    activation: str
    up_activation: str | None = None
    activation_threshold: float = 0.0
    output_threshold: float = 0.0

    def codes(self) -> tuple[int, int, float]:
        return runtime.activation_spec(self.activation, self.layout.gated, self.up_activation,
                                       self.activation_threshold)

    def to_dict(self) -> dict[str, Any]:
        act, up_relu, t = self.codes()
        return {"layer": self.layer, "layout": self.layout.to_dict(), "activation": self.activation,
                "up_activation": self.up_activation, "activation_threshold": t,
                "output_threshold": self.output_threshold, "act_code": act, "up_relu": up_relu}


def specialisation(layers: list[LayerSpec]) -> dict[str, int]:
    """``SPEC_*`` values shared by every layer (-1 where layers differ)."""
    def common(values):
        values = set(values)
        return values.pop() if len(values) == 1 else -1

    kernel_fmt = [ffn.FORMAT_CODES["f32" if ly.layout.fmt == "f16" else ly.layout.fmt] for ly in layers]
    return {
        "SPEC_D": common(ly.layout.d_model for ly in layers),
        "SPEC_FMT": common(kernel_fmt),
        "SPEC_GATED": common(int(ly.layout.gated) for ly in layers),
        "SPEC_ACT": common(ly.codes()[0] for ly in layers),
        "SPEC_UP_RELU": common(ly.codes()[1] for ly in layers),
    }


def _body(name: str, spec: dict[str, int] | None = None) -> str:
    text = (_HERE / name).read_text(encoding="utf-8")
    text = _DROP.sub("", text)
    if spec:
        for key, value in spec.items():
            text, count = re.subn(rf"^{key} = -?\d+", f"{key} = {value}", text, count=1, flags=re.M)
            if count != 1:
                raise RuntimeError(f"kernels/ffn.py has no {key} line to specialise")
    return f"# ---- from sparseforge/kernels/{name} ----\n{text.strip()}\n"


_TAIL = '''
# ---- generated: the model ----
MODEL = json.loads({model!r})
TARGET = json.loads({target!r})


def load_layer(i, blob, gate_bias=None, up_bias=None, down_bias=None, nchunks=None, gate=None):
    """LayerKernels for FFN layer ``i`` (its bundles ``uint8[n, stride]``, e.g. the
    artifact's ``blk.{{i}}.ffn_bundle`` tensor; ``gate``: a gate-apart layer's gate
    matrix, the artifact's ``blk.{{i}}.ffn_gate``)."""
    m = MODEL["layers"][i]
    layout = BundleLayout.from_dict(m["layout"])
    return LayerKernels(blob, layout, activation=m["activation"], up_activation=m["up_activation"],
                        activation_threshold=m["activation_threshold"], output_threshold=m["output_threshold"],
                        gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias, nchunks=nchunks, gate=gate)


def ARM_PROBES():
    """{{kernel: (dispatcher, example args)}}: the per-row inner loops, for cross-assembly."""
    d = MODEL["d_model"]
    nb = max(d // QK, 1)
    x = np.zeros(d, np.float32)
    xq = np.zeros(d, np.int8)
    xd = np.zeros(nb, np.float32)
    lut = np.zeros(65536, np.float32)
    probes = {{}}
    for fmt in sorted({{("f32" if l["layout"]["fmt"] == "f16" else l["layout"]["fmt"]) for l in MODEL["layers"]}}):
        if fmt == "f32":
            w = np.zeros(3 * d, np.float32)
            probes["dot_f32"] = (dot_f32, (w, 0, x, d))
            probes["axpy_f32"] = (axpy_f32, (w, 0, np.float32(1), x, d))
        else:
            w = np.zeros(3 * nb * Q8_BYTES, np.int8)
            dot, axpy = (dot_q8_0, axpy_q8_0) if fmt == "q8_0" else (dot_q4_0, axpy_q4_0)
            probes["dot_" + fmt] = (dot, (w, 0, xq, xd, lut, nb))
            probes["axpy_" + fmt] = (axpy, (w, 0, np.float32(1), x, lut, nb))
    return probes
'''


def generate_module(layers: list[LayerSpec], target: dict[str, Any], header: str = "") -> str:
    """Source text of the specialised kernels module."""
    if not layers:
        raise ValueError("no FFN layers to emit kernels for")
    spec = specialisation(layers)
    model = {"d_model": layers[0].layout.d_model, "spec": spec, "layers": [ly.to_dict() for ly in layers]}
    doc = (f'"""sparseforge kernels for {header or "a model"}, target {target.get("name")}.\n\n'
           "Generated by the sparseforge `emit` pass; needs only numpy and numba. Deploy with\n"
           f"NUMBA_CPU_NAME={target.get('cpu')} NUMBA_CPU_FEATURES={target.get('features')} to compile for the\n"
           "target CPU. `load_layer(i, bundles)` returns the layer's kernels (forward, gate_first,\n"
           f'prefill, rows, axpy); MODEL describes the layers. Specialisation: {json.dumps(spec)}.\n"""\n')
    parts = [doc, "from __future__ import annotations\n\nimport json\nimport types\n",
             "quant = bundle = ffn = types.SimpleNamespace()  # the library's module names, filled below\n"]
    for name in _PARTS:
        if name == "runtime.py":
            parts.append("quant.__dict__.update(globals())\n")
        parts.append(_body(name, spec if name == "ffn.py" else None))
    parts.append("quant.__dict__.update(globals())\n")
    parts.append(_TAIL.format(model=json.dumps(model), target=json.dumps(target)))
    return "\n\n".join(parts)
