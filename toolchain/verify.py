"""``sparseforge verify``: the artifact against the original model, with quality gates.

The original model (``--reference``: checkpoint directory, ``.onnx`` file or IR
directory) runs in onnxruntime (its own ONNX graph, or one built from it by
:mod:`.onnx_builder`); the artifact runs in the sparseforge runtime (:mod:`.runtime`,
default mode ``sparse``), both on the same held-out sequences:

* by default the calibration held-out split the conversion kept apart: rebuilt from the
  artifact's recipe (the first ``profile`` pass's ``calib``, ``seq_len`` and
  ``heldout_fraction`` and the recipe seed; :func:`~.calibration.build_calibration` is
  deterministic), tokenized with the artifact's tokenizer (or the reference's);
* or ``data``: a text / JSONL / directory / ``.npy`` source as for ``--calib``.

Figures: encoders - mean and minimum cosine of the sentence embeddings (mean pooling,
L2-normalised); decoders - perplexity of both, its relative increase, top-1 agreement
of the next-token predictions and the mean KL divergence ``KL(reference || artifact)``
of the next-token distributions, over every real next-token position.

Gates (a gate fails -> ``passed`` false, exit 1 from the CLI): ``min_cosine`` (mean
cosine, encoders; default 0.98) and ``max_ppl_increase`` (relative perplexity
increase, decoders; default 0.05). Values given explicitly win; otherwise a ``[verify]``
table in the recipe file passed as ``recipe`` or in the artifact's recorded recipe,
else the defaults.
"""
from __future__ import annotations

import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact_format as F
from .calibration import Sequences, build_calibration
from .errors import InputError
from .ir import ModelIR
from .recipe import VERIFY_GATES, verify_table

_CHECKED_DIMS = ("family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size")


def resolve_gates(explicit: dict[str, float | None], recipe: str | Path | None,
                  artifact_recipe: dict[str, Any] | None) -> tuple[dict[str, float], dict[str, str]]:
    """Gate values and where each came from (``option``, ``recipe``, ``artifact``, ``default``)."""
    from_recipe: dict[str, Any] = {}
    if recipe is not None:
        p = Path(recipe)
        if not p.is_file():
            raise InputError(p, "recipe file not found")
        try:
            from_recipe = verify_table(tomllib.loads(p.read_text(encoding="utf-8")), p)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(p, f"invalid TOML: {exc}") from None
    from_artifact = dict((artifact_recipe or {}).get("verify") or {})
    gates, source = {}, {}
    for key, default in VERIFY_GATES.items():
        for where, table in (("option", explicit), ("recipe", from_recipe), ("artifact", from_artifact)):
            value = table.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(recipe if where == "recipe" else None, f"verify gate {key} must be a number")
                gates[key], source[key] = float(value), where
                break
        else:
            gates[key], source[key] = default, "default"
    return gates, source


def load_reference(reference: str | Path, spec) -> ModelIR:
    """The reference model's IR; an architecture that does not match the artifact is an InputError."""
    from .frontends import load_model

    ref = load_model(reference)
    a, b = ref.spec.to_dict(), spec.to_dict()
    bad = [k for k in _CHECKED_DIMS if a.get(k) != b.get(k)]
    if bad:
        raise InputError(reference, "is not the artifact's model: " + ", ".join(
            f"{k} {a.get(k)} != {b.get(k)}" for k in bad[:3]))
    return ref


def _profile_options(artifact_recipe: dict[str, Any]) -> dict[str, Any]:
    for p in artifact_recipe.get("passes", []):
        if p.get("name") == "profile":
            return dict(p.get("options") or {})
    return {}


def heldout_sequences(rt, ref: ModelIR, *, data: str | Path | None, num_sequences: int, seq_len: int | None,
                      tmp: Path) -> tuple[Sequences, str]:
    """The evaluation sequences and a description of where they came from."""
    art = rt.model.artifact
    recipe = art.metadata.get(F.K_RECIPE) or {}
    opts = _profile_options(recipe)
    tokenizer = ref.tokenizer
    if tokenizer is None and art.tokenizer_json:
        tokenizer = str(tmp / "tokenizer.json")
        Path(tokenizer).write_text(art.tokenizer_json, encoding="utf-8")
    if seq_len and seq_len > rt.spec.max_positions:
        raise InputError(None, f"--seq-len {seq_len} exceeds the model's {rt.spec.max_positions} positions")
    seq_len = min(seq_len or int(opts.get("seq_len") or 128), rt.spec.max_positions)
    common = dict(tokenizer=tokenizer, vocab_size=rt.spec.vocab_size, seq_len=seq_len,
                  pad_id=rt.spec.pad_token_id or 0)
    if data is not None:
        calib = build_calibration(data, num_sequences=max(num_sequences, 1), heldout_fraction=0.0, seed=0, **common)
        seqs, what = calib.train, f"{data}"
    else:
        calib_src = opts.get("calib")
        if calib_src and not Path(calib_src).exists():
            raise InputError(calib_src, "the artifact's calibration data is not here; pass --data")
        calib = build_calibration(calib_src, num_sequences=int(opts.get("num_sequences") or 256),
                                  heldout_fraction=float(opts.get("heldout_fraction") or 0.1),
                                  seed=int(recipe.get("seed", 0)), **common)
        seqs = calib.heldout if len(calib.heldout) else calib.train
        what = f"held-out calibration split ({calib_src or 'default text'})"
    if num_sequences > 0 and len(seqs) > num_sequences:
        seqs = Sequences(seqs.ids[:num_sequences], seqs.lengths[:num_sequences])
    return seqs, what


