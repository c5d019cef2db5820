"""Streaming conversion of a model larger than comfortable RAM (issue #9).

Writes a Llama-2-7B-shaped checkpoint in f16 with random weights (sharded safetensors,
one shard per layer, ~13.5 GB; written tensor by tensor, never the whole model in
memory), converts it with ``sparseforge convert`` in a child process — profile on a few
sequences, training-free thresholds (relufy ``threshold``), profile again, quantize
(Q4_0), reorder, pack — and records the wall time and peak RSS of every pass (the pass
manager's figures, sampled every 10 ms) and the peak RSS of the whole process
(``wait4``). Target: peak RSS <= 3 GB. Writes ``benchmarks/results/scale_7b-<shape>.json``.

The checkpoint is written by a separate process: Linux counts the RSS of the process
that forks the converter (up to its ``exec``) in the child's peak, so this process must
stay small.

The checkpoint and the pass cache are deleted afterwards unless ``--keep``.
``--shape smoke`` / ``small`` / ``1b`` run the same pipeline on smaller shapes (seconds /
half a minute / a few minutes).
The 7B shape needs ~14 GB free for the checkpoint plus the cache (see the disk check) and
refuses to start on a loaded machine (``--max-load``) unless ``--force``.

    python benchmarks/scale_7b.py --shape smoke
    python benchmarks/scale_7b.py --shape llama2-7b --work /big/disk/scale7b
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# (hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "1b": (2048, 5504, 16, 16, 16, 32000),  # ~0.94 B parameters: how memory and time scale
    "small": (512, 1408, 4, 8, 8, 32000),
    "smoke": (64, 160, 2, 4, 2, 128),
}
PROFILE = """
[[pass]]
name = "profile"
[pass.options]
calib = "{calib}"
seq_len = {seq_len}
num_sequences = {sequences}
heldout_fraction = 0.25
batch_size = 1
max_samples = 256
{streaming}"""
RECIPE = """
name = "scale-7b"
{profile}
[[pass]]
name = "relufy"
[pass.options]
mode = "threshold"
target_sparsity = 0.9
eval_sequences = 1
sweep = []
{profile}
[[pass]]
name = "quantize"
[pass.options]
ffn = "q4_0"
attention = "q4_0"
embeddings = "q4_0"
other = "q4_0"
[[pass]]
name = "reorder"
[[pass]]
name = "pack"
"""
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def layout(shape: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(shard file, [(tensor, shape)]) of the checkpoint: embeddings and head, one shard a layer."""
    d, n, layers, heads, kv, vocab = SHAPES[shape]
    hd = d // heads
    shards = [("model-embed.safetensors", [("model.embed_tokens.weight", (vocab, d)),
                                           ("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))])]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append((f"model-{i:05d}.safetensors", [
            (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (heads * hd, d)), (p + "self_attn.k_proj.weight", (kv * hd, d)),
            (p + "self_attn.v_proj.weight", (kv * hd, d)), (p + "self_attn.o_proj.weight", (d, heads * hd)),
            (p + "mlp.gate_proj.weight", (n, d)), (p + "mlp.up_proj.weight", (n, d)),
            (p + "mlp.down_proj.weight", (d, n))]))
    return shards


def build_checkpoint(shape: str, directory: Path, seed: int = 0) -> Path:
    """Write the f16 checkpoint shard by shard (peak memory: one layer)."""
    from sparseforge.toolchain.safetensors_io import write_safetensors

    if (directory / "config.json").is_file():
        return directory
    d, n, layers, heads, kv, vocab = SHAPES[shape]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for file, tensors in layout(shape):
        arrays = {}
        for name, dims in tensors:
            if len(dims) == 1:
                arrays[name] = (1.0 + 0.1 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float16)
            else:
                arrays[name] = (0.02 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float16)
            weight_map[name] = file
        write_safetensors(directory / file, arrays)
        del arrays
    total = sum((directory / f).stat().st_size for f, _ in layout(shape))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=d, intermediate_size=n,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                  hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float16")
    (directory / "config.json").write_text(json.dumps(config, indent=1))  # last: marks the checkpoint complete
    return directory


def convert(ckpt: Path, work: Path, seq_len: int, sequences: int, vocab: int, streaming: str = "auto") -> dict:
    """``sparseforge convert`` in a child process (no pass cache: it would hold another
    copy of the model on disk); its report plus the child's peak RSS."""
    calib = work / "ids.npy"  # random token ids (the checkpoint has no tokenizer)
    np.save(calib, np.random.default_rng(0).integers(3, vocab, size=(sequences + 2, seq_len)))
    recipe = work / "recipe.toml"
    mode = "" if streaming == "auto" else f'streaming = "{streaming}"\n'
    recipe.write_text(RECIPE.format(profile=PROFILE.format(seq_len=seq_len, sequences=sequences, calib=calib,
                                                           streaming=mode)))
    out = work / "out"
    cmd = [str(Path(sys.executable).with_name("sparseforge")), "convert", str(ckpt), "-r", str(recipe),
           "-o", str(out), "--no-cache", "--json", "--workers", "1"]
    t0 = time.perf_counter()
    with open(work / "convert.stdout", "w") as so, open(work / "convert.stderr", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    result = {"command": cmd, "exit_code": proc.returncode, "wall_s": wall,
              "process_peak_rss_mb": usage.ru_maxrss / 1024}
    if proc.returncode != 0:
        result["stderr_tail"] = (work / "convert.stderr").read_text()[-3000:]
        return result
    report = json.loads((work / "convert.stdout").read_text())
    result["passes"] = [{"name": r["name"], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                         "rss_start_mb": r["rss_start_mb"]} for r in report["passes"]]
    result["artifact_bytes"] = (out / "model.gguf").stat().st_size
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smoke")
    ap.add_argument("--work", type=Path, default=None,
                    help="Working directory (default: $TMPDIR/sparseforge-scale-SHAPE).")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and the cache.")
    ap.add_argument("--streaming", choices=("auto", "always", "never"), default="auto",
                    help="The profile passes' streaming option (auto: layer-streamed above its memory budget).")
    ap.add_argument("--max-load", type=float, default=3.0, help="Refuse to start above this 1-minute load.")
    ap.add_argument("--force", action="store_true", help="Start whatever the load.")
    args = ap.parse_args(argv)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"sparseforge-scale-{args.shape}"
    d, n, layers, heads, kv, vocab = SHAPES[args.shape]
    params = layers * (2 * d * heads * (d // heads) + 2 * d * kv * (d // heads) + 3 * d * n + 2 * d) + 2 * vocab * d + d
    need = 2 * params * 2.2  # the f16 checkpoint, plus the cache and output
    free = shutil.disk_usage(work.parent if work.parent.exists() else "/").free
    load = os.getloadavg()[0]
    if not args.force and (load > args.max_load or free < need):
        log(f"not starting: load {load:.1f} (max {args.max_load}), disk free {free / 1e9:.1f} GB "
            f"(need ~{need / 1e9:.1f} GB); --force to start anyway")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "scale_7b", "shape": args.shape, "params": params, "checkpoint_dtype": "f16",
              "seq_len": args.seq_len, "sequences": args.sequences, "streaming": args.streaming, "load_at_start": load,
              "benchmark_rss_mb_at_convert": None, "target_peak_rss_mb": 3072}
    try:
        t0 = time.perf_counter()
        ckpt = work / "checkpoint"
        writer = multiprocessing.get_context("spawn").Process(target=build_checkpoint, args=(args.shape, ckpt))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the checkpoint failed (exit {writer.exitcode})")
        report["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.iterdir())
        report["checkpoint_write_s"] = time.perf_counter() - t0
        log(f"checkpoint: {report['checkpoint_bytes'] / 1e9:.2f} GB in {report['checkpoint_write_s']:.0f} s")
        from sparseforge.toolchain.instruments import rss_bytes

        report["benchmark_rss_mb_at_convert"] = rss_bytes() / 2**20  # bounds what fork/exec adds to the peak
        report["convert"] = convert(ckpt, work, args.seq_len, args.sequences, vocab, args.streaming)
        c = report["convert"]
        for p in c.get("passes", []):
            log(f"  {p['name']:<10} {p['wall_s']:8.1f} s  peak RSS {p['peak_rss_mb']:8.0f} MiB")
        log(f"convert: exit {c['exit_code']}, {c['wall_s']:.0f} s, process peak RSS {c['process_peak_rss_mb']:.0f} MiB"
            f" (target 3072)")
        report["within_target"] = c["exit_code"] == 0 and c["process_peak_rss_mb"] <= 3072
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scale_7b-{args.shape}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {path}")
    return 0 if report.get("within_target") else 1


if __name__ == "__main__":
    sys.exit(main())
