"""CPU target descriptions: what the emit pass and the kernels specialise for.

A :class:`Target` names a CPU class: the LLVM triple, the Numba/LLVM cpu name and feature
string (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when deploying), the vector width,
whether int8 dot products exist (``sdot``/``vpdpbusd``), the bundle alignment (the
:class:`~sparseforge.kernels.bundle.BundleLayout` ``align``), the work chunks per thread of
the parallel kernels (the "tile"), and the llvm-mca cpu model used for static throughput.

``get_target(name)`` looks one up (unknown names raise :class:`InputError`, exit 2 from
the CLI); ``host_target()`` picks the best description of the machine running Python.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from typing import Any

from sparseforge.toolchain.errors import InputError


@dataclass(frozen=True)
class Target:
    name: str
    arch: str                  # "x86_64" or "aarch64"
    triple: str
    cpu: str                   # LLVM / Numba cpu name
    features: str              # LLVM feature string
    vector_bits: int           # widest vector register used by the kernels
    int8_dot: str | None       # int8 dot-product instruction family, if any
    sve: bool
    bundle_align: int          # bytes; bundles are padded to a multiple of this
    chunks_per_thread: int     # work split of the parallel kernels
    mca_cpu: str               # llvm-mca -mcpu
    description: str

    @property
    def is_arm(self) -> bool:
        return self.arch == "aarch64"

    @property
    def env(self) -> dict[str, str]:
        """Environment that makes Numba generate code for this target."""
        return {"NUMBA_CPU_NAME": self.cpu, "NUMBA_CPU_FEATURES": self.features}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_X86 = "x86_64-unknown-linux-gnu"
_ARM = "aarch64-unknown-linux-gnu"

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("x86-64", "x86_64", _X86, "x86-64", "+sse2", 128, None, False, 64, 4, "x86-64",
           "generic x86-64 (SSE2)"),
    Target("x86-64-v3", "x86_64", _X86, "haswell",
           "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+movbe,+popcnt,+sse4.2", 256, None, False, 64, 4,
           "haswell", "x86-64-v3: AVX2 + FMA (Haswell, Zen 1-3)"),
    Target("x86-64-v4", "x86_64", _X86, "skylake-avx512",
           "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+movbe,+popcnt,+sse4.2,+avx512f,+avx512bw,+avx512dq,+avx512vl",
           512, None, False, 64, 4, "skylake-avx512", "x86-64-v4: AVX-512 F/BW/DQ/VL (Skylake-SP, Zen 4)"),
    Target("neoverse-n1", "aarch64", _ARM, "neoverse-n1", "+neon,+dotprod,+fullfp16", 128, "sdot", False, 64, 4,
           "neoverse-n1", "ARMv8.2 NEON + dotprod (Neoverse N1, Cortex-A76, Graviton 2, Ampere Altra)"),
    Target("apple-m1", "aarch64", _ARM, "apple-m1", "+neon,+dotprod,+fullfp16,+i8mm", 128, "sdot", False, 128, 4,
           "apple-m1", "Apple M1 (NEON + dotprod, 128-byte cache lines)"),
    Target("neoverse-v1", "aarch64", _ARM, "neoverse-v1", "+neon,+sve,+dotprod,+i8mm,+fullfp16", 256, "sdot", True,
           64, 4, "neoverse-v1", "ARMv8.4 SVE-256 (Neoverse V1, Graviton 3)"),
    Target("a64fx", "aarch64", _ARM, "a64fx", "+neon,+sve,+fullfp16", 512, None, True, 256, 4, "a64fx",
           "SVE-512 (Fujitsu A64FX, 256-byte cache lines)"),
]}

ALIASES = {"generic": "x86-64", "x86-64-v2": "x86-64", "avx2": "x86-64-v3", "avx512": "x86-64-v4",
           "cortex-a76": "neoverse-n1", "graviton2": "neoverse-n1", "graviton3": "neoverse-v1", "m1": "apple-m1"}


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str | None) -> Target:
    """The target called ``name`` (or an alias); ``None`` or ``"host"`` = :func:`host_target`."""
    if name is None or name == "host":
        return host_target()
    key = ALIASES.get(name, name)
    if key not in TARGETS:
        raise InputError(None, f"unknown target {name!r}; known targets: {', '.join(TARGETS)} (or 'host')")
    return TARGETS[key]


def _x86_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_target() -> Target:
    """The target description closest to this machine."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        if platform.system() == "Darwin":
            return TARGETS["apple-m1"]
        try:
            import llvmlite.binding as llvm

            feats = llvm.get_host_cpu_features()
            if feats.get("sve", False):
                return TARGETS["neoverse-v1"]
        except Exception:  # noqa: BLE001 - fall back to the NEON target
            pass
        return TARGETS["neoverse-n1"]
    flags = _x86_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return TARGETS["x86-64-v4"]
    if {"avx2", "fma"} <= flags:
        return TARGETS["x86-64-v3"]
    return TARGETS["x86-64"]
