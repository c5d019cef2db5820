"""Train a tiny Llama-family decoder from scratch on the Python standard library's source.

Pretrained decoders cannot be downloaded everywhere, so this builds one from text every
machine has: the ``.py`` files of the running interpreter's standard library.

Corpus
    Every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path,
    except ``site-packages``/``dist-packages``, test code and test data (any directory
    named ``test``, ``tests`` or ``idle_test``: ``test/``, ``unittest/test``,
    ``lib2to3/tests``, ``idlelib/idle_test``, ...), the build-specific
    ``_sysconfigdata*`` module, empty files and files that are not valid UTF-8. A file
    is held out when ``sha256(relative path) mod 10000 < 500`` (~5%), the rest is for
    training. The corpus differs between Python versions (and patch releases), so the
    Python version and a digest of both file lists (paths and contents) go into
    ``train_log.json`` and into the output directory's name.

Tokenizer
    Byte-level BPE (``tokenizers``) trained on the train files; ``<pad>`` = 0, ``<s>`` =
    1, ``</s>`` = 2, ``<unk>`` = 3; a TemplateProcessing post-processor puts ``<s>``
    before every sequence. Saved as ``tokenizer.json`` (+ ``tokenizer_config.json``).

Model and training
    ``transformers.LlamaForCausalLM`` from scratch (SwiGLU, RMSNorm, RoPE, GQA, untied
    LM head), float32 on CPU, AdamW, linear warmup then cosine decay. Training windows
    are ``<s>`` + ``seq_len - 1`` tokens of the train token stream (the train files'
    tokens in path order, each file followed by ``</s>``), cut at an offset drawn per
    epoch and visited in a seeded random order. Held-out windows are made like the
    toolchain's calibration windows (``calibration.tokenize_windows``: ``<s>`` + up to
    ``seq_len - 1`` tokens of one file); perplexity counts every predicted token.
    A unigram model of the train stream (add-one smoothing) gives a baseline.

Output (an ordinary Hugging Face checkpoint directory)
    ``config.json``, ``model.safetensors``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``train_log.json`` (settings, corpus
    digest, Python version, timings, perplexity curve) and ``heldout.jsonl`` (held-out
    files as ``{"path", "text"}`` records, about ``heldout_chars`` characters in all),
    written to a temporary directory and renamed when complete. Default location:
    ``$SPARSEFORGE_CACHE_DIR/models/tiny-llama-stdlib-<digest>`` (default cache
    ``~/.cache/sparseforge``), where the digest covers the settings, the corpus and the
    Python version. A complete model already there is reused without training.

Results depend slightly on the thread count and the CPU (float reduction order).

    python benchmarks/train_tiny_llama.py [--out DIR] [--steps N] [--smoke] [--threads N]

The last line printed is the model directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from sparseforge.toolchain.atomic import atomic_dir
from sparseforge.toolchain.calibration import tokenize_windows

#: bump when a change to this script changes what it produces
SCRIPT_VERSION = 1

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
HELDOUT_PER_10000 = 500
PROGRESS_EVERY = 25  # print a progress line every this many steps (between evaluations)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "train_log.json", "heldout.jsonl")


@dataclasses.dataclass(frozen=True)
class Settings:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704  # ~2.75 x hidden, a multiple of 32
    max_positions: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 64  # periodic evaluation: this many held-out windows
    eval_batch: int = 32
    heldout_chars: int = 300_000  # heldout.jsonl size
    #: smoke runs: use only this many (small) train / held-out files
    max_train_files: int | None = None
    max_heldout_files: int | None = None
    max_file_chars: int | None = None


SMOKE = Settings(
    vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160,
    max_positions=128, seq_len=64, batch_size=8, steps=20, lr=3e-3, warmup_steps=4, eval_every=10,
    eval_windows=8, eval_batch=8, heldout_chars=12_000, max_train_files=8, max_heldout_files=2,
    max_file_chars=20_000,
)


# ----------------------------------------------------------------------------- corpus

@dataclasses.dataclass
class Corpus:
    root: str
    train: list[tuple[str, str]]  # (relative path, text), sorted by path
    heldout: list[tuple[str, str]]  # sorted by the hash of the path
    digest: str

    def info(self) -> dict:
        return {
            "stdlib": self.root,
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "digest": self.digest,
            "train_files": len(self.train),
            "train_chars": sum(len(t) for _, t in self.train),
            "heldout_files": len(self.heldout),
            "heldout_chars": sum(len(t) for _, t in self.heldout),
            "heldout_paths": [p for p, _ in self.heldout],
            "train_paths": [p for p, _ in self.train],
        }


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")


def is_heldout(rel: str) -> bool:
    return _path_hash(rel) % 10000 < HELDOUT_PER_10000


def stdlib_files(root: Path) -> list[tuple[str, str]]:
    """(relative posix path, text) of the stdlib's source files, sorted by path."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in SKIP_DIRS for p in parts[:-1]) or parts[-1].startswith("_sysconfigdata"):
            continue
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            out.append((rel, text))
    out.sort(key=lambda item: item[0])
    return out