def reference_session(ref: ModelIR, work: Path, threads: int | None = None):
    """An onnxruntime session of the reference model (its ONNX file, or a graph built from it)."""
    from .ffn_tap import FFNTap
    from .onnx_builder import build_onnx

    graph = Path(ref.graph) if ref.graph else build_onnx(ref, work / "reference", ffn_outputs=False).path
    return FFNTap(graph, [], threads=threads)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def verify(artifact: str | Path, reference: str | Path, *, data: str | Path | None = None,
           num_sequences: int = 64, seq_len: int | None = None, batch_size: int = 8, mode: str = "sparse",
           min_cosine: float | None = None, max_ppl_increase: float | None = None,
           recipe: str | Path | None = None, threads: int | None = None, kv_cache: str = "f32") -> dict[str, Any]:
    """Run both models on the same sequences; returns the report (``passed``, ``gates``,
    figures). ``kv_cache``: a decoder's keys and values as its runtime caches them
    (``f32``, ``f16``). Bad input (artifact, reference, data) raises InputError."""
    from .runtime import load_runtime

    t0 = time.perf_counter()
    rt = load_runtime(artifact, mode=mode, linear="dequantize", kv_cache=kv_cache)  # whole sequences: batched matmuls
    art = rt.model.artifact
    gates, gate_source = resolve_gates({"min_cosine": min_cosine, "max_ppl_increase": max_ppl_increase},
                                       recipe, art.metadata.get(F.K_RECIPE))
    ref = load_reference(reference, rt.spec)
    report: dict[str, Any] = {
        "artifact": str(art.path), "reference": str(Path(reference)), "mode": mode, "family": rt.spec.family,
        **({"kv_cache": kv_cache} if rt.spec.causal else {}),
        "layer_modes": rt.ffn.modes,
        "reference_is_source": _source_matches(ref, art),
    }
    with tempfile.TemporaryDirectory(prefix="sparseforge-verify-") as tmp:
        seqs, what = heldout_sequences(rt, ref, data=data, num_sequences=num_sequences, seq_len=seq_len,
                                       tmp=Path(tmp))
        report.update(data=what, sequences=len(seqs), tokens=seqs.num_tokens)
        session = reference_session(ref, Path(tmp), threads)
        figures = _compare_encoder(rt, session, seqs, batch_size) if not rt.spec.causal \
            else _compare_decoder(rt, session, seqs, batch_size)
    report.update(figures)
    report["ffn_density"] = rt.ffn.density()
    report["mean_ffn_density"] = float(np.nanmean(report["ffn_density"]))
    checks = {}
    if rt.spec.causal:
        checks["max_ppl_increase"] = {"limit": gates["max_ppl_increase"], "value": report["ppl_increase"],
                                      "passed": report["ppl_increase"] <= gates["max_ppl_increase"]}
    else:
        checks["min_cosine"] = {"limit": gates["min_cosine"], "value": report["mean_cosine"],
                                "passed": report["mean_cosine"] >= gates["min_cosine"]}
    for k, c in checks.items():
        c["source"] = gate_source[k]
    report["gates"] = checks
    report["passed"] = all(c["passed"] for c in checks.values())
    report["seconds"] = time.perf_counter() - t0
    rt.model.close()
    return report


def _source_matches(ref: ModelIR, art) -> bool | None:
    from .artifact_build import source_digest

    try:
        return source_digest(ref) == art.metadata.get(F.K_SOURCE_SHA256)
    except OSError:
        return None


def _compare_encoder(rt, session, seqs: Sequences, batch_size: int) -> dict[str, Any]:
    from .quality import _pooled

    cos = []
    for ids, mask in seqs.batches(batch_size):
        want = _pooled(session.run_with_output(ids, mask)[0], mask)
        got = rt.embed_ids(ids, mask).astype(np.float64)
        cos.append((want * got).sum(1))
    cos = np.concatenate(cos)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "cosine_quantiles": {q: float(np.quantile(cos, float(q))) for q in ("0.01", "0.1", "0.5")}}


def _compare_decoder(rt, session, seqs: Sequences, batch_size: int) -> dict[str, Any]:
    nll_ref = nll = kl = 0.0
    agree = n = 0
    for ids, mask in seqs.batches(batch_size):
        ref_logits = session.run_with_output(ids, mask)[0]
        for b in range(ids.shape[0]):
            L = int(mask[b].sum())
            if L < 2:
                continue
            lp_ref = _log_softmax(ref_logits[b, : L - 1])
            lp = _log_softmax(rt.forward(ids[b, :L], all_logits=True)[: L - 1])
            target = ids[b, 1:L]
            rows = np.arange(L - 1)
            nll_ref -= lp_ref[rows, target].sum()
            nll -= lp[rows, target].sum()
            kl += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
            agree += int((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
            n += L - 1
    if n == 0:
        raise InputError(None, "no evaluation sequence has two tokens or more")
    ppl_ref, ppl = float(np.exp(nll_ref / n)), float(np.exp(nll / n))
    return {"perplexity_reference": ppl_ref, "perplexity": ppl, "ppl_increase": ppl / ppl_ref - 1.0,
            "top1_agreement": agree / n, "mean_kl": kl / n, "predicted_tokens": n}
