"""Calibration data: token sequences drawn deterministically from text or token ids.

Sources (``load_documents``): a UTF-8 text file (one document), a directory of text
files (``*.txt``, ``*.md``, ``*.rst``, ``*.text``; one document each, in path order),
JSONL with a ``text`` field per line (one document per line), or a ``.npy`` array of
token ids (2-D: one sequence per row; 1-D: a token stream). With no source the
package's default text (``toolchain/data/calibration.jsonl``) is used.

Text is tokenized with the model's own ``tokenizer.json`` without special tokens, cut
into windows of ``seq_len - specials`` tokens, and each window gets the tokenizer's
special tokens (``[CLS] .. [SEP]``, ``<s>``). The windows are shuffled with the seed;
the first ``heldout_fraction`` go to the held-out split, the next ``num_sequences`` to
the calibration split.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import InputError
from .safetensors_io import SafetensorsFile

if TYPE_CHECKING:
    from .ir import ModelIR

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@dataclass
class Sequences:
    """Right-padded token ids ``ids`` [N, seq_len] int64 with real lengths ``lengths`` [N]."""

    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def mask(self) -> np.ndarray:
        """Attention mask [N, seq_len] int64: 1 for real tokens, 0 for padding."""
        return (np.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def head(self, n: int) -> "Sequences":
        """The first ``n`` sequences (``n <= 0``: all)."""
        return self if n <= 0 or n >= len(self) else Sequences(self.ids[:n], self.lengths[:n])

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, mask) batches in order, each trimmed to its longest sequence."""
        for i in range(0, len(self), batch_size):
            lengths = self.lengths[i : i + batch_size]
            width = int(lengths.max())
            ids = self.ids[i : i + batch_size, :width]
            yield ids, (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)

    def save(self, path: str | Path) -> None:
        np.savez(path, ids=self.ids, lengths=self.lengths)

    @classmethod
    def load(cls, path: str | Path) -> "Sequences":
        with np.load(path) as z:
            return cls(z["ids"], z["lengths"])


@dataclass
class CalibrationSet:
    train: Sequences
    heldout: Sequences


def default_calibration_path() -> Path:
    return Path(str(resources.files("sparseforge.toolchain.data") / "calibration.jsonl"))


MAX_TEXT_BYTES = 32 << 20
"""Calibration text read at most (all files of a source together): more is refused
rather than read and tokenized whole (50 MB took 40 s and 6.9 GB; the calibration uses
``num_sequences`` windows, a few MB of text at most)."""
PIECE_CHARS = 1 << 20
"""Characters a document is tokenized in at most (cut at a line break): the tokenizer's
per-token records of one long document would otherwise take gigabytes."""


