"""Recipes: TOML files that list the passes of a conversion and their options.

```toml
name = "minilm"          # optional
seed = 0                 # optional, default 0
target = "neoverse-n1"   # optional: CPU target (``sparseforge targets``) for passes with a target option
executor = "local"       # optional: where passes with an executor option run per-layer work (local, ray, serial)
workers = 0              # optional: workers of that executor (0: one per core)

[verify]                 # optional: quality gates, recorded in the artifact for ``verify``
min_cosine = 0.98        # encoders: mean embedding cosine to the original
max_ppl_increase = 0.05  # decoders: relative perplexity increase

[[pass]]
name = "weight-stats"

[[pass]]
name = "profile"
[pass.options]
seq_len = 128
```

``--set PASS.OPTION=VALUE`` on the CLI overrides an option (VALUE is read as TOML);
``--set target=NAME`` (``convert --target``) overrides the recipe's target, and
``--set executor=NAME`` / ``--set workers=N`` (``convert --executor`` / ``--workers``)
its executor. A pass's own ``executor`` / ``workers`` options win over the recipe's.
Neither changes a result (``toolchain.executors``). The ``[verify]`` gates become the
``pack`` pass's options of the same names (a pack pass's own options win), so the
artifact's recorded recipe carries them. Any other top-level key is an error.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError, PassError
from .pass_base import Pass, get_pass, make_options


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    passes: list[PassSpec]
    seed: int = 0
    source: str = "<built-in>"
    target: str | None = None
    executor: str | None = None
    workers: int | None = None
    verify: dict[str, float] = field(default_factory=dict)

    def instantiate(self) -> list[Pass]:
        """Pass objects with validated options (unknown names/options raise InputError)."""
        out = []
        for spec in self.passes:
            cls = get_pass(spec.name, self.source)
            options = dict(spec.options)
            if self.target and "target" not in options and _has_option(cls, "target"):
                options["target"] = self.target
            for key, value in (("executor", self.executor), ("workers", self.workers), *self.verify.items()):
                if value is not None and key not in options and _has_option(cls, key):
                    options[key] = value
            p = cls(make_options(cls, options, self.source))
            try:
                p.check_options()
            except PassError as exc:  # out of range in this recipe: name the file
                raise InputError(self.source, str(exc)) from None
            out.append(p)
        return out

    def to_dict(self) -> dict[str, Any]:
        run = {k: v for k, v in (("target", self.target), ("executor", self.executor), ("workers", self.workers))
               if v is not None}
        return {"name": self.name, "seed": self.seed, **run, **({"verify": self.verify} if self.verify else {}),
                "passes": [{"name": p.name, "options": p.options} for p in self.passes]}

    def override(self, assignments: list[str]) -> None:
        """Apply ``PASS.OPTION=VALUE`` strings to every pass of that name."""
        for text in assignments:
            lhs, sep, rhs = text.partition("=")
            if sep and lhs.strip() == "target":
                self.target = _check_target(rhs.strip().strip('"'), None)
                continue
            if sep and lhs.strip() == "executor":
                self.executor = _check_executor(rhs.strip().strip('"'), None)
                continue
            if sep and lhs.strip() == "workers":
                self.workers = _check_workers(rhs.strip(), None)
                continue
            pass_name, dot, option = lhs.strip().partition(".")
            if not sep or not dot or not option:
                raise InputError(None, f"--set {text!r}: expected PASS.OPTION=VALUE")
            try:
                value = tomllib.loads(f"v = {rhs.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                value = rhs.strip()  # a bare word is a string
            targets = [p for p in self.passes if p.name == pass_name]
            if not targets:
                raise InputError(None, f"--set {text!r}: the recipe has no pass {pass_name!r}")
            make_options(get_pass(pass_name, None), {option: value}, f"--set {text}")  # the culprit named
            for p in targets:
                p.options[option] = value


def parse_recipe(text: str, source: str) -> Recipe:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(source, f"invalid TOML: {exc}") from None
    unknown = sorted(set(doc) - TOP_LEVEL_KEYS)
    if unknown:
        raise InputError(source, f"unknown top-level keys {unknown} (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    passes = doc.get("pass")
    if not isinstance(passes, list) or not passes:
        raise InputError(source, "a recipe needs at least one [[pass]] table")
    specs = []
    for i, entry in enumerate(passes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(source, f"[[pass]] number {i + 1} has no name")
        unknown = set(entry) - {"name", "options"}
        if unknown:
            raise InputError(source, f"[[pass]] {entry['name']!r}: unknown keys {sorted(unknown)} "
                                     "(options go in [pass.options])")
        options = entry.get("options", {})
        if not isinstance(options, dict):
            raise InputError(source, f"[[pass]] {entry['name']!r}: options must be a table")
        specs.append(PassSpec(entry["name"], dict(options)))
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(source, f"seed must be an integer, got {seed!r}")
    target = doc.get("target")
    if target is not None:
        if not isinstance(target, str):
            raise InputError(source, f"target must be a string, got {target!r}")
        target = _check_target(target, source)
    executor = doc.get("executor")
    if executor is not None:
        executor = _check_executor(executor, source)
    workers = doc.get("workers")
    if workers is not None:
        workers = _check_workers(workers, source)
    recipe = Recipe(name=str(doc.get("name", Path(source).stem)), passes=specs, seed=seed, source=source,
                    target=target, executor=executor, workers=workers, verify=verify_table(doc, source))
    recipe.instantiate()  # validate pass names and options now, not halfway through a run
    return recipe


TOP_LEVEL_KEYS = {"name", "seed", "target", "executor", "workers", "verify", "pass"}
VERIFY_GATES = {"min_cosine": 0.98, "max_ppl_increase": 0.05}
"""The quality gates of ``sparseforge verify`` (``[verify]`` in a recipe) and the limits
it applies when neither an option, a recipe nor the artifact gives one."""


def verify_table(doc: dict[str, Any], source: str | Path | None) -> dict[str, float]:
    """The ``[verify]`` table of a parsed recipe: gate name -> number (empty: none)."""
    table = doc.get("verify", {})
    if not isinstance(table, dict):
        raise InputError(source, "[verify] must be a table")
    unknown = sorted(set(table) - set(VERIFY_GATES))
    if unknown:
        raise InputError(source, f"[verify]: unknown gates {unknown} (gates: {', '.join(VERIFY_GATES)})")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(source, f"verify gate {key} must be a finite number, got {value!r}")
        if key == "min_cosine" and not -1.0 <= value <= 1.0:
            raise InputError(source, f"verify gate min_cosine must be in [-1, 1], got {value!r}")
    return {k: float(v) for k, v in table.items()}


def load_recipe(path: str | Path | None) -> Recipe:
    """Read a recipe file; ``None`` or a bare built-in name (``default``) reads a built-in."""
    if path is None:
        path = "default"
    p = Path(path)
    if not p.suffix and not p.exists():
        builtin = resources.files("sparseforge.toolchain.recipes") / f"{p.name}.toml"
        if not builtin.is_file():
            raise InputError(path, f"no such recipe file, and no built-in recipe named {p.name!r} "
                                   f"(built-in: {', '.join(builtin_recipes())})")
        return parse_recipe(builtin.read_text(encoding="utf-8"), f"<built-in recipe {p.name}>")
    if not p.is_file():
        raise InputError(p, "recipe file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(p, "recipe is not UTF-8 text") from None
    return parse_recipe(text, str(p))


def builtin_recipes() -> list[str]:
    folder = resources.files("sparseforge.toolchain.recipes")
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".toml"))


def _has_option(cls: type[Pass], name: str) -> bool:
    import dataclasses

    return any(f.name == name for f in dataclasses.fields(cls.Options))


def _check_target(name: str, source: str | None) -> str:
    from sparseforge.targets import get_target

    try:
        return get_target(name).name
    except InputError as exc:
        raise InputError(source, exc.problem) from None


def _check_executor(name: object, source: str | None) -> str:
    from .executors import executor_names

    if not isinstance(name, str) or name not in executor_names():
        raise InputError(source, f"executor must be one of {', '.join(executor_names())}, got {name!r}")
    if name == "ray":  # fail before any pass runs, not when the first task is handed out
        from .executors import _import_ray

        _import_ray()
    return name


def _check_workers(value: object, source: str | None) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(source, f"workers must be an integer >= 0 (0: one per core), got {value!r}")
    return value
