"""User-reported defects of the command line and the library, each with the test that would have
caught it. Fast: the formatting and validation functions are called directly, and a CLI run only
where the command must stop before any work (no fit is compiled here)."""

import argparse
import re
from datetime import datetime

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronlik
from kronlik import _fit_command, _fit_model, _mixed_command, datasets, kernels
from kronlik.__main__ import main
from kronlik.datasets import _decimal_year, simulate_traits


def _csv(path, times, Y, names=("a", "b")):
    rows = [",".join(["t", *names])]
    rows += [",".join([str(c)] + ["" if np.isnan(v) else repr(float(v)) for v in y]) for c, y in zip(times, Y)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _fit_args(**given):
    args = dict(data=None, time_column=None, kernel=None, period=None, method="auto", rank=None, steps=5)
    args.update(optimizer="lbfgs", lr=0.05, tol=1e-5, float64=True, forecast=None, predict_at=None)
    args.update(predictions=None, out=None, plot=None)
    args.update(given)
    return argparse.Namespace(**args)


# 1. "lengthscales ± 0.7856 ± 0.0275" and a noise/K header out of line with its columns


def test_kernel_labels_read_name_colon_values():
    lines = _fit_model.kernel_lines([0.7856], [0.0275], [1.5, 2.0], [0.1, 0.2], [0.3], [0.05])
    assert lines == [
        "  lengthscales: 0.7856 ± 0.0275",
        "  fitted periods: 1.5 ± 0.1, 2 ± 0.2",
        "  relative amplitudes: 0.3 ± 0.05",
    ]
    assert _fit_model.kernel_lines([1.0], [0.1], [], [], [], []) == ["  lengthscales: 1 ± 0.1"]


def test_noise_table_header_lines_up_with_its_columns():
    names = ["a", "a_much_longer_output_name_than_sixteen", "mid_length"]
    var, var_se = np.array([2.3e-3, 6.8e-6, 123.456]), np.array([5.2e-3, 14.4, 0.1])
    k_diag, k_se = np.array([2.928, 8268.0, 1.0]), np.array([2.46, 6950.0, 0.0])
    header, *rows = _fit_model.noise_table(names, var, var_se, k_diag, k_se)
    assert header.startswith("output") and len(rows) == 3
    for row, name in zip(rows, names):
        assert row.startswith(name + " ")
    previous_end = max(len(n) for n in names)  # the name column's right edge
    for c, word in enumerate(("noise variance", "K diagonal")):
        start = header.index(word)
        end = start + len(word)
        plus = {[m.start() for m in re.finditer("±", row)][c] for row in rows}
        assert len(plus) == 1  # one "±" column
        (at,) = plus
        cells = [re.match(r"\S+ ± \S+", row[row.rfind(" ", 0, at - 1) + 1 :]).group(0) for row in rows]
        cell_starts = [row.rfind(" ", 0, at - 1) + 1 for row in rows]
        cell_ends = [s + len(cell) for s, cell in zip(cell_starts, cells)]
        assert max(cell_ends) == end  # the header word ends where its widest cell ends
        # the column (header word and cells) clear of the one to its left
        assert min(start, *cell_starts) > previous_end and header[previous_end:start].strip() == ""
        # values right-aligned: each ends one space before "±"
        assert all(row[at - 2] != " " and row[at - 1] == " " for row in rows)
        previous_end = end


# 2. progress "objective" was -L/n (standardised) for a CSV and +L for an .npz


class _Stop(Exception):
    pass


def _captured_progress(monkeypatch, name):
    seen = {}

    def fake(*a, **kw):
        seen.update(args=a, kw=kw)
        raise _Stop

    monkeypatch.setattr(_fit_model, name, fake)
    return seen


_PROGRESS = re.compile(r"^objective L = +(\S+) \(data units\)   max\|grad\| (\S+)$")


def test_progress_prints_the_data_unit_log_likelihood_for_csv_and_npz(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    T, D = 6, 2
    t = np.arange(T, dtype=float) * 0.5
    Y = np.column_stack([3.0 + 2.0 * rng.standard_normal(T), -1.0 + 0.1 * rng.standard_normal(T)])
    Y[2, 1] = np.nan  # the data-unit offset counts observed cells only
    args = _fit_args(data=_csv(tmp_path / "d.csv", t, Y), time_column="t")
    table = _fit_command.load_table(args)
    data = _fit_command.standardise(table)
    seen = _captured_progress(monkeypatch, "fit")
    with pytest.raises(_Stop):
        _fit_model.fit_table(args, table, data, "dense", T, None)
    loss, p0 = seen["args"][:2]
    progress = seen["kw"]["progress"]
    value = float(jax.jit(loss)(p0))  # what fit records: -L_std / n at p0
    L, g = map(float, _PROGRESS.match(progress(value, 0.25)).groups())
    # L at p0 in data units, dense: K = LLᵀ + diag(e^κ) and Σ = diag(e^s) scaled by the column sds
    x = t - t[0]
    ell = 0.1 * (t[-1] - t[0])
    M = np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell**2) + _fit_command.NUGGET * np.eye(T)
    sd = data.scale
    U = np.kron(M, (0.49 + 0.1) * np.diag(sd**2)) + np.kron(np.eye(T), 0.5 * np.diag(sd**2))
    y = (Y - data.mean).reshape(-1)
    ok = np.isfinite(y)
    U, y = U[np.ix_(ok, ok)], y[ok]
    want = -0.5 * (ok.sum() * np.log(2 * np.pi) + np.linalg.slogdet(U)[1] + y @ np.linalg.solve(U, y))
    assert abs(L - want) < 1e-8 * abs(want)
    assert g == 0.25  # per observation already
    # the .npz path: fit_log_var records L itself (M, K, Y as given); the same line, the same units
    np.savez(tmp_path / "d.npz", Y=np.nan_to_num(Y), M=M, K=np.eye(D))
    args = _fit_args(data=str(tmp_path / "d.npz"))
    table = _fit_command.load_table(args)
    seen = _captured_progress(monkeypatch, "fit_log_var")
    with pytest.raises(_Stop):
        _fit_model.fit_table(args, table, _fit_command.standardise(table), "dense", T, None)
    L, g = map(float, _PROGRESS.match(seen["kw"]["progress"](-12.5, 0.25 * T * D)).groups())
    assert L == -12.5 and g == 0.25


# 3. --forecast with one distinct time used a spacing of 1 silently


def test_forecast_with_one_distinct_time_is_refused(tmp_path, capsys):
    csv = _csv(tmp_path / "d.csv", [5.0, 5.0, 5.0], np.array([[1.0, 2.0], [2.0, 1.0], [0.5, 3.0]]))
    assert main(["fit", "--data", csv, "--time-column", "t", "--forecast", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--forecast needs at least two distinct times to set a spacing; give --predict-at instead" in err
    assert "fitting" not in err and not (tmp_path / "predictions.csv").exists()


# 4. --predictions without --forecast/--predict-at was ignored silently


def test_predictions_without_forecast_or_predict_at_is_refused(tmp_path, capsys):
    csv = _csv(tmp_path / "d.csv", [0.0, 1.0, 2.0], np.array([[1.0, 2.0], [2.0, 1.0], [0.5, 3.0]]))
    pred = tmp_path / "p.csv"
    assert main(["fit", "--data", csv, "--predictions", str(pred), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--predictions needs --forecast or --predict-at" in err and "fitting" not in err
    assert not pred.exists()
    # the default file name still applies when forecasting
    args = _fit_args(forecast=2)
    assert _fit_command.predictions_path(args) == "predictions.csv"


# 5. forecast dates printed as 23:59:59 of the day before


def _forecast_dates(tmp_path, dates, n):
    Y = np.column_stack([np.arange(len(dates), dtype=float), np.cos(np.arange(len(dates)))])
    args = _fit_args(data=_csv(tmp_path / "dates.csv", dates, Y), time_column="t", forecast=n)
    table = _fit_command.load_table(args)
    new_t = _fit_command._new_times(args, table)
    days = datasets.whole_days(table.t) and datasets.whole_days(new_t)
    return new_t, [datasets.from_decimal_year(y, days) for y in new_t]


def test_forecast_dates_print_as_exact_dates(tmp_path):
    months = [f"{2009 + (m - 1) // 12}-{(m - 1) % 12 + 1:02d}-01" for m in range(3, 16)]  # 2009-03 .. 2010-03
    new_t, printed = _forecast_dates(tmp_path, months, 1)
    assert printed == ["2010-04-01"]  # the median month is 31 days; was 2010-03-31T23:59:59
    assert new_t[0] == _decimal_year(datetime(2010, 4, 1))  # the forecast is at that date exactly
    days = [f"2010-03-{d:02d}" for d in range(25, 32)]
    _, printed = _forecast_dates(tmp_path, days, 3)
    assert printed == ["2010-04-01", "2010-04-02", "2010-04-03"]
    # with a time of day: the nearest second
    rng = np.random.default_rng(1)
    for _ in range(200):
        stamp = datetime(int(rng.integers(1900, 2100)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        stamp = stamp.replace(hour=int(rng.integers(24)), minute=int(rng.integers(60)), second=int(rng.integers(60)))
        assert datasets.from_decimal_year(_decimal_year(stamp)) == stamp.isoformat(timespec="seconds")
    assert not datasets.whole_days(np.array([_decimal_year(datetime(2010, 1, 1, 6))]))


# 6. periodic(1e-300) was caught only after the fit


def test_tiny_fixed_period_is_refused_before_any_work(tmp_path, capsys):
    csv = _csv(tmp_path / "d.csv", [0.0, 1.0, 2.0, 3.0], np.arange(8.0).reshape(4, 2) ** 2)
    for period in ("1e-300", "1e-13"):
        code = main(["fit", "--data", csv, "--time-column", "t", "--kernel", f"rbf + periodic({period})"])
        err = capsys.readouterr().err
        assert code == 2 and f"periodic({period})" in err and "time span" in err and "fitting" not in err
    assert main(["fit", "--data", csv, "--period", "1e-300"]) == 2
    assert "--period 1e-300" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"'periodic\(1e-310\)': the period 1e-310 is too small"):
        kernels.parse("rbf * periodic(1e-310)")  # subnormal: refused by the library too
    assert kernels.parse("periodic(2.5) + periodic").fixed_periods() == [2.5]


# 7. validate said "largest magnitude 0" for M = -I


def test_validate_reports_the_magnitude_of_a_negative_definite_m():
    Y = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"smallest eigenvalue -1 \(largest magnitude 1\)"):
        kronlik.validate(Y, -jnp.eye(3), jnp.eye(2), jnp.eye(2))
    with pytest.raises(ValueError, match=r"smallest eigenvalue -5 \(largest magnitude 5\)"):
        kronlik.validate(Y, jnp.diag(jnp.array([-5.0, 1.0, 2.0])), jnp.eye(2), jnp.eye(2))


# 8. kronlik mixed printed Wald SEs but not the logit-scale interval


def test_mixed_heritability_lines_carry_the_logit_interval():
    lines = _mixed_command._heritability_lines(
        ["height", "weight"], np.array([0.5, 0.25]), np.array([0.1, 0.05]), [0.31, 0.165], [0.69, 0.36]
    )
    assert "95% interval (delta method on the logit scale)" in lines[0]
    assert lines[1] == "  height          0.5000 ± 0.1000   [0.3100, 0.6900]"
    assert lines[2] == "  weight          0.2500 ± 0.0500   [0.1650, 0.3600]"


# 9. simulate_traits(h2=0.6) data have heritability about 0.5 as a kinship model sees it


def test_simulated_h2_effective_counts_the_causal_variants_as_residual():
    sim = simulate_traits(T=40, D=3, n_snps=60, n_scan=7, h2=0.6, seed=3)
    m_bar = np.mean(np.diag(sim.kinship))
    genetic = m_bar * np.diag(sim.K)
    causal = np.sum(sim.effects**2, axis=0)  # standardised variants, variance 1 each
    np.testing.assert_allclose(genetic / (genetic + np.diag(sim.Sigma)), 0.6, rtol=1e-12)  # the stated split
    np.testing.assert_allclose(sim.h2_effective, genetic / (genetic + np.diag(sim.Sigma) + causal), rtol=1e-12)
    assert np.all(sim.h2_effective < 0.6)
    assert "h2_effective" in simulate_traits.__doc__
