"""Runs a sequence of passes with instruments, IR dumps and a content-addressed cache.

Cache key of a pass = sha256(input IR content hash, pass name, options, versions of
sparseforge and the numerical packages). A pipeline re-run with the same model and
recipe loads every pass result from the cache; changing one pass's options changes
its key, and therefore the IR it produces and every key after it, so the pipeline
re-runs from that pass on. Options that only choose where work runs (executor,
workers: ``toolchain.executors.EXECUTION_OPTIONS``) are not part of the key.

Interruption: every finished pass is in the cache before the next starts, and an
entry (IR directory + ``record.json``) is written under a temporary name and renamed
into place, so a run stopped at any point (Ctrl-C, SIGTERM, a crash) leaves either a
complete entry or none; the same command then resumes at the first unfinished pass.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from .atomic import atomic_dir, check_writable_dir
from .executors import result_options
from .instruments import MemoryTimer
from .interrupt import hold
from .ir import ModelIR
from .pass_base import Pass, PassContext

VERSIONED_PACKAGES = ("sparseforge", "numpy", "onnx", "onnxruntime", "torch", "numba", "gguf", "tokenizers")


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


@dataclass
class PassRecord:
    """What happened to one pass: ``status`` is ``ran`` or ``cached``; times in seconds,
    memory in MiB (peak RSS of the process while the pass ran)."""

    name: str
    options: dict[str, Any]
    status: str
    cache_key: str
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    rss_start_mb: float = 0.0
    modified: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    """The final IR and one record per pass. ``scratch`` keeps the files passes attached
    alive when there is no cache to move them into (they go when the result does)."""

    ir: ModelIR
    records: list[PassRecord]
    scratch: tempfile.TemporaryDirectory | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [asdict(r) for r in self.records]}


class PassManager:
    """Run ``passes`` in order on an IR.

    ``cache_dir``: where finished passes are kept (None: no cache).
    ``dump_after``: pass names (or ``"all"``) whose output IR is written to ``dump_dir``.
    ``on_record``: called after each pass with its record (the CLI prints a line).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        cache_dir: str | Path | None = None,
        dump_after: Sequence[str] = (),
        dump_dir: str | Path | None = None,
        seed: int = 0,
        progress: bool | None = None,
        on_record: Callable[[PassRecord], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.cache_dir = check_writable_dir(cache_dir) if cache_dir else None  # fails now, not after the run
        self.dump_after = set(dump_after)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        if self.dump_after and self.dump_dir is None:
            raise ValueError("dump_after needs dump_dir")
        if self.dump_after:
            check_writable_dir(self.dump_dir)
        self.seed = seed
        self.progress = progress
        self.on_record = on_record
        self.versions = package_versions()

    def cache_key(self, ir: ModelIR, p: Pass) -> str:
        doc = {"ir": ir.content_hash(), "pass": p.name, "options": result_options(p.options_dict()),
               "inputs": p.fingerprint(), "seed": self.seed,
               "versions": self.versions}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def run(self, ir: ModelIR) -> PipelineResult:
        for p in self.passes:
            p.check_options()
        for p in self.passes:
            p.check_model(ir)
        records: list[PassRecord] = []
        self._scratch = None if self.cache_dir else tempfile.TemporaryDirectory(prefix="sparseforge-")
        for index, p in enumerate(self.passes):
            key = self.cache_key(ir, p)
            cached = self._load_cached(key)
            if cached is not None:
                ir, record = cached
            else:
                ir, record = self._run_pass(p, ir, key)
            records.append(record)
            if p.name in self.dump_after or "all" in self.dump_after:
                assert self.dump_dir is not None
                ir.save(self.dump_dir / f"{index:02d}-{p.name}")
            if self.on_record:
                self.on_record(record)
        return PipelineResult(ir, records, self._scratch)

    def _run_pass(self, p: Pass, ir: ModelIR, key: str) -> tuple[ModelIR, PassRecord]:
        state = self.cache_dir / "state" / key if self.cache_dir is not None else None
        with self._work_dir(p.name) as work:
            ctx = PassContext(work_dir=Path(work), seed=self.seed, progress=self.progress, state_dir=state)
            with MemoryTimer() as timer:
                result = p(ir, ctx)
            hold(f"pass:{p.name}")  # tests interrupt a pass here: result computed, not yet cached
            out = result.ir
            record = PassRecord(
                name=p.name, options=p.options_dict(), status="ran", cache_key=key,
                wall_s=timer.result.wall_s, peak_rss_mb=timer.result.peak_rss_mb,
                rss_start_mb=timer.result.rss_start_mb, modified=result.modified,
                stats=json.loads(json.dumps(result.stats, default=_jsonable)),
            )
            out.pass_log.append({"pass": p.name, "options": result_options(record.options),
                                 "stats": record.stats})
            if self.cache_dir is not None:
                out = self._store(key, out, record)  # moves overlays and attached files into the cache
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
        return out, record

    def _work_dir(self, name: str) -> ContextManager[str]:
        """A pass's scratch directory: temporary when a cache will receive what the pass
        attaches, else one inside the pipeline's scratch directory (kept with the result)."""
        if self._scratch is None:
            return tempfile.TemporaryDirectory(prefix=f"sparseforge-{name}-")
        return contextlib.nullcontext(tempfile.mkdtemp(prefix=f"{name}-", dir=self._scratch.name))

    # -- cache -----------------------------------------------------------------------
    def _entry(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / key

    def _load_cached(self, key: str) -> tuple[ModelIR, PassRecord] | None:
        if self.cache_dir is None:
            return None
        entry = self._entry(key)
        done = entry / "record.json"
        if not done.is_file():
            return None
        try:
            record = PassRecord(**json.loads(done.read_text()))
            ir = ModelIR.load(entry / "ir")
            ir.store.check()
        except Exception:  # a damaged entry is a miss, never a failure
            shutil.rmtree(entry, ignore_errors=True)
            return None
        record.status = "cached"
        return ir, record

    def _store(self, key: str, ir: ModelIR, record: PassRecord) -> ModelIR:
        """Write the entry under a temporary name, rename it into place (all or nothing)
        and return the IR as read back from it (what a cached run of the pass returns)."""
        entry = self._entry(key)
        with atomic_dir(entry, owned=True) as tmp:  # replaces a damaged entry
            ir.save(tmp / "ir")
            (tmp / "record.json").write_text(json.dumps(asdict(record)))
        return ModelIR.load(entry / "ir", verify=False)  # just written and hashed


def _jsonable(obj: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in pass statistics."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
