#!/bin/sh
# Run the kernel tests on emulated aarch64 (qemu-user): SVE at 128, 256 and 512 bits and a
# NEON-only CPU. Sets itself up first (tests/arm/setup.sh). Usage:
#   tests/arm/run.sh [CONFIG...]        CONFIG in sve128 sve256 sve512 neon (default: all)
# Tests: SPARSEFORGE_ARM_PYTEST (default: the kernel tests; they need no conftest fixtures,
# and conftest imports torch, which the emulated environment does not have).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ARM_DIR="$(sh "$HERE/setup.sh" | tail -n 1)"
ROOTFS="$ARM_DIR/rootfs"
SITE="$ARM_DIR/site"
SHIM="$ARM_DIR/shim"
# the project's packages under their installed names (the repo maps sparseforge.X -> X/)
mkdir -p "$SHIM/sparseforge"
: > "$SHIM/sparseforge/__init__.py"
for pkg in kernels targets toolchain passes; do ln -sfn "$ROOT/$pkg" "$SHIM/sparseforge/$pkg"; done
TESTS="${SPARSEFORGE_ARM_PYTEST:-tests/test_kernels_formats.py tests/test_kernels.py tests/test_norm_kernels.py}"
CONFIGS="${*:-sve128 sve256 sve512 neon}"
status=0
for cfg in $CONFIGS; do
    case "$cfg" in
        sve128) QCPU="max,sve128=on"; NCPU="generic"; NFEAT="+neon,+sve,+dotprod" ;;
        sve256) QCPU="max,sve256=on"; NCPU="neoverse-v1"; NFEAT="+neon,+sve,+dotprod,+i8mm" ;;
        sve512) QCPU="max,sve512=on"; NCPU="a64fx"; NFEAT="+neon,+sve" ;;
        neon)   QCPU="neoverse-n1"; NCPU="neoverse-n1"; NFEAT="+neon,+dotprod" ;;
        *) echo "unknown ARM config $cfg (sve128 sve256 sve512 neon)" >&2; exit 2 ;;
    esac
    echo "== $cfg: qemu-aarch64 -cpu $QCPU, NUMBA_CPU_NAME=$NCPU NUMBA_CPU_FEATURES=$NFEAT"
    start=$(date +%s)
    if (cd "$ROOT" && env -i HOME="$HOME" PATH=/usr/bin:/bin LANG=C.UTF-8 \
            PYTHONPATH="$SHIM:$SITE" NUMBA_CPU_NAME="$NCPU" NUMBA_CPU_FEATURES="$NFEAT" \
            NUMBA_CACHE_DIR="$ARM_DIR/numba-cache/$cfg" NUMBA_NUM_THREADS=2 \
            qemu-aarch64 -cpu "$QCPU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" -m pytest -q -x \
            -p no:cacheprovider --noconftest $TESTS); then
        echo "== $cfg: passed in $(( $(date +%s) - start )) s"
    else
        echo "== $cfg: FAILED after $(( $(date +%s) - start )) s"
        status=1
    fi
done
exit $status
