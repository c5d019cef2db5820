"""Write-then-rename helpers: an interrupted run never leaves a half-written output."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def check_output_file(path: str | Path) -> Path:
    """``path`` as an output file: not a directory, its nearest existing parent a directory
    (else an :class:`InputError`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, not an output file")
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    """The nearest existing parent of ``path`` must be a directory sparseforge can create
    files in (:func:`_check_writable`)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(parent, f"is not a directory, so the output {path} cannot be created in it")
            _check_writable(parent, path)
            return


def _check_writable(directory: Path, output: Path) -> None:
    """Create and remove a file in ``directory`` (the permission bits do not tell: root
    ignores them, an immutable or read-only mount refuses anyway), so that an output that
    cannot be written fails before the run rather than after it."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparseforge-probe.", dir=directory)
    except OSError as exc:
        raise InputError(output, f"cannot be written: {directory} refuses new files ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path: str | Path) -> Path:
    """``path`` as a directory sparseforge writes into (a pass cache, a dump directory):
    a directory or absent, and files can be created in it or in its nearest existing
    parent (else an :class:`InputError`)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise InputError(path, "is not a directory")
        _check_writable(path, path)
    else:
        _check_parent(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (:func:`check_output_file`); rename it
    onto ``path`` on success."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


OUTPUT_MARKERS = ("report.json", "manifest.json")
"""Files one of which every output directory sparseforge writes holds at its top level
(a ``convert``, ``demo`` or subcommand output; an IR directory)."""


def check_output_dir(path: str | Path) -> Path:
    """``path`` as an output directory sparseforge may (re)place: absent, empty, or a
    directory it wrote before (one of :data:`OUTPUT_MARKERS`); anything else, or a parent
    that is not a directory, is an :class:`InputError`, so that no user data is replaced."""
    path = Path(path)
    _check_parent(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise InputError(path, "output exists and is not a directory (remove it or choose another output)")
        if any(path.iterdir()) and not any((path / m).is_file() for m in OUTPUT_MARKERS):
            raise InputError(path, "output directory exists and was not written by sparseforge "
                                   f"(none of {', '.join(OUTPUT_MARKERS)}); remove it or choose another output")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, owned: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` on success.

    ``path`` must pass :func:`check_output_dir`, unless ``owned`` (a directory only
    sparseforge writes to, such as a pass-cache entry, which a damaged copy may occupy).
    An existing ``path`` is removed only after the new directory is complete.
    """
    path = Path(path) if owned else check_output_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
