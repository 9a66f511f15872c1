"""`kronlik fit` with a Matérn kernel: the exact state-space path (Kalman recursions, O(T)).

Its model is the dense path's (M = k(t, t) + 1e-6 I, entering as k(t, t) ⊗ K + I ⊗ (Σ + 1e-6 K)),
so the two fits must agree; its predictions (kronlik._smoother: a filter and smoother over the
data and new times merged) must equal kronlik.predict with the dense cross-covariance.
"""

import argparse
import json

import jax.numpy as jnp
import numpy as np
import pytest

from kronlik import _fit_command, reference
from kronlik.__main__ import main
from kronlik._smoother import posterior
from kronlik.statespace import Matern12, Matern32, Matern52


def test_smoother_equals_dense_predictions():
    # against the dense posterior (numpy, float64): new times before, between, after and on the
    # data's times (a repeated data time too), the data unsorted; the slow test below compares the
    # CLI's forecasts with the dense path's (kronlik.predict with a dense M_×)
    rng = np.random.default_rng(3)
    T, D = 25, 3
    t = np.sort(rng.uniform(0.0, 4.0, T))
    t[7] = t[6]
    new = np.array([-0.5, t[10], 0.5 * (t[3] + t[4]), 4.7, t[-1], 2.0])
    kernel = Matern12(jnp.array(0.7), jnp.array(0.4)) + Matern52(jnp.array(1.0), jnp.array(1.1))
    Y = rng.standard_normal((T, D))
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.05 * np.eye(D)
    Sigma = np.diag(rng.uniform(0.05, 0.5, D)) + 1e-6 * K
    perm = rng.permutation(T)
    got = posterior(*(jnp.asarray(a) for a in (Y[perm], t[perm])), kernel, jnp.asarray(K), jnp.asarray(Sigma), new)
    k = lambda a, b: np.asarray(kernel.covariance(jnp.asarray(a[:, None] - b[None, :])))  # noqa: E731
    U = np.kron(k(t, t), K) + np.kron(np.eye(T), Sigma)
    cross = np.kron(k(new, t), K)  # Cov(vec f(new), vec Y)
    mean = (cross @ np.linalg.solve(U, Y.reshape(-1))).reshape(-1, D)
    var = np.diag(np.kron(k(new, new), K) - cross @ np.linalg.solve(U, cross.T)).reshape(-1, D)
    assert bool(got.ok)
    np.testing.assert_allclose(got.mean, mean, rtol=0, atol=1e-12 * np.max(np.abs(mean)))
    np.testing.assert_allclose(got.var, var, rtol=0, atol=1e-12 * np.max(var))
    assert np.min(var) > 1e-3  # a real posterior variance, not a clipped zero
    # with missing cells (the joint state's smoother): the dense conditional on the observed cells
    mask = rng.uniform(size=(T, D)) < 0.6
    mask[4] = False
    got = posterior(
        *(jnp.asarray(a) for a in (np.where(mask, Y, np.nan)[perm], t[perm])),
        kernel,
        jnp.asarray(K),
        jnp.asarray(Sigma),
        new,
        jnp.asarray(mask[perm]),
    )
    o = mask.reshape(-1)
    cross_o = cross[:, o]
    solved = np.linalg.solve(U[np.ix_(o, o)], np.column_stack([Y.reshape(-1)[o], cross_o.T]))
    mean = (cross_o @ solved[:, 0]).reshape(-1, D)
    var = np.diag(np.kron(k(new, new), K) - cross_o @ solved[:, 1:]).reshape(-1, D)
    assert bool(got.ok)
    np.testing.assert_allclose(got.mean, mean, rtol=0, atol=1e-12 * np.max(np.abs(mean)))
    np.testing.assert_allclose(got.var, var, rtol=0, atol=1e-12 * np.max(var))


def test_matern_kernels_take_the_state_space_path_at_any_size():
    args = argparse.Namespace(method="auto", rank=None, kernel="matern32")
    for T in (50, 20_000, 10**6):
        method, _, why = _fit_command.choose_path(args, T, 4, 0, False)
        assert method == "statespace" and "exact state-space (Kalman) likelihood, O(T)" in why
    args.kernel = "matern12 + matern52 * matern32"
    assert _fit_command.choose_path(args, 10**6, 4, 0, False)[0] == "statespace"
    # missing cells: the same exact path (a filter on the joint state); other kernels keep the
    # dense / low-rank paths
    method, _, why = _fit_command.choose_path(args, 10**6, 4, 10**5, False)
    assert method == "statespace" and "100000 missing cells: one filter on the joint state of the 4 outputs" in why
    args.kernel = "matern32 + periodic"
    assert _fit_command.choose_path(args, 20_000, 4, 0, False)[0] == "lowrank"
    args.kernel, args.method = "matern32", "dense"
    assert _fit_command.choose_path(args, 500, 4, 0, False)[0] == "dense"


