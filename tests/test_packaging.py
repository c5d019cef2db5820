"""The wheel holds every module under the sparseforge.* names and works when installed."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents_and_installed_import(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sparseforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("toolchain", "passes", "kernels", "targets"):
        for src in (ROOT / folder).rglob("*.py"):
            assert f"sparseforge/{src.relative_to(ROOT).as_posix()}" in names, src
    assert "sparseforge/toolchain/recipes/default.toml" in names
    assert not any(n.startswith(("tests/", "toolchain/", "kernels/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sparseforge.toolchain.cli as c, sparseforge.passes, sparseforge.kernels, sparseforge.targets;"
            "from sparseforge.toolchain.recipe import load_recipe; print(c.__file__, load_recipe(None).name)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(target)) and out.stdout.strip().endswith("default")
