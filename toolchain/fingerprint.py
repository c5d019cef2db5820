"""Content digests of files, memoised by (path, size, mtime) so large shards hash once."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_MEMO: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (streamed in 8 MiB chunks)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(8 * 1024 * 1024):
                h.update(chunk)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def environ_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}
