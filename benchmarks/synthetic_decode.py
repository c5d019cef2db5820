"""Decode speed of large Llama-shaped models at ~10% FFN activation density, against
onnxruntime on the same model, in one run.

1. **Checkpoint** (cached under ``$SPARSEFORGE_CACHE_DIR/models/``, default
   ``~/.cache/sparseforge/models/``): a Hugging Face ``LlamaForCausalLM`` directory
   (``config.json``, one safetensors shard per layer, the index) with seeded random
   float32 weights of the chosen shape: ``tinyllama`` (d 2048, n_ff 5632, 22 layers, 32
   heads / 4 KV heads, vocab 32000), ``llama2-7b`` (d 4096, n_ff 11008, 32 layers,
   vocab 32000; needs ~27 GB of disk and RAM in f32) or ``smoke`` (tiny, for tests).
   Each gate projection is built low-rank, ``W_gate = A B`` (rank ``r``), so that a
   neuron predictor of rank ``2r`` exists exactly (``relu(Bx)``, ``relu(-Bx)`` ->
   ``A``): a random full-rank gate has no low-rank predictor, a trained model's does.
2. **Thresholds**: every FFN becomes ``fatrelu(x W_gate) * (x W_up)`` with its
   threshold set layer by layer on calibration tokens run through the numpy reference
   executor (the gate's 90th percentile: 10% of the neurons fire); the density is then
   **measured** on other tokens and reported per layer.
3. **Predictors**: each layer gets the rank-``2r`` predictor above (``predictor`` mode,
   threshold = the fatrelu threshold); its cost is a real rank-``2r`` MLP per token.
4. **Convert** with the toolchain passes (``quantize`` + ``pack``): ``f32`` (no
   quantization), ``q8_0`` (every matrix Q8_0) and ``q4_0`` (FFN, attention and LM head
   Q4_0, embeddings Q8_0); and
   each once more with every layer marked gate-first instead (``{fmt}-gate-first.gguf``:
   no predictors, the gates stored apart from the bundles, as ``pack`` stores a layer
   the predictors pass made gate-first).
5. **Benchmark** (``toolchain.bench``): decode tokens/s of the sparseforge runtime in
   ``predictor`` (sparse) and ``dense`` modes on the first artifact, ``gate-first`` on
   the second (``gate_first_bundled``: ``gate-first`` mode on the first, its gates
   read from the bundles), against onnxruntime on
   the original dense model: float32 for the f32 artifact, MatMulNBits 8-bit for the
   Q8_0 artifact and 4-bit for the Q4_0 one (block 32, symmetric, ``accuracy_level`` 4 =
   int8 compute; via ``onnxruntime.quantization.matmul_nbits_quantizer`` on a MatMul
   form of the graph). onnxruntime's graph has no KV cache: its decode figure is one
   token's forward (the weight-bound cost of a decode step, attention over the past
   excluded, which favours onnxruntime). ``--rounds N`` repeats the runtime and
   onnxruntime measurements N times, back to back, and reports the round with the
   median sparse/onnxruntime ratio (every round's figures under ``rounds``): on a shared
   machine the memory bandwidth drifts by tens of percent from minute to minute, and a
   single round's ratio with it.

Targets: f32 sparse >= 2.5x onnxruntime f32; Q4_0 sparse >= 2.5x MatMulNBits 4-bit
(Q8_0: none, reported against MatMulNBits 8-bit).
Writes ``benchmarks/results/synthetic_decode[_smoke].json`` (or ``--output``).

    python benchmarks/synthetic_decode.py [--shape tinyllama] [--formats f32,q8_0,q4_0] [--rounds N] [--smoke]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, rank=128),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rank=256),
    "smoke": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, rank=8),
}
VERSION = 1
RESULTS = Path(__file__).resolve().parent / "results"


def cache_root() -> Path:
    env = os.environ.get("SPARSEFORGE_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparseforge"
    return base / "models"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- 1. checkpoint ---------------------------------------------------------------------------
def build_checkpoint(shape: str, seed: int, root: Path) -> Path:
    """The random checkpoint directory (built once, then reused)."""
    from sparseforge.toolchain.safetensors_io import write_safetensors

    s = SHAPES[shape]
    d = root / f"synthetic-{shape}-s{seed}-v{VERSION}"
    if (d / "config.json").is_file():
        return d
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    D, N, L, H, KV, V, r = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                            s["num_attention_heads"], s["num_key_value_heads"], s["vocab_size"], s["rank"])
    hd = D // H
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    weight_map, factors = {}, {}
    top = {"model.embed_tokens.weight": normal(V, D), "lm_head.weight": normal(V, D),
           "model.norm.weight": np.ones(D, np.float32)}
    write_safetensors(tmp / "model-top.safetensors", top)
    weight_map.update({k: "model-top.safetensors" for k in top})
    del top
    for i in range(L):
        p = f"model.layers.{i}."
        A, B = normal(N, r, std=1 / np.sqrt(r)), normal(r, D)
        factors[f"{i}.A"], factors[f"{i}.B"] = A, B
        t = {p + "self_attn.q_proj.weight": normal(H * hd, D), p + "self_attn.k_proj.weight": normal(KV * hd, D),
             p + "self_attn.v_proj.weight": normal(KV * hd, D), p + "self_attn.o_proj.weight": normal(D, H * hd),
             p + "mlp.gate_proj.weight": A @ B, p + "mlp.up_proj.weight": normal(N, D),
             p + "mlp.down_proj.weight": normal(D, N),
             p + "input_layernorm.weight": np.ones(D, np.float32),
             p + "post_attention_layernorm.weight": np.ones(D, np.float32)}
        name = f"model-layer{i:03d}.safetensors"
        write_safetensors(tmp / name, t)
        weight_map.update({k: name for k in t})
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    np.savez(tmp / "gate_factors.npz", **factors)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32",
                  **{k: v for k, v in s.items() if k != "rank"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(d)
    return d


# -- 2./3. thresholds and predictors ------------------------------------------------------------
def sparsify(ckpt: Path, density: float, seed: int, calib_tokens: int, eval_tokens: int):
    """The checkpoint's IR with fatrelu gates (thresholds for ``density``) and exact
    low-rank predictors; plus the measured per-layer density on other tokens."""
    from sparseforge.toolchain.frontends import load_model
    from sparseforge.toolchain.ir import ANNOTATION_PREFIX
    from sparseforge.toolchain.reference import LlamaDecoder, ffn_forward

    ir = load_model(ckpt).evolve()
    V = ir.spec.vocab_size
    rng = np.random.default_rng(seed + 1)

    def calibrate(store, block, x, *, capture=None):
        if block.activation != "fatrelu":
            g = np.asarray(x, np.float32).reshape(-1, x.shape[-1]) @ store.get_f32(block.gate).T
            block.activation, block.up_activation = "fatrelu", None
            block.activation_threshold = float(np.quantile(g, 1.0 - density))
        return ffn_forward(store, block, x, capture=capture)

    ex = LlamaDecoder(ir, ffn=calibrate)
    ex.forward(rng.integers(0, V, (1, calib_tokens)))
    active = {}

    def measure(layer, _x, h):
        active[layer] = float((h != 0).mean())

    LlamaDecoder(ir).forward(rng.integers(0, V, (1, eval_tokens)), capture=measure)
    factors = np.load(ckpt / "gate_factors.npz")
    for b in ir.blocks:
        A, B = factors[f"{b.layer}.A"], factors[f"{b.layer}.B"]
        names = {"w1": f"{ANNOTATION_PREFIX}predictor.{b.layer}.w1", "w2": f"{ANNOTATION_PREFIX}predictor.{b.layer}.w2"}
        ir.store.set(names["w1"], np.concatenate([B, -B]))       # relu(Bx), relu(-Bx)
        ir.store.set(names["w2"], np.concatenate([A, -A], 1))    # A relu(Bx) - A relu(-Bx) = A B x = gate
        b.annotations["predictor"] = {"mode": "predictor", "rank": 2 * B.shape[0],
                                      "threshold": b.activation_threshold, "tensors": names}
    return ir, [active[i] for i in sorted(active)]


# -- 4. convert ------------------------------------------------------------------------------------
QUANT = {"f32": None,
         "q8_0": dict(ffn="q8_0", attention="q8_0", other="q8_0", embeddings="q8_0", vectors="f32"),
         "q4_0": dict(ffn="q4_0", attention="q4_0", other="q4_0", embeddings="q8_0", vectors="f32")}
TARGETS = {"f32": 2.5, "q4_0": 2.5}  # sparse decode / onnxruntime's (issue targets; Q8_0 has none)


def gate_first_ir(ir):
    """``ir`` with every layer marked gate-first (what the predictors pass records for a
    dReLU layer) and no predictors: ``pack`` then stores the gates apart."""
    out = ir.evolve()
    for b in out.blocks:
        b.annotations["predictor"] = {"mode": "gate-first", "rank": 0, "threshold": None, "tensors": {}}
    return out


def convert(ir, fmt: str, dest: Path) -> Path:
    from sparseforge.toolchain.artifact_format import ARTIFACT_KEY
    from sparseforge.toolchain.pass_base import get_pass, make_options
    from sparseforge.toolchain.pass_manager import PassManager

    passes = []
    if QUANT[fmt]:
        cls = get_pass("quantize")
        passes.append(cls(make_options(cls, QUANT[fmt], "synthetic_decode")))
    cls = get_pass("pack")
    passes.append(cls(make_options(cls, {"verify": False}, "synthetic_decode")))
    result = PassManager(passes, seed=0).run(ir)
    src = Path(result.ir.files[ARTIFACT_KEY])
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(src, tmp)
    tmp.rename(dest)
    return dest


# -- 5. onnxruntime baselines ---------------------------------------------------------------------------
def ort_f32(ckpt: Path, work: Path) -> Path:
    from sparseforge.toolchain.frontends import load_model
    from sparseforge.toolchain.onnx_builder import build_onnx

    path = work / "ort-f32" / "model.onnx"
    if not path.is_file():
        build_onnx(load_model(ckpt), path.parent, ffn_outputs=False)
    return path


def ort_matmulnbits(ckpt: Path, f32_graph: Path, work: Path, bits: int) -> Path:
    """The f32 graph with every ``Gemm(x, W, transB=1)`` rewritten as ``MatMul(x, W^T)``
    (+ ``Add``), then quantized to MatMulNBits of ``bits`` (4 or 8) by onnxruntime's quantizer."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from sparseforge.toolchain.frontends import load_model

    out = work / f"ort-q{bits}" / "model.onnx"
    if out.is_file():
        return out
    mm_dir = work / "ort-matmul"
    mm_dir.mkdir(parents=True, exist_ok=True)
    store = load_model(ckpt).store
    model = onnx.load(str(f32_graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nodes, drop = [], set()
    with open(mm_dir / "wt.bin", "wb") as fh:
        for node in model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gemm" and attrs.get("transB") == 1 and node.input[1] in inits \
                    and node.input[1] in store:
                w = np.ascontiguousarray(store.get_f32(node.input[1]).T)
                name = node.input[1] + ".T"
                off = fh.tell()
                fh.write(w.tobytes())
                t = onnx.TensorProto(name=name, dims=list(w.shape), data_type=onnx.TensorProto.FLOAT,
                                     data_location=onnx.TensorProto.EXTERNAL)
                for k, v in (("location", "wt.bin"), ("offset", str(off)), ("length", str(w.nbytes))):
                    t.external_data.add(key=k, value=v)
                model.graph.initializer.append(t)
                drop.add(node.input[1])
                y = node.output[0] if len(node.input) < 3 else node.output[0] + ".mm"
                nodes.append(helper.make_node("MatMul", [node.input[0], name], [y], name=node.name + ".mm"))
                if len(node.input) >= 3:
                    nodes.append(helper.make_node("Add", [y, node.input[2]], [node.output[0]], name=node.name + ".b"))
            else:
                nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        keep = [t for t in model.graph.initializer if t.name not in drop]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        # the other external tensors (embeddings, norms) are copied into wt.bin too: onnx
        # refuses to load external data through a hard link
        for t in model.graph.initializer:
            ext = {e.key: e for e in t.external_data}
            if "location" not in ext or ext["location"].value == "wt.bin":
                continue
            with open(f32_graph.parent / ext["location"].value, "rb") as src:
                src.seek(int(ext["offset"].value) if "offset" in ext else 0)
                data = src.read(int(ext["length"].value))
            ext["location"].value = "wt.bin"
            if "offset" in ext:
                ext["offset"].value = str(fh.tell())
            else:
                t.external_data.add(key="offset", value=str(fh.tell()))
            fh.write(data)
    onnx.save(model, str(mm_dir / "model.onnx"))
    del model
    gc.collect()
    full = onnx.load(str(mm_dir / "model.onnx"))  # with its external data
    q = MatMulNBitsQuantizer(full, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    out.parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(out), use_external_data_format=True)
    del q, full
    gc.collect()
    shutil.rmtree(mm_dir, ignore_errors=True)
    return out


# -- main ---------------------------------------------------------------------------------------------
def run(shape: str, formats: list[str], density: float, seed: int, prompt_tokens: int, decode_tokens: int,
        repeats: int, output: Path, modes: tuple[str, ...], threads: tuple[int, ...], rounds: int = 1) -> dict:
    from sparseforge.toolchain.bench import bench, machine, ratios

    root = cache_root()
    t0 = time.perf_counter()
    log(f"checkpoint {shape} ...")
    ckpt = build_checkpoint(shape, seed, root)
    work = ckpt / f"work-density{density:g}"
    work.mkdir(exist_ok=True)
    log(f"checkpoint {ckpt} ({sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 2**30:.2f} GiB)")
    calib = 16 if shape == "smoke" else 64
    ir, measured = sparsify(ckpt, density, seed, calib, calib)
    log(f"thresholds set; measured density per layer {np.round(measured, 3).tolist()}")
    report = {"benchmark": "synthetic_decode", "shape": shape, **SHAPES[shape], "target_density": density,
              "measured_density": measured, "mean_measured_density": float(np.mean(measured)),
              "predictor_rank": 2 * SHAPES[shape]["rank"], "prompt_tokens": prompt_tokens,
              "decode_tokens": decode_tokens, "machine": machine(), "formats": {}}
    graphs = {"f32": ("ort_f32", lambda: ort_f32(ckpt, work)),
              "q8_0": ("ort_matmulnbits_q8", lambda: ort_matmulnbits(ckpt, ort_f32(ckpt, work), work, 8)),
              "q4_0": ("ort_matmulnbits_q4", lambda: ort_matmulnbits(ckpt, ort_f32(ckpt, work), work, 4))}
    for fmt in formats:
        art, art_gf = work / f"{fmt}.gguf", work / f"{fmt}-gate-first.gguf"
        for path, model in ((art, ir), (art_gf, None)):
            if not path.is_file():
                log(f"convert {path.name} ...")
                convert(model or gate_first_ir(ir), fmt, path)
        log(f"artifact {art.name}: {art.stat().st_size / 2**30:.2f} GiB; onnxruntime baseline ...")
        name, make = graphs[fmt]
        graph = make()
        gc.collect()
        log(f"bench {fmt} ({', '.join(modes)} vs {name}) ...")
        report["formats"][fmt] = {}
        for th in threads:
            runs = []
            for k in range(rounds):
                r = bench(art, modes=modes, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                          repeats=repeats, ort_graphs={name: graph}, threads=th)
                if "gate-first" in modes:
                    gf = bench(art_gf, modes=("gate-first",), prompt_tokens=prompt_tokens,
                               decode_tokens=decode_tokens, repeats=repeats, ort=False, threads=th)
                    r["runtime"]["gate_first_bundled"] = r["runtime"].pop("gate-first")
                    r["runtime"]["gate-first"] = gf["runtime"]["gate-first"]
                    r["gate_first_artifact"] = str(art_gf)
                    r["ratios"] = ratios(r)
                r["sparse_vs_ort"] = r["ratios"].get(f"decode_predictor_vs_{name}")
                runs.append(r)
                log(f"{fmt}, {th} thread(s), round {k + 1}/{rounds}, load {r['machine']['load_average_1m']:.1f}: "
                    + ", ".join(f"{m} {v['decode_tokens_per_s']:.2f} tok/s" for m, v in r["runtime"].items())
                    + f", {name} {r['onnxruntime'][name]['decode_tokens_per_s']:.2f} tok/s -> sparse "
                      f"{r['sparse_vs_ort']:.2f}x")
                gc.collect()
            # the round with the median ratio (each round times the runtime and onnxruntime
            # back to back; the machine's speed drifts between rounds)
            r = sorted(runs, key=lambda q: q["sparse_vs_ort"] or 0.0)[(len(runs) - 1) // 2]
            r["ort_baseline"] = name
            r["target_sparse_vs_ort"] = TARGETS.get(fmt)
            r["rounds"] = [{"sparse_tokens_per_s": q["runtime"].get("predictor", {}).get("decode_tokens_per_s"),
                            "ort_tokens_per_s": q["onnxruntime"][name]["decode_tokens_per_s"],
                            "sparse_vs_ort": q["sparse_vs_ort"]} for q in runs]
            report["formats"][fmt][f"threads_{th}"] = r
    report["seconds"] = time.perf_counter() - t0
    report["machine_after"] = machine()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(f"wrote {output}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--smoke", action="store_true", help="the tiny shape, few tokens (for tests)")
    ap.add_argument("--formats", default="f32,q8_0,q4_0")
    ap.add_argument("--density", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure runtime and onnxruntime this many times, back to back; the round with the "
                         "median ratio is reported (all rounds' figures are kept)")
    ap.add_argument("--modes", default="predictor,gate-first,dense")
    ap.add_argument("--threads", default=str(os.cpu_count() or 1),
                    help="comma-separated thread counts to measure (runtime and onnxruntime alike)")
    ap.add_argument("--output", type=Path, default=None)
    a = ap.parse_args(argv)
    shape = "smoke" if a.smoke else a.shape
    if a.smoke:
        a.prompt_tokens, a.decode_tokens, a.repeats = min(a.prompt_tokens, 8), min(a.decode_tokens, 4), 1
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in QUANT]
    if bad:
        print(f"error: --formats: unknown {bad}; choose from {', '.join(QUANT)}", file=sys.stderr)
        return 2
    output = a.output or RESULTS / f"synthetic_decode{'_smoke' if a.smoke else ('' if shape == 'tinyllama' else '_' + shape)}.json"
    run(shape, formats, a.density, a.seed, a.prompt_tokens, a.decode_tokens, a.repeats, output,
        tuple(m.strip() for m in a.modes.split(",") if m.strip()), tuple(int(t) for t in a.threads.split(",")),
        max(1, a.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
