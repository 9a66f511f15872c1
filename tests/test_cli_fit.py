"""`kronlik fit`: the built-in data, a user CSV and .npz, and exit code 2 with a message on bad input."""

import json

import numpy as np
import pytest

from kronlik.__main__ import main
from kronlik.datasets import load_macrodata


def test_builtin_dataset_is_real_and_small():
    t, Y, names = load_macrodata()
    assert Y.shape == (202, 4) and names[0] == "gdp_growth"
    assert t[0] == 1959.25 and t[-1] == 2009.5
    assert np.all(np.isfinite(Y))


def test_fit_builtin_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    assert main(["fit", "--float64", "--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr()
    assert "noise variance" in text.out and "log-likelihood" in text.out
    assert "step" in text.err  # progress on for the CLI
    fitted = json.loads(out.read_text())
    assert fitted["converged"] and fitted["outputs"] == ["gdp_growth", "unemp", "infl", "tbilrate"]
    var = np.array(fitted["noise_variance_standardised"])
    # unemployment is smooth quarter to quarter, GDP growth is mostly noise
    assert var[1] < 0.05 < 0.3 < var[0] < 1.0
    assert png.stat().st_size > 10_000


def _check_standard_errors(fitted, t, Y):
    import jax.numpy as jnp

    from kronlik import reference

    scale, D, T = np.array(fitted["column_std"]), Y.shape[1], Y.shape[0]
    x = (t - t.min()) / (t.max() - t.min())
    upper = np.triu_indices(D)
    k_std = np.array(fitted["K_standardised"])

    def cov_fn(theta):  # θ = (log ℓ, K_ij for i ≤ j, log noise variances), standardised units
        d = x[:, None] - x[None, :]
        m = jnp.exp(-0.5 * d * d * jnp.exp(-2.0 * theta[0])) + 1e-6 * jnp.eye(T)
        k = jnp.zeros((D, D)).at[upper].set(theta[1 : 1 + len(upper[0])])
        k = k + k.T - jnp.diag(jnp.diagonal(k))
        return m, k, jnp.diag(jnp.exp(theta[-D:]))

    theta = jnp.concatenate(
        [jnp.array([fitted["params"]["log_ell"]]), jnp.asarray(k_std[upper]), jnp.asarray(fitted["log_var"])]
    )
    se = np.sqrt(np.diag(np.linalg.inv(reference.fisher_information(cov_fn, theta))))
    span = t.max() - t.min()
    np.testing.assert_allclose(fitted["lengthscale_se"], np.exp(theta[0]) * span * se[0], rtol=1e-6)
    var = np.exp(np.array(fitted["log_var"]))
    np.testing.assert_allclose(fitted["noise_variance_se"], var * scale**2 * se[-D:], rtol=1e-6)
    k_se = np.array(fitted["K_se"])[upper] / np.outer(scale, scale)[upper]
    np.testing.assert_allclose(k_se, se[1:-D], rtol=1e-6)


def test_fit_user_csv_and_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    t = np.linspace(0, 10, 60)
    Y = np.column_stack([np.sin(t), np.cos(t)]) + 0.1 * rng.standard_normal((60, 2))
    csv = tmp_path / "data.csv"
    csv.write_text("# a comment line\ntime,a,b\n" + "\n".join(f"{x},{y0},{y1}" for x, (y0, y1) in zip(t, Y)))
    out = tmp_path / "out.json"
    assert main(["fit", "--data", str(csv), "--time-column", "time", "--float64", "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())
    assert fitted["outputs"] == ["a", "b"] and fitted["converged"]
    np.testing.assert_allclose(fitted["noise_variance"], 0.01, rtol=0.6)  # true noise sd 0.1
    # the standard errors: the dense Fisher information at the written parameters, delta method
    _check_standard_errors(fitted, t, Y)
    M = np.exp(-0.5 * (t[:, None] - t[None, :]) ** 2)
    npz = tmp_path / "data.npz"
    np.savez(npz, Y=Y, M=M, K=np.eye(2))
    assert main(["fit", "--data", str(npz), "--float64"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("a,b\n1,x\n", "'x' is not a number"),
        ("a,b\n1,2\n3,\n4,nan\n", "NaN or infinite cells in data rows 2, 3"),
        ("a,b\n1,2\n", "at least 2 rows"),
        ("a,b\n1,2\n3\n", "1 cells, but the header has 2"),
    ],
)
def test_bad_csv_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    assert main(["fit", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "kronlik fit: error:" in err and message in err and "Traceback" not in err


def test_bad_npz_exits_2(tmp_path, capsys):
    bad_shape, bad_m = tmp_path / "shape.npz", tmp_path / "m.npz"
    np.savez(bad_shape, Y=np.ones((5, 2)), M=np.eye(4), K=np.eye(2))
    np.savez(bad_m, Y=np.arange(10.0).reshape(5, 2), M=-np.eye(5), K=np.eye(2))
    assert main(["fit", "--data", str(bad_shape)]) == 2
    assert "need Y (T, D), M (T, T), K (D, D)" in capsys.readouterr().err
    assert main(["fit", "--data", str(bad_m)]) == 2
    assert "M is not positive semi-definite" in capsys.readouterr().err


def test_fit_csv_with_a_noise_free_column_lands_at_the_dense_mle(tmp_path):
    # Output "smooth" is a noise-free draw of the CLI's own model (RBF + 1e-6 nugget): its noise
    # variance goes to the plateau at log_var -> -inf. The float64 fit must report the true L there
    # and be a maximum of the dense likelihood too.
    import jax
    import jax.numpy as jnp

    from kronlik import reference

    rng = np.random.default_rng(5)
    T = 50
    t = np.linspace(0, 10, T)
    x = (t - t.min()) / (t.max() - t.min())
    M = np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 0.15**2) + 1e-6 * np.eye(T)
    F = np.linalg.cholesky(M) @ rng.standard_normal((T, 2)) @ np.linalg.cholesky(np.array([[1, 0.6], [0.6, 1]])).T
    Y = F + np.column_stack([0.3 * rng.standard_normal(T), np.zeros(T)])
    csv = tmp_path / "nf.csv"
    csv.write_text("t,noisy,smooth\n" + "\n".join(f"{a},{b},{c}" for a, (b, c) in zip(t, Y)))
    out = tmp_path / "nf.json"
    assert main(["fit", "--data", str(csv), "--time-column", "t", "--float64", "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())
    p = {k: jnp.asarray(v) for k, v in fitted["params"].items()}
    Ys = jnp.asarray((Y - Y.mean(0)) / Y.std(0))
    xs = jnp.asarray(x)

    def dense_loss(p):
        d = xs[:, None] - xs[None, :]
        Mp = jnp.exp(-0.5 * d * d * jnp.exp(-2.0 * p["log_ell"])) + 1e-6 * jnp.eye(T)
        Kp = p["L"] @ p["L"].T + jnp.diag(jnp.exp(p["log_kappa"]))
        return -reference.loglik(Ys, Mp, Kp, jnp.diag(jnp.exp(p["log_var"]))) / (T * 2)

    dense_l = -float(dense_loss(p)) * T * 2
    assert abs(fitted["loglik"] - dense_l) < 1e-8 * abs(dense_l)
    # a dense fit (jax.grad of the Cholesky likelihood) started at the CLI's optimum finds nothing higher
    from kronlik import fit

    polished = fit(jax.jit(dense_loss), p, tol=1e-9, num_steps=200, log_scale_keys=("log_var", "log_kappa"))
    assert -float(polished.value) * T * 2 < fitted["loglik"] + 1e-6
    assert fitted["noise_variance_standardised"][1] < 1e-6
