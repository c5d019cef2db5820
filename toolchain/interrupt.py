"""Interruption: SIGTERM (and SIGHUP) end a run the way Ctrl-C does.

:func:`install_handlers` makes those signals, and SIGINT, raise :class:`Interrupted` (a
``KeyboardInterrupt``) in the main thread, so every ``finally`` block and context
manager on the way out runs: temporary outputs are removed (``toolchain.atomic``),
executor workers are stopped (``toolchain.executors``), and the pass cache keeps only
entries written completely (``toolchain.pass_manager``). The CLI then prints one line,
``interrupted``, and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

:func:`hold` is a pause point for tests: with ``SPARSEFORGE_HOLD=POINT`` in the
environment, the code reaching ``hold(POINT)`` touches ``$SPARSEFORGE_HOLD_FILE`` and
sleeps (up to ``$SPARSEFORGE_HOLD_SECONDS``, default 300), so a test can signal a run at
a known place instead of guessing with timers. Points: ``pass:NAME`` (the pass NAME has
computed its result, which is not yet in the cache) and ``task`` (inside an executor task).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

HOLD_ENV = "SPARSEFORGE_HOLD"
HOLD_FILE_ENV = "SPARSEFORGE_HOLD_FILE"
HOLD_SECONDS_ENV = "SPARSEFORGE_HOLD_SECONDS"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


_RECEIVED: list[int] = []  # the signals :func:`_raise` has seen, in order


def _raise(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def install_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread (call
    from it), and are remembered (:func:`received`); an :class:`Interrupted` that a
    callback swallows is not printed as "Exception ignored ..." with its traceback."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _raise)
    if not getattr(sys.unraisablehook, "quiet_interrupts", False):
        default = sys.unraisablehook

        def quiet(unraisable: Any) -> None:
            if not isinstance(unraisable.exc_value, Interrupted):
                default(unraisable)
        quiet.quiet_interrupts = True
        sys.unraisablehook = quiet


def received() -> Interrupted | None:
    """The first signal :func:`install_handlers`' handler has seen, as an
    :class:`Interrupted` (None: none). A ``KeyboardInterrupt`` raised while Numba
    compiles can be swallowed by a ctypes callback in llvmlite (the compilation then
    fails with an unrelated error, or carries on): the CLI asks here whether the run was
    interrupted all the same."""
    return Interrupted(_RECEIVED[0]) if _RECEIVED else None


def hold(point: str) -> None:
    """Pause here when ``$SPARSEFORGE_HOLD`` names ``point`` (tests only; see the module doc)."""
    if os.environ.get(HOLD_ENV) != point:
        return
    marker = os.environ.get(HOLD_FILE_ENV)
    if marker:
        Path(marker).touch()
    deadline = time.monotonic() + float(os.environ.get(HOLD_SECONDS_ENV, "300"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
