"""Recovery fine-tuning by distillation (toolchain.finetune) on tiny random models:
the loss falls, L1 adds sparsity, runs are deterministic and resume from checkpoints."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sparseforge.toolchain.calibration import Sequences
from sparseforge.toolchain.finetune import (
    CHECKPOINT, FinetuneOptions, TeacherOutputs, batch_indices, distill, l1_at, lr_at,
)
from sparseforge.toolchain.frontends.hf import load_hf_checkpoint
from sparseforge.toolchain.reference import executor_for
from sparseforge.toolchain.torch_model import build_torch_model

OPTS = FinetuneOptions(steps=30, lr=1e-3, batch_size=8, warmup_steps=3, l1=0.0, l1_warmup=0.3,
                       checkpoint_every=5, threads=1)


@pytest.fixture(scope="module")
def pair(tiny_model):
    """``pair(kind)`` -> (student, teacher, train): the teacher is the tiny model with its FFN
    weights scaled up (random FFNs barely matter otherwise), the student its ReLU version."""
    cache = {}

    def make(kind: str):
        if kind not in cache:
            teacher = load_hf_checkpoint(tiny_model(kind)[0]).evolve()
            for b in teacher.blocks:
                for name in (b.gate, b.up, b.down):
                    if name:
                        teacher.store.set(name, teacher.store.get_f32(name) * np.float32(4))
            student = teacher.evolve()
            for b in student.blocks:
                b.activation = "relu"
                if b.gate:
                    b.up_activation = "relu"
            rng = np.random.default_rng(0)
            n, T = 64, 16
            ids = rng.integers(3, teacher.spec.vocab_size, (n, T))
            lengths = rng.integers(8, T + 1, n)
            ids[np.arange(T)[None] >= lengths[:, None]] = 0
            cache[kind] = (student, teacher, Sequences(ids, lengths))
        return cache[kind]

    return make


def _run(pair, kind, opts=OPTS, **kw):
    student, teacher, train = pair(kind)
    kw.setdefault("seed", 0)
    kw.setdefault("state_dir", None)
    return distill(student, teacher, train, opts, progress=False, **kw)


def _ffn_tensors(ir):
    return {n: ir.store.get(n) for b in ir.blocks for n in b.weight_names()}


def _assert_same_weights(a, b):
    assert a.store.names() == b.store.names()
    for name in a.store.names():
        assert np.array_equal(a.store.get(name), b.store.get(name)), name


def test_schedules():
    o = FinetuneOptions(steps=100, lr=1.0, warmup_steps=10, l1=2.0, l1_warmup=0.5)
    assert lr_at(o, 0) == pytest.approx(0.1) and lr_at(o, 9) == pytest.approx(1.0)
    assert lr_at(o, 10) == pytest.approx(1.0) and lr_at(o, 55) == pytest.approx(0.5) and lr_at(o, 99) < 0.01
    assert l1_at(o, 0) == pytest.approx(0.04) and l1_at(o, 24) == pytest.approx(1.0) and l1_at(o, 60) == 2.0
    assert l1_at(dataclasses.replace(o, l1_warmup=0.0), 0) == 2.0
    # every row once per epoch, a fresh order each epoch
    epoch0 = np.concatenate([batch_indices(20, 5, 0, s) for s in range(4)])
    epoch1 = np.concatenate([batch_indices(20, 5, 0, s) for s in range(4, 8)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and not np.array_equal(epoch0, epoch1)
    assert list(batch_indices(3, 8, 0, 7)) == [0, 1, 2]
    with pytest.raises(ValueError):
        FinetuneOptions(steps=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_loss_decreases_and_weights_change(pair, kind):
    student, teacher, train = pair(kind)
    out, stats = _run(pair, kind)
    curve = [p["distill"] for p in stats["loss_curve"]]
    assert stats["steps"] == 30 and stats["resumed_from"] == 0 and len(stats["loss_curve"]) == 30
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:3])
    assert stats["first_loss"] == curve[0] and stats["last_loss"] == curve[-1]
    assert len(stats["sparsity_per_layer"]) == student.spec.num_layers
    assert out.graph is None and out.blocks[0].activation == "relu"
    before, after = _ffn_tensors(student), _ffn_tensors(out)
    assert all(not np.array_equal(before[n], after[n]) for n in before)
    # the trained IR runs in the numpy reference and is closer to the teacher than before
    ids, mask = train.ids[:8, :16], train.mask[:8, :16]
    real = mask.astype(bool)

    def err(ir):
        ex, tex = executor_for(ir), executor_for(teacher)
        if kind == "bert":
            return float(np.mean(1 - np.sum(ex.embed(ids, mask) * tex.embed(ids, mask), axis=1)))
        return float(np.abs(ex.forward(ids, attention_mask=mask) - tex.forward(ids, attention_mask=mask))[real].mean())

    assert err(out) < 0.7 * err(student)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_l1_increases_sparsity(pair, kind):
    _, plain = _run(pair, kind)
    _, sparse = _run(pair, kind, dataclasses.replace(OPTS, l1=1.0))
    assert sparse["sparsity"] > plain["sparsity"] + 0.1
    assert sparse["loss_curve"][-1]["loss"] > sparse["loss_curve"][-1]["distill"]  # the L1 term is in the loss


def test_same_seed_same_weights_and_callers_state_kept(pair):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a, sa = _run(pair, "llama", dataclasses.replace(OPTS, steps=12, l1=0.5))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    b, sb = _run(pair, "llama", dataclasses.replace(OPTS, steps=12, l1=0.5))
    _assert_same_weights(a, b)
    assert sa["loss_curve"] == sb["loss_curve"]
    c, _ = _run(pair, "llama", dataclasses.replace(OPTS, steps=12, l1=0.5), seed=1)  # another batch order
    assert not np.array_equal(c.store.get(c.blocks[0].up), a.store.get(a.blocks[0].up))


class _Stop(KeyboardInterrupt):
    pass


def _stop_at(k):
    def on_step(step, info):
        assert {"loss", "distill", "lr", "l1_weight", "sparsity"} <= set(info)
        if step == k:
            raise _Stop()
    return on_step


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_interrupted_run_resumes(pair, kind, tmp_path):
    opts = dataclasses.replace(OPTS, steps=20, l1=0.5)
    full, full_stats = _run(pair, kind, opts)
    with pytest.raises(KeyboardInterrupt):
        _run(pair, kind, opts, state_dir=tmp_path, on_step=_stop_at(12))
    assert (tmp_path / CHECKPOINT).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != CHECKPOINT]  # no temp files left
    seen = []
    resumed, stats = _run(pair, kind, opts, state_dir=tmp_path, on_step=lambda s, i: seen.append(s))
    assert stats["resumed_from"] == 10 and seen == list(range(11, 21))
    _assert_same_weights(resumed, full)
    assert stats["loss_curve"] == full_stats["loss_curve"]  # the history survives the restart
    # a finished run's checkpoint makes a rerun immediate
    again, stats2 = _run(pair, kind, opts, state_dir=tmp_path, on_step=lambda s, i: pytest.fail("trained again"))
    assert stats2["resumed_from"] == 20
    _assert_same_weights(again, full)


def test_mismatching_checkpoint_is_ignored(pair, tmp_path):
    opts = dataclasses.replace(OPTS, steps=12)
    with pytest.raises(KeyboardInterrupt):
        _run(pair, "bert", opts, state_dir=tmp_path, on_step=_stop_at(7))
    other = dataclasses.replace(opts, lr=5e-4)
    fresh, _ = _run(pair, "bert", other)
    got, stats = _run(pair, "bert", other, state_dir=tmp_path)
    assert stats["resumed_from"] == 0
    _assert_same_weights(got, fresh)
    # another seed or another student is another run too
    _, stats = _run(pair, "bert", other, state_dir=tmp_path, seed=3)
    assert stats["resumed_from"] == 0
    student, teacher, train = pair("bert")
    changed = student.evolve()
    changed.blocks[0].activation = "fatrelu"
    changed.blocks[0].activation_threshold = 0.01
    _, stats = distill(changed, teacher, train, other, seed=3, state_dir=tmp_path, progress=False)
    assert stats["resumed_from"] == 0
    # a corrupt checkpoint is not resumable either
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    got, stats = _run(pair, "bert", other, state_dir=tmp_path)
    assert stats["resumed_from"] == 0
    _assert_same_weights(got, fresh)


def test_train_ffn_only_keeps_other_tensors(pair):
    student, _, _ = pair("llama")
    out, _ = _run(pair, "llama", dataclasses.replace(OPTS, steps=5, train_ffn_only=True))
    ffn = {n for b in student.blocks for n in b.weight_names()}
    assert set(out.store.overlay_names()) - set(student.store.overlay_names()) == set()  # FFN tensors were overlays already
    for name in out.store.names():
        same = np.array_equal(out.store.get(name), student.store.get(name))
        assert same != (name in ffn), name


def test_cached_teacher_outputs_match(pair):
    _, teacher, train = pair("bert")
    model = build_torch_model(teacher)
    cached = TeacherOutputs(model, train, OPTS)
    direct = TeacherOutputs(model, train, dataclasses.replace(OPTS, steps=1))
    assert cached.cache is not None and direct.cache is None
    rows = batch_indices(len(train), 8, 0, 3)
    width = int(train.lengths[rows].max())
    real = torch.from_numpy(train.mask[rows, :width]).bool()
    a, b = cached(rows, width), direct(rows, width)
    assert a.shape == b.shape and torch.allclose(a[real], b[real], atol=1e-5)
    assert torch.isfinite(a).all()
