"""The Python API behind ``sparseforge convert``: import, run a recipe, write the output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from .artifact_format import ARTIFACT_KEY as ARTIFACT
from .atomic import atomic_dir, check_output_dir
from .errors import InputError
from .frontends import load_model
from .ir import _link_or_copy
from .pass_base import get_pass, make_options
from .pass_manager import PassManager, PassRecord, PipelineResult
from .recipe import PassSpec, Recipe, load_recipe


def convert_model(
    model: str | Path,
    output: str | Path,
    *,
    recipe: str | Path | None = None,
    assignments: list[str] | None = None,
    seed: int | None = None,
    cache_dir: str | Path | None = None,
    dump_after: list[str] | None = None,
    dump_dir: str | Path | None = None,
    on_record: Callable[[PassRecord], None] | None = None,
    report_html: bool = False,
    executor: str | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Convert ``model`` with ``recipe``; writes ``output/ir``, ``output/report.json`` and
    (``report_html``) ``output/report.html`` (:mod:`.report`).

    ``executor`` / ``workers`` override the recipe's (where passes run per-layer work;
    never what they compute); ``ray_address``: the Ray cluster of the ``ray`` executor.
    Returns the report (recipe, per-pass records). ``output`` appears only when complete;
    an interrupted run leaves the passes it finished in the cache.
    """
    r = load_recipe(recipe)
    r.override(assignments or [])
    if seed is not None:
        r.seed = seed
    if executor is not None:
        r.override([f"executor={executor}"])
    if workers is None and r.workers is None and r.executor == "ray":
        workers = 0  # as many tasks in flight as Ray schedules
    if workers is not None:
        r.override([f"workers={workers}"])
    if ray_address:
        from .executors import configure_executor

        configure_executor("ray", address=ray_address)
    passes = r.instantiate()
    unknown = sorted(set(dump_after or ()) - {p.name for p in passes} - {"all"})
    if unknown:
        raise InputError(None, f"--dump-after {', '.join(unknown)}: the recipe has no such pass "
                               f"(its passes: {', '.join(p.name for p in passes)}; or all)")
    output = check_output_dir(output)  # before the run: a directory it may not replace fails now
    ir = load_model(model)
    manager = PassManager(
        passes, cache_dir=cache_dir, dump_after=dump_after or (),
        dump_dir=dump_dir or output.with_name(output.name + ".dumps"), seed=r.seed, on_record=on_record,
    )
    result = manager.run(ir)
    report = {"model": str(Path(model).resolve()), "recipe": r.to_dict(), **result.to_dict()}
    with atomic_dir(output) as tmp:
        _materialise(result, cache_dir)
        result.ir.save(tmp / "ir")
        if ARTIFACT in result.ir.files:  # the pack pass's GGUF artifact: OUT/model.gguf
            _link_or_copy(Path(result.ir.files[ARTIFACT]), tmp / "model.gguf")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        if report_html:
            _write_html_report(tmp)
    return report


def _write_html_report(out: Path) -> None:
    """``out/report.html``; a failure to draw it is reported but does not lose the conversion."""
    import sys

    from .report import write_report

    try:
        write_report(out)
    except Exception as exc:  # noqa: BLE001 - the conversion itself succeeded
        print(f"warning: report.html not written: {type(exc).__name__}: {exc}", file=sys.stderr)


def run_single_pass(name: str, model: str | Path, output: str | Path, assignments: list[str],
                    seed: int = 0) -> PassRecord:
    """Run one pass on a model or IR directory and save the resulting IR to ``output``."""
    cls = get_pass(name)
    recipe = Recipe(name=name, passes=[PassSpec(name, {})], seed=seed, source="--set")
    recipe.override(assignments)
    p = cls(make_options(cls, recipe.passes[0].options, "--set"))
    result = PassManager([p], seed=seed).run(load_model(model))
    result.ir.save(output)
    return result.records[0]


def run_pass_to_dir(name: str, model: str | Path, output: str | Path, options: dict[str, Any], *,
                    seed: int = 0, cache_dir: str | Path | None = None,
                    before: list[tuple[str, dict[str, Any]]] | None = None) -> list[PassRecord]:
    """Run pass ``name`` (a CLI subcommand like ``profile``), after the passes ``before``
    (name, options), and write ``output/`` atomically: ``ir/``, ``report.json`` and the
    files pass ``name`` attached under ``<name>/`` (copied to the top level, e.g.
    ``profile.json`` and its plots). Returns the records of every pass run."""
    passes = []
    for pass_name, values in [*(before or []), (name, options)]:
        cls = get_pass(pass_name)
        passes.append(cls(make_options(cls, values, f"sparseforge {name}")))
    check_output_dir(output)
    ir = load_model(model)
    result = PassManager(passes, cache_dir=cache_dir, seed=seed).run(ir)
    with atomic_dir(Path(output)) as tmp:
        _materialise(result, cache_dir)
        result.ir.save(tmp / "ir")
        for key, path in result.ir.files.items():
            if key.startswith(f"{name}/") and key.count("/") == 1:
                shutil.copyfile(path, tmp / key.split("/", 1)[1])
        report = {"model": str(Path(model).resolve()), **result.to_dict()}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return result.records


def _materialise(result: PipelineResult, cache_dir: str | Path | None) -> None:
    """Make the output IR independent of the cache: tensor files that live in the pass
    cache become owned by the IR, so saving it links (or copies) them into the output
    directory (references to the source model files are kept). Nothing is loaded into
    memory."""
    if cache_dir is None:
        return
    root = Path(cache_dir).resolve()
    store = result.ir.store
    for name in store.names():
        ref = store.ref(name)
        if ref is not None and Path(ref.file).resolve().is_relative_to(root):
            store.adopt(ref.file)
