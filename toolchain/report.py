"""``report.html``: one self-contained page describing a conversion.

:func:`write_report` reads a ``convert`` output directory (``ir/`` with the files the
passes attached, ``report.json``, and ``verify.json`` / ``bench.json`` when
``sparseforge verify`` / ``bench`` results were saved there, as the demo does) and
writes ``report.html``: inline CSS, every plot a base64 PNG (matplotlib), no external
resource. Sections (HTML ids): ``summary``, ``sparsity`` (per-layer FFN sparsity,
before and after relufy), ``frequency`` (neuron activation-frequency distributions),
``predictors`` (recall and density per layer), ``quantization`` (SQNR per tensor),
``sweep`` (sparsity vs quality), ``verify`` and ``bench``. A section whose data is
missing says so instead of failing.
"""
from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import plots, report_plots

SECTIONS = ("summary", "sparsity", "frequency", "predictors", "quantization", "sweep", "verify", "bench")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:980px;color:#222;
background:#fff}h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #3a6ea5;padding-bottom:.2em;
margin-top:1.6em;color:#1d3f66}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#eef3f9}td.l,th.l{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}.muted{color:#777}.pass{color:#1a7f37;font-weight:bold}
.fail{color:#c62828;font-weight:bold}.kpi{display:inline-block;margin:.3em 1.2em .3em 0;padding:.5em .9em;
background:#eef3f9;border-radius:6px}.kpi b{font-size:1.3em;display:block}
"""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if np.isnan(v) else format(v, fmt)
    return _esc(v)


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(f"<th class='{'l' if i < left else ''}'>{_esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{_num(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


class _Plotter:
    """Draws plots into a temporary directory and returns them as ``<img>`` tags."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.n = tmp, 0

    def img(self, draw: Callable[[Path], None], alt: str) -> str:
        self.n += 1
        p = self.tmp / f"plot{self.n}.png"
        draw(p)
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{data}'>"


def _missing(why: str) -> str:
    return f"<p class='muted'>Not available: {_esc(why)}.</p>"


def _load_ir(out: Path):
    from .ir import ModelIR

    try:
        return ModelIR.load(out / "ir")
    except Exception:  # a damaged or absent IR still gets a report of what is there
        return None


def _ir_json(ir, key: str) -> Any:
    if ir is None or key not in ir.files:
        return None
    return _read_json(Path(ir.files[key]))


def build_report(out: str | Path, *, verify: dict | None = None, bench: dict | None = None) -> str:
    """The HTML text of the report of the convert output ``out``."""
    out = Path(out)
    run = _read_json(out / "report.json") or {}
    verify = verify if verify is not None else _read_json(out / "verify.json")
    bench = bench if bench is not None else _read_json(out / "bench.json")
    ir = _load_ir(out)
    with tempfile.TemporaryDirectory(prefix="sparseforge-report-") as tmp:
        pl = _Plotter(Path(tmp))
        parts = {
            "summary": _summary(run, ir, verify, bench, out),
            "sparsity": _sparsity(ir, pl),
            "frequency": _frequency(ir, pl),
            "predictors": _predictors(ir, pl),
            "quantization": _quantization(ir, pl),
            "sweep": _sweep(ir, pl),
            "verify": _verify(verify),
            "bench": _bench(bench, pl),
        }
    titles = {"summary": "Summary", "sparsity": "Per-layer FFN sparsity", "frequency": "Neuron activation frequency",
              "predictors": "Activation predictors", "quantization": "Quantization", "sweep": "Sparsity vs quality",
              "verify": "Verification against the original", "bench": "Speed"}
    model = (ir.spec.architecture if ir is not None else "") or "model"
    nav = " · ".join(f"<a href='#{s}'>{titles[s]}</a>" for s in SECTIONS)
    body = "".join(f"<section id='{s}'><h2>{titles[s]}</h2>{parts[s]}</section>" for s in SECTIONS)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>sparseforge report: {_esc(model)}"
            f"</title><style>{_CSS}</style></head><body><h1>sparseforge conversion report</h1>"
            f"<p class='muted'>{_esc(model)} · {_esc(Path(run.get('model', '')).name)}</p><p>{nav}</p>{body}"
            "</body></html>\n")


