"""toolchain.linear_reference: the rank-r least-squares predictor of the pre-activation."""
import numpy as np
import pytest

from sparseforge.toolchain.linear_reference import linear_reference, sparsity_sweep


def _layer(seed=0, S=3000, d=24, n=40, r0=3, noise=1e-3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, d)).astype(np.float32)
    z = x @ rng.standard_normal((d, r0)) @ rng.standard_normal((r0, n)) + 0.5 + noise * rng.standard_normal((S, n))
    active = z > 1.0
    perm = rng.permutation(S)
    split = (np.sort(perm[S // 5:]), np.sort(perm[:S // 5]))
    return x, z, active, split


def test_matches_a_direct_reduced_rank_fit():
    x, z, active, (train, held) = _layer(noise=0.3)
    rows = linear_reference(x, z, active, (train, held), [1, 2], recall=0.99)
    # independent: lstsq on the training rows, SVD of the [S_train, n] fitted values
    X = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    coef = np.linalg.lstsq(X[train], z[train], rcond=None)[0]
    _, _, vt = np.linalg.svd(X[train] @ coef, full_matrices=False)
    for row, r in zip(rows, (1, 2)):
        score = X[held] @ coef @ vt[:r].T @ vt[:r]
        pos = np.sort(score[active[held]])[::-1]
        k = int(np.ceil(0.99 * pos.size))
        pred = score >= pos[k - 1] - 1e-9 * abs(pos[k - 1])
        tp = np.sum(pred & active[held])
        assert row["rank"] == r
        assert row["recall"] == pytest.approx(tp / active[held].sum(), abs=2e-3)
        assert row["density"] == pytest.approx(pred.mean(), abs=2e-3)
        assert row["true_density"] == pytest.approx(active[held].mean())
        assert row["density_ratio"] == pytest.approx(row["density"] / row["true_density"])
        assert row["recall"] >= 0.99


def test_the_true_rank_predicts_almost_exactly_and_less_rank_costs_density():
    x, z, active, split = _layer(noise=1e-3)
    low, exact = linear_reference(x, z, active, split, [1, 3], recall=0.99)
    assert exact["recall"] >= 0.99 and exact["density_ratio"] < 1.02
    assert low["density_ratio"] > exact["density_ratio"] + 0.1


def test_too_few_training_rows_is_an_error():
    x, z, active, _ = _layer(S=40)
    with pytest.raises(ValueError, match="training rows"):
        linear_reference(x, z, active, (np.arange(10), np.arange(10, 40)), [1], 0.99)


def test_sparsity_sweep_matches_a_direct_threshold_and_reference():
    x, z, active, (train, held) = _layer(noise=0.3)
    rows = sparsity_sweep(x, z, (train, held), 2, [0.5, 0.2, 0.05], recall=0.99)
    for row, q in zip(rows, (0.5, 0.2, 0.05)):
        v = np.sort(z[train].ravel())  # the (1 - q) quantile, interpolated between order statistics
        pos = (1 - q) * (v.size - 1)
        t = v[int(pos)] + (pos - int(pos)) * (v[int(pos) + 1] - v[int(pos)])
        assert row["target_density"] == q
        assert row["threshold"] == pytest.approx(t, abs=1e-6)
        act = z > row["threshold"]
        assert row["true_density"] == pytest.approx(act[held].mean())
        assert row["true_density"] == pytest.approx(q, abs=0.02)  # held-out rows follow the training quantile
        # the same map and calibration as linear_reference with that activity
        (ref,) = linear_reference(x, z, act, (train, held), [2], recall=0.99)
        assert {k: row[k] for k in ref} == ref


def test_a_sparser_layer_costs_more_density_at_the_same_rank():
    x, z, _, split = _layer(noise=0.3)
    ratios = [row["density_ratio"] for row in sparsity_sweep(x, z, split, 2, [0.5, 0.2, 0.05], recall=0.99)]
    assert ratios[0] < ratios[1] < ratios[2]


def test_sparsity_sweep_rejects_densities_outside_0_1():
    x, z, _, split = _layer()
    with pytest.raises(ValueError, match="target densities"):
        sparsity_sweep(x, z, split, 1, [1.0], recall=0.99)