def load_corpus(s: Settings) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise SystemExit(f"no Python source files found under {root}")
    train = [f for f in files if not is_heldout(f[0])]
    heldout = sorted((f for f in files if is_heldout(f[0])), key=lambda f: (_path_hash(f[0]), f[0]))
    if s.max_file_chars is not None:
        train = [f for f in train if len(f[1]) <= s.max_file_chars]
        heldout = [f for f in heldout if len(f[1]) <= s.max_file_chars]
    if s.max_train_files is not None:  # a spread of files, not just the first directory
        train = sorted(train, key=lambda f: (_path_hash(f[0]), f[0]))[: s.max_train_files]
        train.sort(key=lambda f: f[0])
    if s.max_heldout_files is not None:
        heldout = heldout[: s.max_heldout_files]
    if not train or not heldout:
        raise SystemExit(f"the corpus under {root} has {len(train)} train and {len(heldout)} held-out files")
    h = hashlib.sha256()
    for split, items in (("train", train), ("heldout", heldout)):
        for rel, text in items:
            h.update(f"{split}\0{rel}\0{hashlib.sha256(text.encode('utf-8')).hexdigest()}\n".encode())
    return Corpus(str(root), train, heldout, h.hexdigest())


def heldout_records(corpus: Corpus, max_chars: int) -> list[dict]:
    """Held-out files (in hash order) until ``max_chars``; the last one may be cut at a line end."""
    records, total = [], 0
    for rel, text in corpus.heldout:
        room = max_chars - total
        if room <= 0:
            break
        if len(text) > room:
            cut = text.rfind("\n", 0, room)
            if cut < min(2000, room // 2):
                break
            text = text[: cut + 1]
        records.append({"path": rel, "text": text})
        total += len(text)
    return records


def run_digest(s: Settings, corpus: Corpus) -> str:
    blob = json.dumps({"script_version": SCRIPT_VERSION, "settings": dataclasses.asdict(s),
                       "corpus": corpus.digest, "python": platform.python_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)])
    tok.no_padding()
    tok.no_truncation()
    return tok


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """The texts' tokens (no specials), each text followed by ``</s>``, as one int64 array."""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int64))
        parts.append(np.array([EOS_ID], dtype=np.int64))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- training

def lr_at(step: int, s: Settings) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, cosine to ``min_lr_ratio``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class WindowSampler:
    """Batches of ``<s>`` + ``seq_len - 1`` stream tokens: each epoch cuts the stream at a
    random offset into non-overlapping chunks and visits them in a random order."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.stream, self.body, self.batch = stream, seq_len - 1, batch_size
        if len(stream) < self.body + 1:
            raise SystemExit(f"train stream of {len(stream)} tokens is shorter than one window")
        self.rng = np.random.default_rng(seed)
        self.epoch, self.queue = 0, np.empty(0, np.int64)

    def _refill(self) -> None:
        offset = int(self.rng.integers(0, self.body)) if len(self.stream) >= 2 * self.body else 0
        n = (len(self.stream) - offset) // self.body
        starts = offset + self.body * np.arange(n, dtype=np.int64)
        self.queue = np.concatenate([self.queue, starts[self.rng.permutation(n)]])
        self.epoch += 1

    def next(self) -> np.ndarray:
        while len(self.queue) < self.batch:
            self._refill()
        starts, self.queue = self.queue[: self.batch], self.queue[self.batch:]
        out = np.empty((self.batch, self.body + 1), np.int64)
        out[:, 0] = BOS_ID
        for i, st in enumerate(starts):
            out[i, 1:] = self.stream[st: st + self.body]
        return out

    @property
    def epochs_done(self) -> float:
        n = max(1, len(self.stream) // self.body)
        return self.epoch - len(self.queue) / n


def pad_windows(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(w) for w in windows)
    ids = np.full((len(windows), width), PAD_ID, np.int64)
    mask = np.zeros((len(windows), width), np.int64)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = w
        mask[i, : len(w)] = 1
    return ids, mask


def perplexity(model, windows: list[np.ndarray], batch: int) -> tuple[float, int]:
    """exp(mean NLL) of every token after the first of each window, and the token count."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids, mask = (torch.from_numpy(a) for a in pad_windows(windows[i: i + batch]))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    model.train()
    return math.exp(nll / count), count