def write_report(out: str | Path, *, verify: dict | None = None, bench: dict | None = None) -> Path:
    """Write ``out/report.html``; returns its path."""
    path = Path(out) / "report.html"
    path.write_text(build_report(out, verify=verify, bench=bench), encoding="utf-8")
    return path


# -- sections ------------------------------------------------------------------------------
def _summary(run: dict, ir, verify: dict | None, bench: dict | None, out: Path) -> str:
    kpis = []
    if ir is not None:
        sp = [float((b.annotations.get("profile") or b.annotations.get("relufy") or {}).get("sparsity", np.nan))
              for b in ir.blocks]
        if not np.all(np.isnan(sp)):
            kpis.append(("mean FFN sparsity", f"{100 * np.nanmean(sp):.1f}%"))
    if verify:
        if "mean_cosine" in verify:
            kpis.append(("mean cosine to original", f"{verify['mean_cosine']:.4f}"))
        if "ppl_increase" in verify:
            kpis.append(("perplexity increase", f"{100 * verify['ppl_increase']:+.2f}%"))
        kpis.append(("verify", "passed" if verify.get("passed") else "FAILED"))
    if bench:
        for k, v in _headline_ratios(bench).items():
            kpis.append((k, f"{v:.2f}x"))
    passes = run.get("passes") or []
    pack = next((p for p in passes if p.get("name") == "pack"), None)
    if pack:
        kpis.append(("artifact", f"{pack['stats'].get('bytes', 0) / 2**20:.1f} MiB"))
    html_kpis = "".join(f"<span class='kpi'><b>{_esc(v)}</b>{_esc(k)}</span>" for k, v in kpis)
    rows = [[p.get("name"), p.get("status"), p.get("wall_s"), p.get("peak_rss_mb")] for p in passes]
    table = _table(["pass", "status", "wall s", "peak MiB"], rows, left=2) if rows else _missing("no report.json")
    extra = ""
    if pack:
        s = pack["stats"]
        extra = (f"<p>Artifact <code>model.gguf</code>: {s.get('bytes', 0):,} bytes, sha256 "
                 f"<code>{_esc(s.get('sha256', ''))[:16]}…</code>, FFN {_num(s.get('ffn_bits_per_weight'), '.2f')} "
                 f"bits/weight, formats {_esc(', '.join(s.get('bundle_formats', [])))}.</p>")
    return html_kpis + extra + table


def _headline_ratios(bench: dict) -> dict[str, float]:
    r = bench.get("ratios") or {}
    out = {}
    for k, v in r.items():
        if k.startswith("decode_sparse_vs_") or (k.startswith("embed") and "_sparse_vs_ort" in k):
            out[k.replace("_", " ")] = v
    return dict(list(out.items())[:3])


def _sparsity(ir, pl: _Plotter) -> str:
    if ir is None:
        return _missing("no IR")
    after = [float((b.annotations.get("profile") or {}).get("sparsity", np.nan)) for b in ir.blocks]
    relufy = _ir_json(ir, "relufy/relufy.json")
    before = (relufy or {}).get("before", {}).get("sparsity")
    if np.all(np.isnan(after)):
        return _missing("the model was not profiled")
    if before and len(before) == len(after):
        img = pl.img(lambda p: plots.plot_before_after(p, before, after, "FFN sparsity before / after relufy"),
                     "per-layer sparsity")
        rows = [[i, b, a] for i, (b, a) in enumerate(zip(before, after))]
        return img + _table(["layer", "sparsity before", "sparsity after"], rows)
    pos = [float((b.annotations.get("profile") or {}).get("positive_fraction", np.nan)) for b in ir.blocks]
    img = pl.img(lambda p: plots.plot_layer_sparsity(p, after, pos, "FFN activation sparsity"), "per-layer sparsity")
    return img + _table(["layer", "sparsity"], [[i, a] for i, a in enumerate(after)])