def _table(path, T, seed, gaps=False):
    rng = np.random.default_rng(seed)
    t = 1990.0 + np.arange(T) / 52.0 + 0.004 * rng.random(T)  # weekly, in years, a little irregular
    F = np.column_stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t / 3), np.sin(2 * np.pi * t + 1.0)])
    Y = F + 0.3 * rng.standard_normal(F.shape)
    if gaps:  # 15 % of cells at random, a whole row, and output b's first quarter
        Y[rng.uniform(size=Y.shape) < 0.15] = np.nan
        Y[40] = np.nan
        Y[: T // 4, 1] = np.nan
    cells = (",".join("" if np.isnan(v) else f"{v:.17g}" for v in row) for row in np.column_stack([t, Y]))
    path.write_text("t,a,b,c\n" + "\n".join(cells) + "\n")
    return t, Y


def _predictions(path):
    """The numeric columns of a predictions CSV and its last column (kind: gap or new)."""
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    return np.array([[float(c) for c in r[:-1]] for r in rows]), [r[-1] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("gaps", [False, True], ids=["complete", "gaps"])
def test_state_space_fit_equals_the_eigh_fit(tmp_path, capsys, gaps):
    # With gaps the state-space path is the joint filter and the dense path the Schur complement
    # over the missing cells: two exact likelihoods of the observed cells, one model.
    T = 120
    t, Y = _table(tmp_path / "d.csv", T, seed=4, gaps=gaps)
    runs = {}
    for name, extra in (("statespace", []), ("dense", ["--method", "dense", "--float64"])):
        out, pred = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        argv = ["fit", "--data", str(tmp_path / "d.csv"), "--time-column", "t", "--kernel", "matern32"]
        argv += ["--out", str(out), "--forecast", "3", "--predictions", str(pred), *extra]
        assert main(argv) == 0
        runs[name] = (json.loads(out.read_text()), _predictions(pred), capsys.readouterr())
    fitted, predicted, captured = runs["statespace"]
    assert "exact state-space (Kalman) likelihood, O(T)" in captured.err
    assert "computed in float64" in captured.err and "float64" in captured.err.splitlines()[0]
    assert "step" in captured.err  # progress lines
    assert "(exact state space, O(T))" in captured.out and "Kalman innovation variances" in captured.out
    assert fitted["kernel"]["method"] == "statespace" and fitted["converged"] and fitted["dtype"] == "float64"
    dense_fit, dense_predicted, _ = runs["dense"]
    assert dense_fit["kernel"]["method"] == "dense" and dense_fit["converged"]
    # the same model, fitted to the same optimum: L to 1e-8, parameters and predictions closely
    assert abs(fitted["loglik"] - dense_fit["loglik"]) < 1e-8 * abs(dense_fit["loglik"])
    np.testing.assert_allclose(fitted["kernel"]["lengthscale"], dense_fit["kernel"]["lengthscale"], rtol=1e-3)
    np.testing.assert_allclose(predicted[0], dense_predicted[0], rtol=1e-4, atol=1e-5)
    n_gap_rows = int(np.sum(np.isnan(Y).any(axis=1)))
    assert predicted[1] == ["gap"] * n_gap_rows + ["new"] * 3  # every row with a missing cell, then the forecast
    if gaps:
        assert "missing cells: one filter on the joint state" in captured.err
    # the reported L is the dense Cholesky's at the reported parameters (rebuilt from the JSON)
    x = jnp.asarray(t - fitted["time"]["origin"])
    M = Matern32(1.0, fitted["kernel"]["lengthscale"][0]).covariance(x[:, None] - x[None, :])
    Yc = jnp.asarray(np.nan_to_num(Y - np.asarray(fitted["column_mean"])))
    K, var = jnp.asarray(fitted["K"]), jnp.asarray(fitted["noise_variance"])
    mask = ~np.isnan(Y) if gaps else None
    want = float(reference.loglik(Yc, M + fitted["kernel"]["nugget"] * jnp.eye(T), K, jnp.diag(var), mask=mask))
    assert abs(fitted["loglik"] - want) < 1e-10 * abs(want)
