"""Content digests of files, memoised by (path, size, mtime) so large shards hash once."""
from __future__ import annotations

import hashlib
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


def path_digest(path: str | Path) -> str:
    """Digest of a file, or of a directory's files (names and contents, in path order);
    "missing" when nothing is there (the pass reports that properly when it runs)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\0".encode())
        return h.hexdigest()
    return "missing"