def unigram_perplexity(train_stream: np.ndarray, windows: list[np.ndarray], vocab_size: int) -> float:
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([w[1:] for w in windows])
    return float(np.exp(-logp[targets].mean()))


def train(s: Settings, corpus: Corpus, out: Path, threads: int, digest: str) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(threads)
    torch.manual_seed(s.seed)

    def say(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    say(f"corpus: {len(corpus.train)} train files, {len(corpus.heldout)} held-out files "
        f"(Python {platform.python_version()}, {corpus.root}, digest {corpus.digest[:12]})")
    tok = train_tokenizer([t for _, t in corpus.train], s.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": s.max_positions,
        "add_bos_token": True,
    }, indent=1) + "\n")
    stream = token_stream(tok, [t for _, t in corpus.train])
    vocab = tok.get_vocab_size()
    say(f"tokenizer: vocab {vocab}, train stream {len(stream)} tokens "
        f"({sum(len(t) for _, t in corpus.train) / len(stream):.2f} chars/token)")

    records = heldout_records(corpus, s.heldout_chars)
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tok_path = str(out / "tokenizer.json")
    all_windows = tokenize_windows([t for _, t in corpus.heldout], tok_path, s.seq_len, out)
    jsonl_windows = tokenize_windows([r["text"] for r in records], tok_path, s.seq_len, out)
    pick = np.random.default_rng(s.seed + 1).permutation(len(all_windows))[: s.eval_windows]
    eval_windows = [all_windows[i] for i in sorted(pick)]
    unigram = {
        "heldout_all": unigram_perplexity(stream, all_windows, vocab),
        "heldout_jsonl": unigram_perplexity(stream, jsonl_windows, vocab),
        "eval_subset": unigram_perplexity(stream, eval_windows, vocab),
    }
    say(f"held-out: {sum(len(w) - 1 for w in all_windows)} tokens in {len(all_windows)} windows; "
        f"heldout.jsonl {len(records)} files, {sum(len(w) - 1 for w in jsonl_windows)} tokens; "
        f"unigram ppl {unigram['heldout_all']:.1f}")

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        hidden_act="silu", max_position_embeddings=s.max_positions, rms_norm_eps=s.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        attention_bias=False, mlp_bias=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters, d={s.hidden_size} L={s.num_layers} "
        f"heads={s.num_heads}/{s.num_kv_heads} ffn={s.intermediate_size}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8)
    sampler = WindowSampler(stream, s.seq_len, s.batch_size, s.seed)
    curve: list[dict] = []
    ppl0, _ = perplexity(model, eval_windows, s.eval_batch)
    curve.append({"step": 0, "heldout_ppl": ppl0, "elapsed_s": round(time.time() - t_start, 1)})
    t_train = time.time()
    eval_time, loss_sum, loss_n = 0.0, 0.0, 0
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        ids = torch.from_numpy(sampler.next())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        if (step + 1) % PROGRESS_EVERY == 0 and (step + 1) % s.eval_every:
            rate = (step + 1) / (time.time() - t_train - eval_time)
            say(f"step {step + 1}/{s.steps}  loss {float(loss.detach()):.3f}  "
                f"{rate * s.batch_size * s.seq_len:.0f} tok/s")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            t_eval = time.time()
            ppl, _ = perplexity(model, eval_windows, s.eval_batch)
            eval_time += time.time() - t_eval
            train_loss = loss_sum / loss_n
            curve.append({"step": step + 1, "train_loss": round(train_loss, 4), "train_ppl": math.exp(train_loss),
                          "heldout_ppl": ppl, "lr": lr_at(step, s), "grad_norm": round(grad_norm, 3),
                          "epochs": round(sampler.epochs_done, 3), "elapsed_s": round(time.time() - t_start, 1)})
            loss_sum, loss_n = 0.0, 0
            rate = (step + 1) / (time.time() - t_train - eval_time)
            say(f"step {step + 1}/{s.steps}  train loss {train_loss:.3f} (ppl {math.exp(train_loss):.1f})  "
                f"held-out ppl {ppl:.2f}  lr {lr_at(step, s):.2e}  {rate * s.batch_size * s.seq_len:.0f} tok/s")
    train_time = time.time() - t_train

    t_eval = time.time()
    final_all, n_all = perplexity(model, all_windows, s.eval_batch)
    final_jsonl, n_jsonl = perplexity(model, jsonl_windows, s.eval_batch)
    final_eval_time = time.time() - t_eval
    say(f"final held-out ppl {final_all:.2f} on {n_all} tokens (unigram {unigram['heldout_all']:.1f}); "
        f"heldout.jsonl ppl {final_jsonl:.2f} on {n_jsonl} tokens (unigram {unigram['heldout_jsonl']:.1f})")

    model.save_pretrained(out, safe_serialization=True)
    return {
        "complete": True,
        "script": "benchmarks/train_tiny_llama.py",
        "script_version": SCRIPT_VERSION,
        "run_digest": digest,
        "settings": dataclasses.asdict(s),
        "corpus": corpus.info(),
        "tokenizer": {"vocab_size": vocab, "special_tokens": dict(zip(SPECIAL_TOKENS, range(4))),
                      "post_processor": "<s> $A", "train_stream_tokens": int(len(stream)),
                      "heldout_tokens": int(sum(len(w) - 1 for w in all_windows))},
        "heldout_jsonl": {"files": [r["path"] for r in records], "chars": sum(len(r["text"]) for r in records),
                          "tokens": n_jsonl, "windows": len(jsonl_windows)},
        "model": {"parameters": n_params, "config": config.to_dict()},
        "training": {"steps": s.steps, "tokens_seen": s.steps * s.batch_size * s.seq_len,
                     "epochs": round(sampler.epochs_done, 3), "threads": threads,
                     "train_time_s": round(train_time, 1), "periodic_eval_time_s": round(eval_time, 1),
                     "final_eval_time_s": round(final_eval_time, 1),
                     "total_time_s": round(time.time() - t_start, 1),
                     "cpu_time_s": round(time.process_time() - cpu_start, 1),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "curve": curve,
        "final": {"heldout_ppl": final_all, "heldout_tokens": n_all,
                  "heldout_jsonl_ppl": final_jsonl, "heldout_jsonl_tokens": n_jsonl,
                  "unigram_ppl": unigram},
    }


# ------------------------------------------------------------------------------- main

def default_cache_dir() -> Path:
    env = os.environ.get("SPARSEFORGE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparseforge"


def existing_run(out: Path) -> dict | None:
    """The train log of a complete model in ``out``, or None."""
    if not all((out / f).is_file() for f in REQUIRED_FILES):
        return None
    try:
        log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return log if isinstance(log, dict) and log.get("complete") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: $SPARSEFORGE_CACHE_DIR/models/tiny-llama-stdlib-<digest>)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 800; smoke: 20)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, ~20 steps on a few files (for tests/CI)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2)")
    ap.add_argument("--force", action="store_true", help="retrain even if --out holds a model")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    s = SMOKE if args.smoke else Settings()
    if args.steps is not None:
        if args.steps < 1:
            ap.error("--steps must be >= 1")
        s = dataclasses.replace(s, steps=args.steps, eval_every=min(s.eval_every, args.steps),
                                warmup_steps=min(s.warmup_steps, max(1, args.steps // 10)))
    corpus = load_corpus(s)
    digest = run_digest(s, corpus)
    name = f"tiny-llama-stdlib{'-smoke' if args.smoke else ''}-{digest[:12]}"
    out = (args.out or default_cache_dir() / "models" / name).expanduser().absolute()

    if out.exists() and not args.force:
        log = existing_run(out)
        if log is None:
            print(f"error: {out} exists and is not a complete model written by this script "
                  f"(remove it or pass --force)", file=sys.stderr)
            return 2
        if log.get("run_digest") != digest:
            print(f"error: {out} holds a model trained with other settings or another corpus "
                  f"(run digest {str(log.get('run_digest'))[:12]} != {digest[:12]}; pass --force to retrain)",
                  file=sys.stderr)
            return 2
        final = log.get("final", {})
        print(f"cached: {out} (held-out ppl {final.get('heldout_ppl', float('nan')):.2f}, "
              f"trained in {log.get('training', {}).get('train_time_s', '?')} s)")
        print(out)
        return 0

    with atomic_dir(out) as tmp:
        log = train(s, corpus, tmp, args.threads, digest)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