def _read_text(path: Path, budget: int | None = None) -> str:
    """``path`` decoded as UTF-8; an :class:`InputError` when it holds more than ``budget``
    bytes (default :data:`MAX_TEXT_BYTES`; read no further: ``/dev/zero`` never ends)."""
    budget = MAX_TEXT_BYTES if budget is None else budget
    try:
        with open(path, "rb") as fh:
            data = fh.read(budget + 1)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror}") from None
    if len(data) > budget:
        raise InputError(path, f"more than {MAX_TEXT_BYTES / 2**20:g} MiB of calibration text; give a sample of it "
                               "(the calibration uses num_sequences windows of seq_len tokens)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from None


def load_documents(path: Path) -> list[str]:
    """The documents of a text file, a directory of text files or a JSONL file."""
    if not path.exists():
        raise InputError(path, "calibration data not found")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise InputError(path, f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in the directory")
        docs, budget = [], MAX_TEXT_BYTES  # for all the files together
        for f in files:
            docs.append(_read_text(f, budget))
            budget -= len(docs[-1].encode("utf-8"))
    elif path.suffix.lower() in {".jsonl", ".ndjson"}:
        docs = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"line {n} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(path, f"line {n} has no string field 'text'")
            docs.append(record["text"])
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(path, "calibration data is empty")
    return docs


def special_tokens(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a sequence."""
    probe = tok.encode("a", add_special_tokens=False)
    if not probe.ids:
        return [], []
    full = tok.post_process(probe, add_special_tokens=True).ids
    n = len(probe.ids)
    for i in range(len(full) - n + 1):
        if full[i : i + n] == probe.ids:
            return list(full[:i]), list(full[i + n :])
    return [], []


def tokenize_windows(docs: list[str], tokenizer_path: str, seq_len: int, source: Path) -> list[np.ndarray]:
    """Cut each tokenized document into windows of at most ``seq_len`` tokens, specials included."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tok.no_padding()
    tok.no_truncation()
    prefix, suffix = special_tokens(tok)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise InputError(source, f"seq_len {seq_len} leaves no room next to {len(prefix) + len(suffix)} special tokens")
    windows = []
    for ids in _token_ids(tok, docs):
        for start in range(0, len(ids), body):
            windows.append(np.asarray(prefix + ids[start : start + body] + suffix, dtype=np.int64))
    if not windows:
        raise InputError(source, "every text is shorter than one token")
    return windows


def _token_ids(tok, docs: list[str]) -> Iterator[list[int]]:
    """Each document's token ids (no special tokens), in order. Documents go to
    ``encode_batch`` (every core) in batches of at most :data:`PIECE_CHARS` characters, a
    longer document as its :func:`_pieces` one at a time, so that the tokenizer's
    per-token records never cover much more than that much text."""
    group: list[str] = []
    size = 0
    for doc in docs:
        if group and size + len(doc) > PIECE_CHARS:
            yield from (enc.ids for enc in tok.encode_batch(group, add_special_tokens=False))
            group, size = [], 0
        if len(doc) > PIECE_CHARS:
            yield [i for piece in _pieces(doc) for i in tok.encode(piece, add_special_tokens=False).ids]
        else:
            group.append(doc)
            size += len(doc)
    yield from (enc.ids for enc in tok.encode_batch(group, add_special_tokens=False))


def _pieces(doc: str) -> Iterator[str]:
    """``doc`` in pieces of at most :data:`PIECE_CHARS` characters, each cut after a line
    break where there is one (a document that short is one piece)."""
    start = 0
    while len(doc) - start > PIECE_CHARS:
        cut = doc.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def load_token_ids(path: Path, vocab_size: int, seq_len: int) -> list[np.ndarray]:
    """Windows from a ``.npy`` of token ids: rows of a 2-D array (trailing ``-1`` = padding)
    or ``seq_len`` windows of a 1-D stream."""
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise InputError(path, "not a .npy file (no NUMPY magic)")
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy array: {exc}") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(path, f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise InputError(path, f"token ids must be a non-empty 1-D or 2-D array, got shape {arr.shape}")
    arr = np.asarray(arr, dtype=np.int64)
    if arr.ndim == 1:
        rows = [arr[i : i + seq_len] for i in range(0, len(arr), seq_len)]
    else:
        if arr.shape[1] > seq_len:
            raise InputError(path, f"sequences of {arr.shape[1]} tokens are longer than seq_len {seq_len}")
        rows = [r[: int(np.argmax(r == -1))] if (r == -1).any() else r for r in arr]
    rows = [r for r in rows if len(r)]
    if not rows:
        raise InputError(path, "no token ids")
    bad = [int(r.max()) for r in rows if int(r.max()) >= vocab_size] + [int(r.min()) for r in rows if int(r.min()) < 0]
    if bad:
        raise InputError(path, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [np.ascontiguousarray(r) for r in rows]


def _pad(rows: list[np.ndarray], seq_len: int, pad_id: int) -> Sequences:
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        lengths[i] = len(r)
    return Sequences(ids, lengths)


def build_calibration(
    source: str | Path | None,
    *,
    tokenizer: str | None,
    vocab_size: int,
    seq_len: int,
    num_sequences: int,
    heldout_fraction: float,
    seed: int,
    pad_id: int = 0,
) -> CalibrationSet:
    """Read ``source`` (None: the default text), cut it into windows, split and sample.

    The same arguments always give the same sequences."""
    path = Path(source) if source is not None else default_calibration_path()
    if seq_len < 2 or num_sequences < 1 or not 0.0 <= heldout_fraction < 1.0:
        raise InputError(None, "calibration needs seq_len >= 2, num_sequences >= 1 and 0 <= heldout_fraction < 1")
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise InputError(path, "calibration data not found")
        windows = load_token_ids(path, vocab_size, seq_len)
    else:
        if tokenizer is None:
            raise InputError(path, "text calibration needs the model's tokenizer.json, and the model has none "
                                   "(pass token ids as a .npy file instead)")
        windows = tokenize_windows(load_documents(path), tokenizer, seq_len, path)
        too_big = [int(w.max()) for w in windows if int(w.max()) >= vocab_size]
        if too_big:
            raise InputError(tokenizer, f"the tokenizer produced id {too_big[0]} >= the model's vocab size {vocab_size}")
    order = np.random.default_rng(seed).permutation(len(windows))
    n_held = math.ceil(heldout_fraction * len(windows)) if heldout_fraction > 0 else 0
    if len(windows) - n_held < 1:
        raise InputError(path, f"{len(windows)} sequences are too few for a held-out fraction of {heldout_fraction}")
    held = [windows[i] for i in order[:n_held]]
    train = [windows[i] for i in order[n_held : n_held + num_sequences]]
    return CalibrationSet(_pad(train, seq_len, pad_id), _pad(held, seq_len, pad_id))


def calibration_split(ir: "ModelIR", name: str) -> Sequences:
    """The ``train`` or ``heldout`` calibration sequences the profile pass attached to ``ir``."""
    f = SafetensorsFile(ir.files[f"calibration/{name}.safetensors"])
    return Sequences(np.asarray(f.get("ids")), np.asarray(f.get("lengths")))
