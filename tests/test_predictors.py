"""The predictors pass: metric arithmetic, calibration, held-out recall, determinism across
worker counts, gate-first for dReLU, budget fallbacks, masked evaluation, errors, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TEXT
from sparseforge.passes.predictors import Predictors, PredictorsOptions, tensor_name
from sparseforge.passes.profile import Profile, ProfileOptions
from sparseforge.passes.relufy import Relufy, RelufyOptions
from sparseforge.toolchain.errors import PassError
from sparseforge.toolchain.executors import LocalExecutor, SerialExecutor, make_executor
from sparseforge.toolchain.frontends import load_model
from sparseforge.toolchain.masked_eval import MaskedFFN, evaluation_sequences, masked_quality
from sparseforge.toolchain.pass_manager import PassManager
from sparseforge.toolchain.predictor import (NEVER, TrainConfig, as_weights,
                                             calibrate_threshold, make_predictor, mask_metrics, predict_mask,
                                             predictor_logits, split_rows, train_predictor)
from sparseforge.toolchain.reference import executor_for, ffn_forward
from sparseforge.toolchain.safetensors_io import SafetensorsFile
from sparseforge.toolchain.samples import read_shards

FAST = dict(ranks=(8, 16, 32), budget=1.0, max_epochs=12, patience=3, eval_sequences=8)


@pytest.fixture(scope="module")
def relufied(tiny_model, tmp_path_factory):
    """``relufied(kind)``: tiny bert (mode relu) or llama (mode drelu), profiled, relufied
    without training, profiled again (the samples predictors train on)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"relufied-{kind}")
            ir = load_model(tiny_model(kind)[0])
            np.save(d / "ids.npy", np.random.default_rng(0).integers(4, ir.spec.vocab_size, size=(100, 16)))
            po = ProfileOptions(calib=str(d / "ids.npy"), seq_len=16, num_sequences=80, heldout_fraction=0.2)
            ro = RelufyOptions(mode="relu" if kind == "bert" else "drelu", sweep=(0.6,), eval_sequences=8)
            cache[kind] = PassManager([Profile(po), Relufy(ro), Profile(po)], cache_dir=d / "cache").run(ir).ir
        return cache[kind]

    return make


def _train(ir, **kw):
    return PassManager([Predictors(PredictorsOptions(**{**FAST, "workers": 1, **kw}))]).run(ir)


# -- arithmetic ---------------------------------------------------------------------------
def test_mask_metrics_match_a_direct_computation():
    rng = np.random.default_rng(1)
    for shape, p_pred, p_act in (((50, 40), 0.3, 0.2), ((7, 3), 0.9, 0.5), ((20, 10), 0.0, 0.3)):
        pred, act = rng.random(shape) < p_pred, rng.random(shape) < p_act
        m = mask_metrics(pred, act)
        tp = fp = fn = 0
        for p, a in zip(pred.ravel().tolist(), act.ravel().tolist()):
            tp += p and a
            fp += p and not a
            fn += a and not p
        assert (m.tp, m.fp, m.fn, m.total) == (tp, fp, fn, pred.size)
        assert m.recall == pytest.approx(tp / (tp + fn))
        assert m.precision == (pytest.approx(tp / (tp + fp)) if tp + fp else 1.0)
        assert m.density == pytest.approx(pred.mean()) and m.true_density == pytest.approx(act.mean())
    none = mask_metrics(np.zeros((3, 4), bool), np.zeros((3, 4), bool))
    assert none.recall == 1.0 and none.precision == 1.0 and none.density == 0.0
    assert (mask_metrics(pred[:5], act[:5]) + mask_metrics(pred[5:], act[5:])) == mask_metrics(pred, act)
    with pytest.raises(ValueError, match="shape"):
        mask_metrics(pred, act.T)


def test_calibrated_threshold_is_the_largest_reaching_the_target():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((200, 30)).astype(np.float32)
    active = (logits + rng.standard_normal((200, 30)) > 0.8)
    for target in (0.5, 0.9, 0.99, 1.0):
        t = calibrate_threshold(logits, active, target)
        assert mask_metrics(logits >= np.float32(t), active).recall >= target
        above = np.nextafter(np.float32(t), np.float32(np.inf))
        assert mask_metrics(logits >= above, active).recall < target
    assert calibrate_threshold(logits, np.zeros_like(active), 0.99) == NEVER
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="recall"):
            calibrate_threshold(logits, active, bad)


