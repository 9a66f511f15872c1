"""`kronlik fit`: the built-in data, a user CSV and .npz, and exit code 2 with a message on bad input."""

import json

import numpy as np
import pytest
from helpers import rebuild_fit

from kronlik.__main__ import main
from kronlik.datasets import load_macrodata


def test_builtin_dataset_is_real_and_small():
    t, Y, names = load_macrodata()
    assert Y.shape == (202, 4) and names[0] == "gdp_growth"
    assert t[0] == 1959.25 and t[-1] == 2009.5
    assert np.all(np.isfinite(Y))


@pytest.mark.slow
def test_fit_builtin_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    assert main(["fit", "--float64", "--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr()
    assert "noise variance" in text.out and "log-likelihood" in text.out
    assert "step" in text.err  # progress on for the CLI
    fitted = json.loads(out.read_text())
    assert fitted["converged"] and fitted["outputs"] == ["gdp_growth", "unemp", "infl", "tbilrate"]
    var = np.exp(np.array(fitted["log_var_standardised"]))
    # unemployment is smooth quarter to quarter, GDP growth is mostly noise
    assert var[1] < 0.05 < 0.3 < var[0] < 1.0
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("a,b\n1,x\n", "'x' is not a number"),
        ("a,b\n1,2\n3,\n4,inf\n", "line 4, column 'b': 'inf' is not finite"),
        ("a,b\n1,2\n3,\n4,\n", "columns with fewer than 2 observed values: ['b']"),
        ("a,b\n1,2\n", "at least 2 rows"),
        ("a,b\n1,2\n3\n", "1 cells, but the header has 2"),
        ("a,a\n1,2\n3,4\n5,7\n", "column names must be unique and non-empty; repeated or empty: ['a']"),
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


@pytest.mark.slow
def test_fit_csv_with_a_noise_free_column_lands_at_the_dense_mle(tmp_path):
    # Output "smooth" is a noise-free draw of the CLI's own model (RBF + 1e-6 nugget): its noise
    # variance goes to the plateau at log_var -> -inf. The float64 fit must report the true L there
    # (rebuilt from the JSON alone, dense Cholesky) and be a maximum of the dense likelihood too.
    import jax
    import jax.numpy as jnp

    from kronlik import fit, kernels, reference

    rng = np.random.default_rng(5)
    T = 50
    t = np.linspace(0, 10, T)
    M = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 1.5)) + 1e-6 * np.eye(T)
    F = np.linalg.cholesky(M) @ rng.standard_normal((T, 2)) @ np.linalg.cholesky(np.array([[1, 0.6], [0.6, 1]])).T
    Y = F + np.column_stack([0.3 * rng.standard_normal(T), np.zeros(T)])
    csv = tmp_path / "nf.csv"
    csv.write_text("t,noisy,smooth\n" + "\n".join(f"{a},{b},{c}" for a, (b, c) in zip(t, Y)))
    out = tmp_path / "nf.json"
    assert main(["fit", "--data", str(csv), "--time-column", "t", "--float64", "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())
    dense_l = float(reference.loglik(*rebuild_fit(fitted, t, Y)[:4]))
    assert abs(fitted["loglik"] - dense_l) < 1e-8 * abs(dense_l)
    # a dense fit (jax.grad of the Cholesky likelihood) started at the CLI's optimum finds nothing higher
    Yc = jnp.asarray(Y - Y.mean(0))
    k = kernels.parse("rbf")

    def dense_loss(p):
        Mp = k(
            {"log_lengthscale": p["log_ell"], "log_period": jnp.zeros(0), "log_amplitude": jnp.zeros(1)}, jnp.asarray(t)
        )
        Kp = p["L"] @ p["L"].T + jnp.diag(jnp.exp(p["log_kappa"]))
        return -reference.loglik(Yc, Mp + 1e-6 * jnp.eye(T), Kp, jnp.diag(jnp.exp(p["log_var"]))) / (T * 2)

    k_data = np.asarray(fitted["K"])
    p = {
        "log_ell": jnp.log(jnp.asarray(fitted["kernel"]["lengthscale"])),
        "L": jnp.linalg.cholesky(jnp.asarray(k_data) * 0.999),
        "log_kappa": jnp.log(jnp.asarray(np.diag(k_data) * 0.001)),
        "log_var": jnp.log(jnp.asarray(fitted["noise_variance"])),
    }
    polished = fit(jax.jit(dense_loss), p, tol=1e-9, num_steps=300, log_scale_keys=("log_var", "log_kappa"))
    assert -float(polished.value) * T * 2 < fitted["loglik"] + 1e-6
    assert fitted["noise_variance"][1] < 1e-6 * np.var(Y[:, 1])