def _frequency(ir, pl: _Plotter) -> str:
    if ir is None:
        return _missing("no IR")
    freqs = []
    for b in ir.blocks:
        prof = b.annotations.get("profile") or {}
        name = (prof.get("tensors") or {}).get("count_active")
        tokens = prof.get("tokens") or _profile_tokens(ir)
        if not name or name not in ir.store or not tokens:
            return _missing("no per-neuron activation counts (profile pass)")
        freqs.append(np.asarray(ir.store.get(name), np.float64) / tokens)
    img = pl.img(lambda p: plots.plot_frequency_distribution(p, freqs, "How often each neuron fires"), "frequency")
    rows = [[i, float(np.mean(f)), float(np.quantile(f, 0.5)), float(np.quantile(f, 0.9)), int((f == 0).sum())]
            for i, f in enumerate(freqs)]
    return img + _table(["layer", "mean", "median", "90th pct", "never active"], rows)


def _profile_tokens(ir) -> int | None:
    prof = _ir_json(ir, "profile/profile.json") or {}
    return (prof.get("summary") or {}).get("tokens")


def _predictors(ir, pl: _Plotter) -> str:
    data = _ir_json(ir, "predictors/predictors.json")
    if not data:
        return _missing("the predictors pass did not run")
    layers = data.get("layers") or []
    img = pl.img(lambda p: report_plots.plot_predictors(p, layers, "Predictor recall and density"), "predictors")
    rows = [[r.get("layer"), r.get("mode"), r.get("rank"), r.get("recall"), r.get("precision"), r.get("density"),
             r.get("true_density"), r.get("flops_fraction")] for r in layers]
    s = data.get("summary") or {}
    masked = data.get("masked") or {}
    note = ""
    q = masked.get("mean_cosine", masked.get("perplexity_ratio"))
    if q is not None:
        what = "mean embedding cosine" if "mean_cosine" in masked else "perplexity ratio"
        note = f"<p>With the predicted masks applied, on held-out text: {what} {_num(q)} to the unmasked model.</p>"
    return (img + note + f"<p>{s.get('layers_predictor', 0)} predictor, {s.get('layers_gate_first', 0)} gate-first, "
            f"{s.get('layers_dense', 0)} dense layers; predictors are {_num(s.get('params_fraction'), '.3f')} of the "
            "FFN parameters.</p>"
            + _table(["layer", "mode", "rank", "recall", "precision", "density", "true density", "FLOPs frac"], rows, 2))


def _quantization(ir, pl: _Plotter) -> str:
    data = _ir_json(ir, "quantize/quantize.json")
    if not data:
        return _missing("the quantize pass did not run")
    tensors = data.get("tensors") or {}
    img = pl.img(lambda p: report_plots.plot_sqnr(p, tensors, "Quantization SQNR per tensor"), "sqnr")
    by: dict[str, list] = {}
    for t in tensors.values():
        by.setdefault(t["format"], []).append(t)
    rows = []
    for fmt, ts in sorted(by.items()):
        sq = [t["sqnr_db"] for t in ts if t.get("sqnr_db") is not None]
        rows.append([fmt, len(ts), sum(t["bytes"] for t in ts), sum(t["f32_bytes"] for t in ts),
                     min(sq) if sq else None, float(np.mean(sq)) if sq else None])
    return img + _table(["format", "tensors", "bytes", "f32 bytes", "min SQNR dB", "mean SQNR dB"], rows)