def test_numpy_inference_matches_torch():
    import torch

    torch.manual_seed(0)
    for bias in (False, True):
        model = make_predictor(12, 5, 20, bias=bias)
        x = np.random.default_rng(3).standard_normal((9, 12)).astype(np.float32)
        w = model.numpy_weights()
        assert w.w1.shape == (5, 12) and w.w2.shape == (20, 5) and (w.b1 is not None) == bias
        assert w.params == 12 * 5 + 5 * 20 + (25 if bias else 0)
        with torch.no_grad():
            expect = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(predictor_logits(w, x), expect, atol=1e-5)
        np.testing.assert_array_equal(predict_mask(w, x, 0.1), predictor_logits(w, x) >= np.float32(0.1))


def test_split_is_deterministic_and_keeps_sequences_together():
    groups = np.repeat(np.arange(30), 7)
    train, held = split_rows(len(groups), 0.2, seed=4, groups=groups)
    assert set(groups[train]).isdisjoint(groups[held]) and len(train) + len(held) == len(groups)
    assert abs(len(held) - 0.2 * len(groups)) <= 7
    again = split_rows(len(groups), 0.2, seed=4, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip((train, held), again))
    train, held = split_rows(10, 0.3, seed=0)
    assert len(held) == 3 and sorted(np.concatenate([train, held]).tolist()) == list(range(10))


def test_training_learns_a_predictable_mask():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1200, 16)).astype(np.float32)
    low = rng.standard_normal((40, 4)).astype(np.float32) @ rng.standard_normal((4, 16)).astype(np.float32)
    active = x @ low.T > 0  # a rank-4 linear rule
    res = train_predictor(x, active, 8, TrainConfig(max_epochs=60, recall=0.99), seed=0)
    m = res.metrics
    assert m.recall >= 0.99 and m.density <= 1.5 * m.true_density, m
    assert res.best_epoch > 10 and res.weights.rank == 8
    assert len(active) - m.total // 40 > 0.7 * len(active)  # 20% held out


# -- the pass -----------------------------------------------------------------------------
def test_predictor_layers_reach_the_recall_target_on_their_heldout_split(relufied):
    ir = relufied("bert")
    res = _train(ir, recall=0.98, density_factor=2.0)
    out, stats = res.ir, res.records[0].stats
    modes = [b.annotations["predictor"]["mode"] for b in out.blocks]
    assert "predictor" in modes, [b.annotations["predictor"] for b in out.blocks]
    for b in out.blocks:
        ann = b.annotations["predictor"]
        if ann["mode"] != "predictor":
            assert ann["reason"] and not any(n.startswith(tensor_name(b.layer, "")) for n in out.store.names())
            continue
        # recompute from the stored tensors, the samples and the documented split
        w = as_weights({k: out.store.get(v) for k, v in ann["tensors"].items()})
        assert w.rank == ann["rank"] and ann["params"] == w.params and out.store.get(ann["tensors"]["w1"]).dtype == np.float32
        x, active, token = read_shards([ir.files[k] for k in b.annotations["profile"]["sample_shards"]], 128)
        lengths = np.asarray(SafetensorsFile(ir.files["calibration/train.safetensors"]).get("lengths"))
        groups = np.searchsorted(np.cumsum(lengths), token, side="right")
        _, held = split_rows(len(x), 0.2, 0, groups)
        m = mask_metrics(predict_mask(w, x[held], ann["threshold"]), active[held])
        assert m.recall >= 0.98
        assert m.recall == pytest.approx(ann["recall"]) and m.precision == pytest.approx(ann["precision"])
        assert m.density == pytest.approx(ann["density"]) and m.true_density == pytest.approx(ann["true_density"])
        assert ann["density"] <= 2.0 * ann["true_density"]
        assert ann["flops_fraction"] == pytest.approx(2 * w.rank * (64 + 128) / (2 * 64 * 128 * 2))
    assert stats["min_recall"] >= 0.98
    assert 0 < stats["masked_mean_cosine"] <= 1.0 + 1e-9 and stats["masked_min_cosine"] <= stats["masked_mean_cosine"]
    report = json.loads(Path(out.files["predictors/predictors.json"]).read_text())
    assert [row["mode"] for row in report["layers"]] == modes and report["layers"][0]["attempts"]
    assert {"recall", "precision", "density", "true_density", "rank", "params", "seconds"} <= set(report["layers"][0])
    assert Path(out.files["predictors/predictors.png"]).read_bytes()[:4] == b"\x89PNG"
    assert out.graph == ir.graph  # no weight changed


