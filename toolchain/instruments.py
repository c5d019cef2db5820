"""Per-pass measurements: wall time and peak resident memory."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Measurement:
    wall_s: float = 0.0
    rss_start_mb: float = 0.0
    peak_rss_mb: float = 0.0


class MemoryTimer:
    """Context manager: wall time and peak RSS (sampled every ``interval`` s) of a block."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> "MemoryTimer":
        start = rss_bytes()
        self._peak = start
        self.result.rss_start_mb = start / 2**20
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.result.wall_s = time.perf_counter() - self._t0
        self.result.peak_rss_mb = self._peak / 2**20
