#!/bin/sh
# Set up emulated aarch64 execution of the kernel tests (idempotent):
# qemu-user + debootstrap (apt, as root), a Debian bookworm arm64 rootfs with python3.11,
# and aarch64 wheels of numba/numpy/pytest/gguf/ml_dtypes in a site directory. Everything lives in
# $SPARSEFORGE_ARM_DIR (default ~/.cache/sparseforge/arm).
set -eu
ARM_DIR="${SPARSEFORGE_ARM_DIR:-$HOME/.cache/sparseforge/arm}"
MIRROR="${SPARSEFORGE_ARM_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-python3}"
ROOTFS="$ARM_DIR/rootfs"
SITE="$ARM_DIR/site"
mkdir -p "$ARM_DIR"

if ! command -v qemu-aarch64 >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-user debootstrap >/dev/null
fi

if [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
    rm -rf "$ROOTFS.tmp"
    # --foreign then unpacking the .debs is much faster than the second stage and
    # needs no binfmt_misc
    debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,libstdc++6 bookworm "$ROOTFS.tmp" "$MIRROR" >"$ARM_DIR/debootstrap.log" 2>&1
    for deb in "$ROOTFS.tmp"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOTFS.tmp"; done
    mv "$ROOTFS.tmp" "$ROOTFS"
fi

if [ ! -f "$SITE/.complete" ] || [ ! -d "$SITE/ml_dtypes" ]; then
    rm -rf "$SITE"
    "$PY" -m pip install --quiet --target "$SITE" --platform manylinux2014_aarch64 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 \
        --implementation cp --abi cp311 --only-binary=:all: numba pytest gguf ml_dtypes
    touch "$SITE/.complete"
fi
echo "$ARM_DIR"
