"""Executors: the artifact does not depend on where per-layer work runs (in this process,
1 or 2 local worker processes, Ray tasks), and the executor is a run setting (recipe
key, ``convert --executor``) kept out of the cache key and the artifact."""
from __future__ import annotations

import pytest
from test_interrupt import prepare, reference, sha256  # noqa: F401 (fixture)

from sparseforge.toolchain.errors import InputError
from sparseforge.toolchain.executors import RayExecutor, make_executor, result_options
from sparseforge.toolchain.pipeline import convert_model
from sparseforge.toolchain.recipe import load_recipe, parse_recipe


def _convert(tmp_path, monkeypatch, ckpt, **kw) -> str:
    recipe = prepare(tmp_path)
    monkeypatch.chdir(tmp_path)  # the recipe names its calibration file relative to the working directory
    report = convert_model(ckpt, tmp_path / "out", recipe=recipe, **kw)
    by_pass = {r["name"]: r for r in report["passes"]}
    for name in ("predictors", "quantize"):
        assert by_pass[name]["options"]["executor"] == kw.get("executor", "local")
    return sha256(tmp_path / "out" / "model.gguf")


def test_two_local_worker_processes_give_the_same_artifact(reference, tmp_path, monkeypatch):
    ckpt, expected = reference  # made with one worker (in this process)
    assert _convert(tmp_path, monkeypatch, ckpt, workers=2) == expected


def test_ray_gives_the_same_artifact(reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sparseforge[ray]')")
    ckpt, expected = reference
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert _convert(tmp_path, monkeypatch, ckpt, executor="ray") == expected
        assert RayExecutor(workers=1).map(abs, [-3, 1, -2]) == [3, 1, 2]  # in order, one in flight
    finally:
        ray.shutdown()


def test_executor_is_a_run_setting(tmp_path):
    r = parse_recipe('executor = "serial"\nworkers = 2\n[[pass]]\nname = "predictors"\n'
                     '[[pass]]\nname = "quantize"\n[pass.options]\nworkers = 1\n', "r.toml")
    predictors, quantize = r.instantiate()
    assert (predictors.options.executor, predictors.options.workers) == ("serial", 2)
    assert (quantize.options.executor, quantize.options.workers) == ("serial", 1)  # the pass's own wins
    r.override(["executor=local", "workers=0"])
    assert r.instantiate()[0].options.executor == "local" and r.to_dict()["executor"] == "local"
    assert result_options({"executor": "ray", "workers": 3, "ranks": [8]}) == {"ranks": [8]}
    for bad in ('executor = "cluster"', "workers = -1"):
        with pytest.raises(InputError, match="executor|workers"):
            parse_recipe(bad + '\n[[pass]]\nname = "quantize"\n', "bad.toml")
    with pytest.raises(InputError, match="executor"):
        load_recipe(None).override(["executor=cluster"])
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("cluster")


def test_workers_do_not_change_the_cache_key(tiny_model):
    from sparseforge.passes.quantize import Quantize, QuantizeOptions
    from sparseforge.toolchain.frontends import load_model
    from sparseforge.toolchain.pass_manager import PassManager

    ir = load_model(tiny_model("llama")[0])
    keys = {PassManager([]).cache_key(ir, Quantize(QuantizeOptions(executor=e, workers=w)))
            for e, w in (("local", 1), ("local", 2), ("ray", 0), ("serial", 1))}
    assert len(keys) == 1