def test_same_seed_same_tensors_with_one_or_two_workers(relufied):
    ir = relufied("bert")
    opts = dict(ranks=(8, 16), density_factor=3.0, eval_sequences=-1)
    one, two = _train(ir, workers=1, **opts).ir, _train(ir, workers=2, **opts).ir
    names = sorted(n for n in one.store.names() if n.startswith("sparseforge.predictor."))
    assert names and names == sorted(n for n in two.store.names() if n.startswith("sparseforge.predictor."))
    for n in names:
        assert one.store.get(n).tobytes() == two.store.get(n).tobytes(), n
    for a, b in zip(one.blocks, two.blocks):
        strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
        assert strip(a.annotations["predictor"]) == strip(b.annotations["predictor"])
    other = PassManager([Predictors(PredictorsOptions(**{**FAST, **opts, "workers": 1}))], seed=1).run(ir).ir
    assert any(one.store.get(n).tobytes() != other.store.get(n).tobytes() for n in names)


def test_gate_first_for_drelu_blocks(relufied):
    ir = relufied("llama")
    assert all(b.up_activation == "relu" for b in ir.blocks)
    out = _train(ir).ir  # gate_first="auto"
    for b in out.blocks:
        ann = b.annotations["predictor"]
        assert ann["mode"] == "gate-first" and ann["params"] == 0 and ann["recall"] == 1.0
        assert ann["true_density"] <= ann["density"] <= 1.0  # the rows the gate lets through
    assert not any(n.startswith("sparseforge.predictor.") for n in out.store.names())
    res = _train(ir, gate_first="never", density_factor=4.0)
    modes = {b.annotations["predictor"]["mode"] for b in res.ir.blocks}
    assert "gate-first" not in modes and "predictor" in modes
    assert res.records[0].stats["masked_perplexity_ratio"] > 0
    with pytest.raises(PassError, match="gate_first='always' needs gated FFNs"):
        _train(relufied("bert"), gate_first="always")


def test_budget_and_unreachable_targets_fall_back(relufied):
    ir = relufied("bert")
    out = _train(ir, budget=0.01).ir  # no rank fits 1% of the FFN parameters
    assert all(b.annotations["predictor"]["mode"] == "dense" for b in out.blocks)
    assert "fits the budget" in out.blocks[0].annotations["predictor"]["reason"]
    res = _train(ir, ranks=(8,), density_factor=0.5)  # predicted density can't be half the true one at 0.99
    assert res.records[0].stats["layers_dense"] == 2 and res.records[0].stats.get("masked_exact")
    assert "no rank of [8] reached recall" in res.ir.blocks[1].annotations["predictor"]["reason"]
    res = _train(ir, ranks=(16,), density_factor=3.0, budget=0.15)  # one rank-16 predictor fits, two do not
    anns = [b.annotations["predictor"] for b in res.ir.blocks]
    assert sorted(a["mode"] for a in anns) == ["dense", "predictor"]
    kept, dropped = sorted(anns, key=lambda a: a["mode"] == "dense")
    assert "over budget: rank 16" in dropped["reason"]
    report = json.loads(Path(res.ir.files["predictors/predictors.json"]).read_text())
    (attempt,) = next(row for row in report["layers"] if row["mode"] == "dense")["attempts"]
    assert attempt["meets_target"] and attempt["density"] >= kept["density"]  # it would have saved less
    assert res.records[0].stats["params_fraction"] <= 0.15


def test_errors(relufied, tiny_model):
    with pytest.raises(PassError, match="run the profile pass first"):
        _train(load_model(tiny_model("bert")[0]))
    for bad in (0.0, 1.5, -0.1):
        p = Predictors(PredictorsOptions(recall=bad))
        with pytest.raises(PassError, match=r"recall must be in \(0, 1\]"):
            p.check_options()
        with pytest.raises(PassError, match="recall"):  # before any pass runs
            PassManager([Profile(), p]).run(load_model(tiny_model("bert")[0]))
    for kw in (dict(ranks=()), dict(heldout_fraction=1.0), dict(executor="nope"), dict(workers=-1)):
        with pytest.raises(PassError):
            Predictors(PredictorsOptions(**kw)).check_options()


