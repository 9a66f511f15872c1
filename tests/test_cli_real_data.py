"""`kronlik fit` on data as users have it: gaps, dates, kernels, forecasts, size limits, and a
report that never misleads. Each test names the defect of an earlier release it guards against.

Fits here are small (T ≤ 60, D ≤ 3, float64) so that each takes seconds; the model each JSON
describes is rebuilt from the JSON alone (helpers.rebuild_fit) and checked against the dense
reference in float64 (1e-8 relative: the fit's own float64 evaluation against a Cholesky of the
TD×TD matrix, both at the same parameters).
"""

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rebuild_fit

import kronlik
from kronlik import _fit_command, _fit_model, kernels, reference
from kronlik.__main__ import main


def _series(T=40, seed=0, missing=0.0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 4.0, T)
    F = np.column_stack([np.sin(2 * np.pi * t), np.sin(2 * np.pi * t + 0.5), np.cos(1.3 * t)])
    Y = F + 0.2 * rng.standard_normal((T, 3))
    if missing:
        Y[rng.random(Y.shape) < missing] = np.nan
        Y[0] = F[0]  # keep every column observed somewhere
    return t, Y


def _write(path, t, Y, header="t,a,b,c", time_cells=None):
    cells = [f"{x}" for x in t] if time_cells is None else time_cells
    lines = [header] + [
        ",".join([c] + ["" if np.isnan(v) else repr(float(v)) for v in row]) for c, row in zip(cells, Y)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _fit(tmp_path, capsys, *extra, data=None):
    out = tmp_path / "fit.json"
    code = main(
        ["fit", "--float64", "--steps", "200", *(["--data", str(data)] if data else []), "--out", str(out), *extra]
    )
    captured = capsys.readouterr()
    return code, (json.loads(out.read_text()) if code == 0 else None), captured


@pytest.mark.slow
def test_missing_cells_and_a_kernel_sum_fit_and_rebuild_from_the_json(tmp_path, capsys):
    # Defect: "missing, NaN or infinite cells" aborted the fit; fit.json could not rebuild the model.
    t, Y = _series(missing=0.15)
    csv = _write(tmp_path / "gaps.csv", t, Y)
    code, fitted, captured = _fit(tmp_path, capsys, "--time-column", "t", "--kernel", "matern32 + periodic", data=csv)
    assert code == 0, captured.err
    assert fitted["missing_cells"] == int(np.isnan(Y).sum()) > 10
    Yc, M, K, Sigma, mask = rebuild_fit(fitted, t, Y)
    want = float(reference.loglik(Yc, M, K, Sigma, mask=mask))
    assert abs(fitted["loglik"] - want) < 1e-8 * abs(want)
    assert len(fitted["kernel"]["period"]) == 1 and "observed information" in captured.out
    # the printed L is the JSON's (float64, data units) to the digits printed
    printed = float(re.search(r"log-likelihood \(data units, float64[^:]*: (\S+)", captured.out).group(1))
    assert abs(printed - fitted["loglik"]) < 1e-6


@pytest.mark.slow
def test_float32_fit_reports_the_float64_likelihood_at_its_point(tmp_path, capsys):
    # Defect: float32 printed L = -498.292632 to six decimals where the float64 L at those
    # parameters was -498.299197.
    t, Y = _series(seed=1)
    csv = _write(tmp_path / "d.csv", t, Y)
    out = tmp_path / "f32.json"
    assert main(["fit", "--data", str(csv), "--time-column", "t", "--steps", "60", "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())
    assert fitted["dtype"] == "float32"
    want = float(reference.loglik(*rebuild_fit(fitted, t, Y)[:4]))
    assert abs(fitted["loglik"] - want) < 1e-8 * abs(want)
    capsys.readouterr()


@pytest.mark.slow
def test_dates_unsorted_rows_bom_and_forecast(tmp_path, capsys):
    # Defects: dates refused ("'2012-01-01' is not a number"), a UTF-8 BOM broke the header,
    # unsorted time drew a scribble, and there was no prediction at new times.
    t, Y = _series(T=36, seed=2)
    months = [f"{2012 + i // 12}-{i % 12 + 1:02d}-01" for i in range(36)]
    order = np.random.default_rng(3).permutation(36)
    csv = tmp_path / "dates.csv"
    _write(csv, t[order], Y[order], header="\ufeffdate,a,b,c", time_cells=[months[i] for i in order])
    pred = tmp_path / "forecast.csv"
    code, fitted, captured = _fit(
        tmp_path, capsys, "--time-column", "date", "--forecast", "6", "--predictions", str(pred), data=csv
    )
    assert code == 0, captured.err
    assert "ISO dates converted to decimal years" in captured.err and "rows sorted" in captured.err
    assert fitted["time"]["dates"] and fitted["time"]["origin"] == 2012.0
    rows = pred.read_text().splitlines()
    assert rows[0].startswith("decimal_year,date,a_mean,a_sd_latent,a_sd_observation") and len(rows) == 7
    first = np.datetime64(rows[1].split(",")[1])  # one median month (in decimal years) past the last
    assert abs(first - np.datetime64("2015-01-01T00:00:00")) < np.timedelta64(1, "D")
    # the forecast is the Gaussian conditional of the rebuilt model (dense, float64)
    t_sorted = np.sort(np.array([float(r.split(",")[0]) for r in rows[1:]]))
    Yc, M, K, Sigma, mask = rebuild_fit(fitted, _decimal_years(months), Y)
    kp = _kernel_params(fitted)
    x = jnp.asarray(_decimal_years(months) - fitted["time"]["origin"])
    xn = jnp.asarray(t_sorted - fitted["time"]["origin"])
    k = kernels.parse(fitted["kernel"]["spec"])
    mean, var = reference.predict(Yc, M, K, Sigma, k(kp, xn, x), jnp.diagonal(k(kp, xn)) + 1e-6)
    got = np.array([[float(c) for c in r.split(",")[2:-1]] for r in rows[1:]])
    mean, var = np.asarray(mean), np.asarray(var)
    np.testing.assert_allclose(got[:, 0::3], mean + np.asarray(fitted["column_mean"])[None, :], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got[:, 1::3], np.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(got[:, 2::3], np.sqrt(var + np.diagonal(np.asarray(Sigma))[None, :]), rtol=1e-6)


def _decimal_years(iso):
    from kronlik.datasets import parse_times

    return parse_times(list(iso), "test")[0]


def _kernel_params(fitted):
    kern = fitted["kernel"]
    return {
        "log_lengthscale": jnp.log(jnp.asarray(kern["lengthscale"])),
        "log_period": jnp.log(jnp.asarray(kern["period"], jnp.float64)),
        "log_amplitude": jnp.log(jnp.asarray(kern["amplitude"])),
    }


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "-1"], "--steps must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "-0.1"], "--lr must be a positive number"),
        (["--tol", "nan"], "--tol must be a positive number"),
        (["--out", "/nonexistent/x.json"], "no such directory"),
        (["--plot", "/nonexistent/x.png"], "no such directory"),
        (["--forecast", "0"], "--forecast must be at least 1"),
        (["--kernel", "matern + rbf"], "known kernels: rbf, matern12"),
        (["--kernel", "periodic(-2)"], "period must be a positive number"),
        (["--rank", "0"], "--rank must be at least 1"),
        (["--predict-at", "/nonexistent.csv"], "no such file"),
        (["--plot", "fit.xyz"], "unsupported image format 'xyz'"),
        (["--out", "same.json", "--forecast", "2", "--predictions", "same.json"], "name the same file"),
        (["--kernel", "+".join(["rbf"] * 40)], "more than 32 base kernels"),
        (["--kernel", ""], "non-empty string"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(capsys, argv, message):
    # Defects: --steps -1 ended in a traceback; --out /nonexistent/x.json failed after the fit.
    assert main(["fit", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "fitting" not in err  # refused before the data were even read


def test_outputs_never_overwrite_the_input(tmp_path, capsys):
    t, Y = _series(seed=11)
    csv = _write(tmp_path / "d.csv", t, Y)
    before = csv.read_text()
    assert main(["fit", "--data", str(csv), "--out", str(csv)]) == 2
    assert "is an input file" in capsys.readouterr().err and csv.read_text() == before


def test_overflowing_column_is_refused(tmp_path, capsys):
    # Defect: a 1e300 outlier overflowed the column's std and the fit ran on zeros (exit 0).
    t, Y = _series(seed=4)
    Y[5, 1] = 1e300
    code, _, captured = _fit(tmp_path, capsys, "--time-column", "t", data=_write(tmp_path / "big.csv", t, Y))
    assert code == 2 and "column 'b': values as large as 1e+300 overflow" in captured.err
    assert not (tmp_path / "fit.json").exists()


@pytest.mark.slow
def test_npz_noise_is_fitted_in_the_data_units(tmp_path, capsys):
    # Defect: the .npz path standardised Y but kept the user's K: noise variances 2.6e-4 and
    # 4.0e-4 came out where the truth was (25, 4).
    rng = np.random.default_rng(6)
    T = 60
    t = np.linspace(0, 6, T)
    M = np.asarray(kernels.matern52(jnp.asarray(t), jnp.asarray(t), 1.0)) + 1e-6 * np.eye(T)
    K = np.array([[400.0, 100.0], [100.0, 900.0]])
    U = np.kron(M, K) + np.kron(np.eye(T), np.diag([25.0, 4.0]))
    Y = (np.linalg.cholesky(U) @ rng.standard_normal(2 * T)).reshape(T, 2)
    npz = tmp_path / "d.npz"
    np.savez(npz, Y=Y, M=M, K=K)
    code, fitted, captured = _fit(tmp_path, capsys, data=npz)
    assert code == 0, captured.err
    mle = kronlik.fit_log_var(jnp.asarray(Y), jnp.asarray(M), jnp.asarray(K), jnp.zeros(2), information=None)
    np.testing.assert_allclose(fitted["noise_variance"], np.exp(np.asarray(mle.params)), rtol=1e-4)
    assert 5 < fitted["noise_variance"][0] < 100 and 0.5 < fitted["noise_variance"][1] < 30
    want = float(reference.loglik(jnp.asarray(Y), M, K, jnp.diag(jnp.asarray(fitted["noise_variance"]))))
    assert abs(fitted["loglik"] - want) < 1e-8 * abs(want)


@pytest.mark.slow
def test_converged_only_when_the_gradient_test_holds(tmp_path, capsys):
    # Defect: "converged: True" when the gradient was above --tol (the stall test had fired).
    t, Y = _series(seed=7)
    csv = _write(tmp_path / "d.csv", t, Y)
    out = tmp_path / "short.json"
    assert main(["fit", "--data", str(csv), "--float64", "--steps", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    fitted = json.loads(out.read_text())
    assert not fitted["converged"] and "converged: no (reached --steps 3" in captured.out
    assert "did not converge" in captured.err
    # the library's FitResult keeps the stall apart from convergence
    loss = lambda p: jnp.sum((p - 3.0) ** 2) + 1.0  # noqa: E731
    stalled = kronlik.fit(loss, jnp.zeros(2), optax.sgd(1e-9), tol=1e-6, rtol=1e-6)  # moves, but hardly
    assert bool(stalled.stalled) and not bool(stalled.converged)
    done = kronlik.fit(loss, jnp.zeros(2), tol=1e-6)
    assert bool(done.converged) and not bool(done.stalled)


@pytest.mark.slow
def test_progress_lines_carry_elapsed_time(tmp_path, capsys):
    t, Y = _series(seed=8)
    code, _, captured = _fit(tmp_path, capsys, data=_write(tmp_path / "d.csv", t, Y))
    assert code == 0
    assert re.search(r"step +\d+ +objective .* max\|grad\| \S+ +\d+\.\d s", captured.err)


@pytest.mark.slow
def test_plot_has_both_bands_a_legend_an_x_label_and_the_future(tmp_path, capsys, monkeypatch):
    # Defect: one (latent) band that most points fell outside, no x label, no legend entry.
    figures, write = {}, _fit_command._write_all

    def keep(outputs):
        write([o for o in outputs if o[2] is None])
        figures.update({path: figure for path, _, figure in outputs if figure is not None})

    monkeypatch.setattr(_fit_command, "_write_all", keep)
    t, Y = _series(seed=9)
    csv = _write(tmp_path / "d.csv", t, Y)
    args = ["--time-column", "t", "--forecast", "5", "--plot", str(tmp_path / "p.png")]
    code, _, captured = _fit(tmp_path, capsys, *args, data=csv)
    assert code == 0, captured.err
    fig = figures[str(tmp_path / "p.png")]
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"latent ±2 sd", "new observation ±2 sd", "posterior mean", "data", "forecast"} <= set(labels)
    assert fig.axes[-1].get_xlabel() == "t"


def test_size_limits_choose_low_rank_or_refuse(monkeypatch):
    # Defect: 20,000 rows died with RESOURCE_EXHAUSTED and a traceback; 5,000 rows hung silently.
    args = argparse.Namespace(method="auto", rank=None)
    assert _fit_command.choose_path(args, 500, 3, 0, False)[0] == "dense"
    method, rank, why = _fit_command.choose_path(args, 20_000, 3, 0, False)
    assert (method, rank) == ("lowrank", _fit_command.DEFAULT_RANK) and "T = 20000 > 1000" in why
    monkeypatch.setattr(_fit_command, "_memory_available", lambda: 8e9)
    with pytest.raises(_fit_command.DataError, match="needs about 38.4 GB .* use --method lowrank"):
        _fit_command.choose_path(argparse.Namespace(method="dense", rank=None), 20_000, 3, 0, False)
    with pytest.raises(_fit_command.DataError, match="missing cells in a 20000×3 table"):
        _fit_command.choose_path(args, 20_000, 3, 6_000, False)


@pytest.mark.slow
def test_low_rank_fit_rebuilds_from_the_json(tmp_path, capsys):
    t, Y = _series(T=60, seed=10, missing=0.05)
    csv = _write(tmp_path / "d.csv", t, Y)
    code, fitted, captured = _fit(
        tmp_path,
        capsys,
        "--time-column",
        "t",
        "--method",
        "lowrank",
        "--rank",
        "12",
        "--forecast",
        "2",
        "--predictions",
        str(tmp_path / "p.csv"),
        data=csv,
    )
    assert code == 0, captured.err
    assert fitted["kernel"]["method"] == "lowrank" and len(fitted["kernel"]["inducing_times"]) == 12
    Yc, M, K, Sigma, mask = rebuild_fit(fitted, t, Y)
    want = float(reference.loglik(Yc, M, K, Sigma, mask=mask))
    assert abs(fitted["loglik"] - want) < 1e-8 * abs(want)
    kinds = [line.rsplit(",", 1)[1] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    # the Nyström cross-covariance path: every row with a gap, then the two new times
    assert kinds == ["gap"] * int(np.isnan(Y).any(axis=1).sum()) + ["new"] * 2


def test_gitignore_covers_the_readme_outputs():
    from pathlib import Path

    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert {"fit.png", "fit.json", "predictions.csv"} <= set(ignored)


def test_kernels_are_valid_covariances():
    x = jnp.linspace(0.0, 3.0, 30)
    for spec in ("rbf", "matern12", "matern32", "matern52", "periodic", "matern32 + periodic * rbf"):
        k = kernels.parse(spec)
        M = np.asarray(k(k.init_params(0.4, 1.1), x))
        assert np.allclose(M, M.T) and np.min(np.linalg.eigvalsh(M)) > -1e-10
        np.testing.assert_allclose(np.diag(M), 1.0, rtol=1e-12)  # amplitudes start summing to 1
    # the closed forms at one distance (r = 1 lengthscale)
    one, zero = jnp.array([1.0]), jnp.array([0.0])
    assert float(kernels.matern12(one, zero, 1.0)[0, 0]) == pytest.approx(np.exp(-1))
    assert float(kernels.matern32(one, zero, 1.0)[0, 0]) == pytest.approx((1 + 3**0.5) * np.exp(-(3**0.5)))
    assert float(kernels.matern52(one, zero, 1.0)[0, 0]) == pytest.approx((1 + 5**0.5 + 5 / 3) * np.exp(-(5**0.5)))
    assert float(kernels.rbf(one, zero, 1.0)[0, 0]) == pytest.approx(np.exp(-0.5))
    assert float(kernels.periodic(one, zero, 1.0, 4.0)[0, 0]) == pytest.approx(np.exp(-2 * np.sin(np.pi / 4) ** 2))
    # differentiable in every parameter, finite at zero distance
    k = kernels.parse("matern12 + periodic")
    g = jax.grad(lambda p: jnp.sum(k(p, x)))(k.init_params(0.4, 1.1))
    assert all(np.all(np.isfinite(v)) for v in g.values())


def test_predict_at_takes_iso_dates(tmp_path):
    # Defect: --predict-at with a column of ISO dates was read as numbers first ("is not a number").
    at = tmp_path / "at.csv"
    at.write_text("date,note\n2015-01-01,x\n2014-07-01,y\n")
    table = _fit_command.Table(np.array([2013.0, 2014.0]), np.zeros((2, 1)), ["a"], None, None, "years", True, [])
    args = argparse.Namespace(forecast=None, predict_at=str(at), time_column="date")
    new = _fit_command._new_times(args, table)
    np.testing.assert_allclose(new, [2014.0 + 181 / 365, 2015.0])
    table = table._replace(dates=False)
    with pytest.raises(_fit_command.DataError, match="times are dates but the data's are numbers"):
        _fit_command._new_times(args, table)


def test_start_lengthscale_is_the_best_of_a_decade_grid(capsys):
    # A loss whose minimum is at a hundredth of the default start: that start is taken and said;
    # the grid stops at ten times the median spacing of the times.
    t = np.arange(10_000.0)
    p0 = {"log_lengthscale": jnp.full(2, np.log(1_000.0)), "log_var": jnp.zeros(3)}

    def loss(p):
        return jnp.sum((p["log_lengthscale"] - np.log(10.0)) ** 2) + jnp.sum(p["log_var"] ** 2)

    best = _fit_model._best_start(loss, p0, span=10_000.0, t=t)
    assert np.allclose(best["log_lengthscale"], np.log(10.0)) and best["log_var"] is p0["log_var"]
    assert "starting lengthscales: 0.01 × a tenth of the time span (the best of 3 by L)" in capsys.readouterr().err
    # spacing 100: only the default start is allowed (a hundredth would be below 10 spacings)
    assert _fit_model._best_start(loss, p0, span=10_000.0, t=t * 100.0) is p0
