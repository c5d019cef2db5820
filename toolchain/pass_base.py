"""The pass contract: a named transformation of the IR with typed options.

A pass declares what it needs (``requires``), does its work (``run``) and checks what it
promised (``ensures``). ``run`` gets the IR and a :class:`PassContext` and returns a
:class:`PassResult`: the new IR plus a statistics dict, nothing else. Shaped after
onnx_ir's pass infrastructure.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError, PassError
from .ir import ModelIR


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassContext:
    """What a pass may use besides the IR: a scratch directory for files it attaches to
    the IR, the seed, whether to show progress bars, and ``state_dir``: a directory that
    survives an interrupted run of the same pass on the same input (for checkpoints; None
    when there is no cache), removed once the pass has finished."""

    work_dir: Path
    seed: int = 0
    progress: bool | None = None
    state_dir: Path | None = None


@dataclass
class PassResult:
    """The IR after the pass, the pass's statistics (JSON-serialisable) and whether it
    changed the IR."""

    ir: ModelIR
    stats: dict[str, Any] = field(default_factory=dict)
    modified: bool = True


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``summary`` and, if they take
    options, ``Options`` (a frozen dataclass with typed, defaulted fields)."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: options added after artifacts were published: recorded (cache key, pass log,
    #: artifact) only when set away from their defaults, so a recipe that does not use
    #: them produces the same bytes as before they existed
    quiet_defaults: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def check_options(self) -> None:
        """Raise :class:`~sparseforge.toolchain.errors.PassError` for option values out of
        range; the PassManager calls it for every pass before running any."""

    def require_at_least(self, **minimums: float) -> None:
        """A :class:`~sparseforge.toolchain.errors.PassError` naming the first option
        (keyword) whose value is below its minimum."""
        for name, low in minimums.items():
            value = getattr(self.options, name)
            if value < low:
                raise PassError(f"{self.name}: {name} = {value} is out of range (must be >= {low})")

    def require_positive(self, *names: str) -> None:
        """A :class:`~sparseforge.toolchain.errors.PassError` naming the first option of
        ``names`` that is not > 0."""
        for name in names:
            value = getattr(self.options, name)
            if not value > 0:
                raise PassError(f"{self.name}: {name} = {value} is out of range (must be > 0)")

    def check_model(self, ir: ModelIR) -> None:
        """Raise :class:`~sparseforge.toolchain.errors.PassError` for options that do not fit
        the model in what no pass changes (its layers, positions, gates): the PassManager
        calls it for every pass on the input IR before running any, so that a bad option
        of the last pass fails before the first runs. :meth:`__call__` calls it too."""

    def requires(self, ir: ModelIR) -> None:
        """Raise :class:`~sparseforge.toolchain.errors.PassError` if ``ir`` can't be processed."""

    def run(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, ir: ModelIR) -> None:
        """Raise if the pass's output breaks what it promises (a bug, not bad input)."""

    def __call__(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        self.check_model(ir)
        self.requires(ir)
        result = self.run(ir, ctx)
        self.ensures(result.ir)
        return result

    def fingerprint(self) -> dict[str, Any]:
        """Digests of inputs the options only name (e.g. a calibration file), so the
        pass cache sees when their contents change. Default: none."""
        return {}

    def options_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.options)
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(self.Options)}
        for name in self.quiet_defaults:
            if name in d and d[name] == defaults.get(name, dataclasses.MISSING):
                del d[name]
        return d


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes and the CLI under ``cls.name``."""
    _PASSES[cls.name] = cls
    return cls


def pass_registry() -> dict[str, type[Pass]]:
    import sparseforge.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_PASSES.items()))


def get_pass(name: str, where: str | Path | None = None) -> type[Pass]:
    registry = pass_registry()
    if name not in registry:
        raise InputError(where, f"unknown pass {name!r}; available: {', '.join(registry)}")
    return registry[name]


def make_options(cls: type[Pass], values: dict[str, Any], where: str | Path | None = None) -> Any:
    """Build ``cls.Options`` from a dict (recipe or CLI), checking names and types."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    kwargs = {}
    for key, value in values.items():
        attr = key.replace("-", "_")
        if attr not in fields:
            known = ", ".join(fields) or "none"
            raise InputError(where, f"pass {cls.name!r} has no option {key!r} (options: {known})")
        kwargs[attr] = _coerce(value, hints[attr], f"{cls.name}.{key}", where)
    try:
        return cls.Options(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(where, f"pass {cls.name!r}: {exc}") from None


def _coerce(value: Any, hint: Any, label: str, where: str | Path | None) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, Optional, list, Literal)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, label, where)
            except InputError:
                continue
        raise InputError(where, f"option {label}: {value!r} is not a {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise InputError(where, f"option {label}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(where, f"option {label}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0] if args else Any, label, where) for v in value)
    if origin is dict or hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise InputError(where, f"option {label}: expected {hint.__name__}, got {value!r}")