# -- masked evaluation and executors ----------------------------------------------------------
def test_masked_ffn_is_exact_with_the_true_mask(relufied):
    ir = relufied("bert")
    x = np.random.default_rng(6).standard_normal((11, 64)).astype(np.float32)
    block = ir.blocks[0]

    def true_mask(x2):
        seen = []
        ffn_forward(ir.store, block, x2, capture=lambda _l, _x, h: seen.append(h.copy()))
        return seen[0] != 0

    ref = ffn_forward(ir.store, block, x)
    for fn in (true_mask, lambda x2: np.ones((len(x2), 128), bool)):
        masked = MaskedFFN({0: fn})
        np.testing.assert_array_equal(masked(ir.store, block, x), ref)
        assert masked.metrics[0].recall == 1.0
    dropped = MaskedFFN({0: lambda x2: np.zeros((len(x2), 128), bool)})(ir.store, block, x)
    np.testing.assert_allclose(dropped, np.broadcast_to(ir.store.get_f32(block.down_bias), ref.shape), atol=1e-6)
    seqs = evaluation_sequences(ir, 4)
    exact = masked_quality(ir, seqs, {b.layer: (lambda x2: np.ones((len(x2), 128), bool)) for b in ir.blocks})
    assert exact["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert [row["recall"] for row in exact["layers"]] == [1.0, 1.0]
    full = executor_for(ir).embed(seqs.ids, seqs.mask)
    assert full.shape == (4, 64)


def test_executors_keep_task_order():
    tasks = list(range(7))
    assert SerialExecutor().map(abs, [-t for t in tasks]) == tasks
    assert LocalExecutor(workers=1).map(abs, [-t for t in tasks]) == tasks
    assert make_executor("local", 3).workers == 3
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("cluster")


# -- CLI ------------------------------------------------------------------------------------
def _main(*args, capsys):
    """Run the command line in this process (as the console script does); returns
    (exit code, stdout, stderr)."""
    from sparseforge.toolchain.cli_predictors import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli(tiny_bert_tokenized, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / ".cache"))
    (tmp_path / "c.txt").write_text(TEXT)
    base = ["train-predictors", str(tiny_bert_tokenized), "--calib", "c.txt", "--seq-len", "16", "-o", "out"]
    for extra, message in ((["--recall", "0"], "recall must be in (0, 1], got 0.0"),
                           (["--recall", "1.5"], "recall must be in (0, 1], got 1.5"),
                           (["--ranks", "8,x"], "--ranks '8,x'"),
                           (["--gate-first", "sometimes"], "Invalid value for '--gate-first'")):
        code, _, err = _main(*base, *extra, capsys=capsys)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists()
    code, out, err = _main(*base, "--ranks", "8,16", "--budget", "1", "--density-factor", "3", "--workers", "1",
                           "--max-epochs", "5", "--eval-sequences", "4", capsys=capsys)
    assert code == 0, err
    assert "profile" in out and "predictors" in out and "layer  1:" in out  # profiled first: no samples
    report = json.loads((tmp_path / "out" / "predictors.json").read_text())
    assert len(report["layers"]) == 2 and (tmp_path / "out" / "predictors.png").is_file()
    code, out, _ = _main("train-predictors", "out/ir", "-o", "again", "--ranks", "8", "--workers", "1",
                         "--max-epochs", "2", "--eval-sequences", "-1", capsys=capsys)
    assert code == 0 and "profile " not in out  # the IR holds samples: no second profile


def test_cli_module_entry_point_exit_code(tmp_path):
    env = {**os.environ, "SPARSEFORGE_CACHE_DIR": str(tmp_path / ".cache")}
    res = subprocess.run([sys.executable, "-m", "sparseforge.toolchain.cli_predictors", "train-predictors",
                          str(tmp_path), "-o", str(tmp_path / "out"), "--recall", "1.5"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "recall must be in (0, 1]" in res.stderr, res.stderr
