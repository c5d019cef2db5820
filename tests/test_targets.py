"""Target descriptions, lookup, host detection, recipe `target` and the CLI."""
import pytest

from sparseforge.targets import ALIASES, TARGETS, get_target, host_target
from sparseforge.toolchain.cli import main
from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.recipe import parse_recipe


def test_target_table():
    for name in ("x86-64", "x86-64-v3", "x86-64-v4", "neoverse-n1", "apple-m1", "neoverse-v1", "a64fx"):
        t = TARGETS[name]
        assert t.vector_bits in (128, 256, 512) and t.bundle_align & (t.bundle_align - 1) == 0
        assert t.env["NUMBA_CPU_NAME"] == t.cpu and t.mca_cpu
        assert t.to_dict()["name"] == name
    assert TARGETS["neoverse-v1"].sve and TARGETS["a64fx"].vector_bits == 512
    assert TARGETS["neoverse-n1"].int8_dot == "sdot" and not TARGETS["neoverse-n1"].sve
    assert all(a in TARGETS for a in ALIASES.values())
    assert get_target("cortex-a76").name == "neoverse-n1"
    assert get_target("host") == host_target() == get_target(None)
    with pytest.raises(InputError, match="unknown target 'z80'"):
        get_target("z80")


def test_recipe_target_key_and_override():
    text = 'target = "graviton3"\n[[pass]]\nname = "emit"\n[[pass]]\nname = "weight-stats"\n'
    r = parse_recipe(text, "r.toml")
    assert r.target == "neoverse-v1"
    assert r.instantiate()[0].options.target == "neoverse-v1"
    r.override(["target=a64fx"])
    assert r.instantiate()[0].options.target == "a64fx" and r.to_dict()["target"] == "a64fx"
    r2 = parse_recipe('target = "x86-64"\n[[pass]]\nname = "emit"\n[pass.options]\ntarget = "apple-m1"\n', "r.toml")
    assert r2.instantiate()[0].options.target == "apple-m1"  # an explicit pass option wins
    with pytest.raises(InputError, match="unknown target"):
        parse_recipe('target = "vax"\n[[pass]]\nname = "emit"\n', "r.toml")


def test_cli_targets_and_bad_target(capsys):
    with pytest.raises(SystemExit) as e:
        main(["targets"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "neoverse-v1" in out and "(host)" in out
    with pytest.raises(SystemExit) as e:
        main(["convert", "nowhere", "-o", "nowhere-out", "--target", "bogus"])
    assert e.value.code == 2
    assert "unknown target 'bogus'" in capsys.readouterr().err