def _sweep(ir, pl: _Plotter) -> str:
    data = _ir_json(ir, "relufy/relufy.json")
    if not data or not data.get("sweep"):
        return _missing("no relufy sweep")
    pts = sorted(data["sweep"], key=lambda r: r.get("mean_sparsity", 0))
    key, label = ("mean_cosine", "mean embedding cosine") if "mean_cosine" in pts[0] else \
        ("perplexity_ratio", "perplexity / original")
    xs = [r["mean_sparsity"] for r in pts]
    ys = [r.get(key) for r in pts]
    img = pl.img(lambda p: plots.plot_tradeoff(p, xs, ys, label, "Magnitude-threshold sweep"), "sweep")
    rows = [[r.get("target"), r.get("mean_sparsity"), r.get(key)] for r in pts]
    for name in ("untrained", "after"):
        r = data.get(name) or {}
        if key in r:
            rows.append([f"relufy ({name})", r.get("mean_sparsity"), r.get(key)])
    return img + _table(["target / model", "mean sparsity", label], rows)


def _verify(v: dict | None) -> str:
    if not v:
        return _missing("run `sparseforge verify OUT/model.gguf --reference MODEL --json OUT/verify.json`")
    status = "<span class='pass'>PASSED</span>" if v.get("passed") else "<span class='fail'>FAILED</span>"
    keys = ["mean_cosine", "min_cosine", "perplexity_reference", "perplexity", "ppl_increase", "top1_agreement",
            "mean_kl", "mean_ffn_density", "sequences", "tokens", "mode", "data"]
    rows = [[k, v[k]] for k in keys if k in v]
    gates = [[k, g.get("value"), g.get("limit"), g.get("source"), "pass" if g.get("passed") else "FAIL"]
             for k, g in (v.get("gates") or {}).items()]
    return (f"<p>Verification {status} against <code>{_esc(Path(str(v.get('reference', ''))).name)}</code> "
            "in onnxruntime.</p>" + _table(["figure", "value"], rows)
            + _table(["gate", "value", "limit", "from", "result"], gates))


def _bench(b: dict | None, pl: _Plotter) -> str:
    if not b:
        return _missing("run `sparseforge bench OUT/model.gguf --json OUT/bench.json`")
    rt, ort = b.get("runtime") or {}, b.get("onnxruntime") or {}
    if b.get("family") == "bert":
        groups = {f"seq {L}": {**{m: r[L]["embeddings_per_s"] for m, r in rt.items()},
                               **{n: o[L]["embeddings_per_s"] for n, o in ort.items() if L in o}}
                  for L in sorted(next(iter(rt.values()), {}), key=int)}
        img = pl.img(lambda p: report_plots.plot_throughput(p, groups, "embeddings / s", "Embedding throughput"),
                     "bench")
        rows = [[g, *[v.get(s) for s in sorted(v)]] for g, v in groups.items()]
        header = ["batch", *sorted(next(iter(groups.values()), {}))]
    else:
        groups = {phase: {**{m: r[f"{phase}_tokens_per_s"] for m, r in rt.items()},
                          **{n: o[f"{phase}_tokens_per_s"] for n, o in ort.items()}} for phase in ("decode", "prefill")}
        img = pl.img(lambda p: report_plots.plot_throughput(p, groups, "tokens / s", "Decode and prefill"), "bench")
        header = ["phase", *sorted(groups["decode"])]
        rows = [[g, *[v.get(s) for s in sorted(v)]] for g, v in groups.items()]
    ratios = [[k, v] for k, v in (b.get("ratios") or {}).items()]
    m = b.get("machine") or {}
    return (img + _table(header, rows) + _table(["ratio", "x"], ratios)
            + f"<p class='muted'>Peak RSS {_num(b.get('peak_rss_mb'), '.0f')} MiB; {m.get('cpu_count')} CPUs, "
            f"load {_num(m.get('load_average_1m'), '.2f')}, onnxruntime {_esc(m.get('onnxruntime'))}.</p>")
