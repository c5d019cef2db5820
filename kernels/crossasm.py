"""Cross-compile Numba kernels to another CPU's assembly with llvmlite (no hardware needed).

Numba's optimised IR is already specialised to the host (x86 intrinsics), so the IR is
taken unoptimised (``NUMBA_OPT=0``, which must be set before numba is imported: the
compilation runs in a subprocess, ``python -m sparseforge.kernels.crossasm``), the host
triple, data layout and cpu attributes are stripped, and llvmlite's bundled LLVM runs the
O3 pipeline (loop and SLP vectorisers on, plus Numba's reference-count pruning) for the
target machine before emitting assembly. :func:`analyse_loops` finds the innermost loops
of each function in the listing and counts their vector instructions.

Subprocess protocol: ``python -m sparseforge.kernels.crossasm SPEC.json OUT.json``
where SPEC = ``{"module": path, "calls": {kernel: entry}, "targets": [{name, triple,
cpu, features}]}``; the module's ``ARM_PROBES()`` returns ``{kernel: (function, args)}``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

_ATTR_RE = re.compile(r'\s*"target-(cpu|features)"="[^"]*"')


def _clean_ir(ir: str) -> str:
    lines = [ln for ln in ir.splitlines() if not ln.startswith(("target triple", "target datalayout"))]
    return _ATTR_RE.sub("", "\n".join(lines))


def compile_ir(ir: str, triple: str, cpu: str, features: str) -> str:
    """Optimise LLVM IR text for (triple, cpu, features) at O3 and return its assembly."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    target = llvm.Target.from_triple(triple)
    tm = target.create_target_machine(cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default")
    mod = llvm.parse_assembly(_clean_ir(ir))
    mod.triple = triple
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pto = llvm.PipelineTuningOptions(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_interleaving = True
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    mpm = pb.getModulePassManager()
    mpm.add_refprune_pass()
    mpm.run(mod, pb)
    return tm.emit_assembly(mod)


_VECTOR_PATTERNS = {
    "sdot": r"\bsdot\b",
    "udot": r"\budot\b",
    "usdot": r"\busdot\b",
    "smmla": r"\bsmmla\b",
    "fmla_v": r"\bfmla\s+v\d+\.",
    "fmla_z": r"\bfmla\s+z\d+\.",
    "sve_z": r"\bz\d+\.[bhsdq]\b",
    "ld1w": r"\bld1w\b",
    "ld1b": r"\bld1b\b",
    "neon_v": r"\bv\d+\.(16b|8b|8h|4h|4s|2s|2d)\b",
    "ldr_q": r"\bldr\s+q\d+",
    "ldp_q": r"\bldp\s+q\d+",
    "ymm": r"%ymm\d+",
    "zmm": r"%zmm\d+",
    "xmm": r"%xmm\d+",
    "vfmadd": r"\bvfmadd\w*",
    "vpmaddwd": r"\bvpmaddwd\b",
    "vpdpbusd": r"\bvpdpbusd\b",
}


def _functions(asm: str) -> dict[str, list[str]]:
    """Split an assembly listing into {function symbol: lines}."""
    funcs: dict[str, list[str]] = {}
    current = None
    for line in asm.splitlines():
        m = re.match(r"^([A-Za-z_$.][\w$.]*):", line)
        if m and not m.group(1).startswith((".L", "$", ".")):
            current = m.group(1)
            funcs[current] = []
            continue
        if current is not None:
            funcs[current].append(line)
    return funcs


def innermost_loops(lines: list[str]) -> list[list[str]]:
    """Bodies of backward-branch loops (label ... branch back to it) with no loop nested inside."""
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\.?L[\w$.]+|\$L[\w$.]+):", line.strip())
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith((".", "//", "#", ";")) or s.endswith(":"):
            continue
        m = re.search(r"([.$]?L[\w$.]+)\s*$", s)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [[ln for ln in lines[a + 1:b + 1] if ln.strip() and not ln.strip().startswith((".", "//", "#", ";"))
             and not ln.strip().endswith(":")] for a, b in inner]


def count_vector(lines: list[str]) -> dict[str, int]:
    text = "\n".join(lines)
    return {k: len(re.findall(p, text)) for k, p in _VECTOR_PATTERNS.items() if re.search(p, text)}


def _is_kernel_symbol(name: str, symbol_part: str) -> bool:
    """The compiled function itself, not Numba's CPython/cfunc wrappers."""
    return symbol_part in name and not name.startswith(("_ZN7cpython", "cfunc.")) and "NRT_" not in name


def analyse_loops(asm: str, symbol_part: str) -> list[dict[str, Any]]:
    """The innermost loops of the kernel function whose symbol contains ``symbol_part``:
    instruction count, vector instruction counts and the loop text. A function without
    loops (fixed trip counts fully unrolled) is reported as one ``straight-line`` region."""
    out = []
    for name, lines in _functions(asm).items():
        if not _is_kernel_symbol(name, symbol_part):
            continue
        bodies = innermost_loops(lines)
        kind = "loop"
        if not bodies:
            kind = "straight-line"
            bodies = [[ln for ln in lines if ln.strip() and not ln.strip().startswith((".", "//", "#", ";"))
                       and not ln.strip().endswith(":")]]
        for body in bodies:
            out.append({"function": name, "kind": kind, "instructions": len(body), "vector": count_vector(body),
                        "asm": "\n".join(ln.strip() for ln in body)})
    return out


def hot_loop(loops: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The loop doing the kernel's work: the one with the most vector instructions
    (ties: the longest)."""
    if not loops:
        return None
    return max(loops, key=lambda lp: (sum(lp["vector"].values()), lp["instructions"]))


def llvm_mca(loop_asm: str, triple: str, cpu: str, features: str, iterations: int = 200) -> dict[str, Any]:
    """Run llvm-mca on one loop body; ``{"available": False, "note": ...}`` when llvm-mca
    is not installed or cannot read the loop."""
    exe = find_llvm_mca()
    if exe is None:
        return {"available": False, "note": "llvm-mca not found (apt-get install llvm-19)"}
    cmd = [exe, f"-mtriple={triple}", f"-mcpu={cpu}", f"-iterations={iterations}"]
    if features:
        cmd.append(f"-mattr={features}")
    try:
        res = subprocess.run(cmd, input=loop_asm + "\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "note": f"llvm-mca failed: {exc}"}
    if res.returncode != 0:
        return {"available": True, "ok": False, "note": res.stderr.strip().splitlines()[-1:] or ""}
    rep = res.stdout
    total = re.search(r"Total Cycles:\s+(\d+)", rep)
    bound = _resource_bound(rep)
    cycles = int(total.group(1)) / iterations if total else None
    return {"available": True, "ok": True, "tool": exe, "cycles_per_iteration": cycles,
            "resource_bound_cycles": bound,
            "ipc": float(m.group(1)) if (m := re.search(r"IPC:\s+([\d.]+)", rep)) else None,
            "efficiency": (bound / cycles) if (bound and cycles) else None}


def _resource_bound(report: str) -> float | None:
    """Max per-iteration pressure over the resources (the throughput lower bound)."""
    m = re.search(r"Resource pressure per iteration:\n(.*?)\n(.*?)\n", report)
    if not m:
        return None
    vals = [float(v) for v in m.group(2).split() if re.fullmatch(r"[\d.]+", v)]
    return max(vals) if vals else None


def find_llvm_mca() -> str | None:
    import shutil

    for cand in ("llvm-mca-19", "/usr/lib/llvm-19/bin/llvm-mca", "llvm-mca"):
        path = shutil.which(cand) or (cand if os.path.isfile(cand) else None)
        if path:
            return path
    return None


def run_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run the cross-compilation in a fresh interpreter with ``NUMBA_OPT=0``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        # a private cache: code cached by an optimised (host) run must not be reused
        env = dict(os.environ, NUMBA_OPT="0", NUMBA_DISABLE_INTEL_SVML="1", NUMBA_CACHE_DIR=str(Path(tmp) / "cache"))
        env.pop("NUMBA_CPU_NAME", None)
        env.pop("NUMBA_CPU_FEATURES", None)
        res = subprocess.run([sys.executable, "-m", "sparseforge.kernels.crossasm", str(spec_path), str(out_path)],
                             env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"cross-compilation failed:\n{res.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def _main(spec_path: str, out_path: str) -> None:
    import importlib.util

    if os.environ.get("NUMBA_OPT") != "0":
        raise SystemExit("run with NUMBA_OPT=0 (see run_subprocess)")
    spec = json.loads(Path(spec_path).read_text())
    mspec = importlib.util.spec_from_file_location("_sf_crossasm_kernels", spec["module"])
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mspec.name] = module
    mspec.loader.exec_module(module)
    probes = module.ARM_PROBES()
    irs = {}
    for kernel, (fn, args) in probes.items():
        fn(*args)
        irs[kernel] = list(fn.inspect_llvm().values())[-1]
    result: dict[str, Any] = {}
    for t in spec["targets"]:
        per = {}
        for kernel, ir in irs.items():
            asm = compile_ir(ir, t["triple"], t["cpu"], t["features"])
            per[kernel] = {"asm": asm, "symbol": probes[kernel][0].py_func.__name__}
        result[t["name"]] = per
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
