"""The benchmark scripts run (tiny sizes: a smoke test, not a timing)."""

import json
import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs every benchmark script end to end: the second tier

ROOT = Path(__file__).resolve().parent.parent


def _main(name):
    return runpy.run_path(str(ROOT / "benchmarks" / name))["main"]


def test_harness_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = _main("run.py")(["--sizes", "8x2", "12x3", "--repeats", "1", "--no-gpytorch", "--json", str(out)])
    assert [(r["T"], r["D"]) for r in rows] == [(8, 2), (12, 3)]
    for r in rows:
        assert {"kronlik", "kronlik fwd", "kronlik no dM", "eigh floor", "dense autodiff", "dense block sums"} <= set(
            r["seconds"]
        )
        assert r["ratio_to_kronlik"]["kronlik"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["environment"]["jax"]
    assert "value+all gradients" in capsys.readouterr().out


def test_fit_step_benchmark_smoke():
    result = _main("fit_step.py")(["--T", "32", "--D", "3", "--repeats", "2"])
    assert result["cached_step_s"] > 0 and result["uncached_step_s"] > 0


def test_lowrank_benchmark_smoke():
    result = _main("lowrank.py")(["--T", "500", "--D", "2", "--r", "5", "--repeats", "1", "--dtype", "float64"])
    assert result["value_and_all_grads_s"] > 0


def test_peak_memory_smoke():
    result = _main("peak_memory.py")(["--T", "64", "--D", "4"])
    assert result["finite"] and result["peak_rss_MiB"] > 0


def test_information_benchmark_smoke():
    result = _main("information.py")(["--sizes", "16x3", "--repeats", "1", "--small"])
    assert set(result["costs"][0]["ratio"]) >= {"hessian_log_var", "fisher_log_var"}
    for fits in result["fits"].values():
        assert fits["newton"]["converged"] and fits["lbfgs"]["converged"]
        assert abs(fits["newton"]["loglik"] - fits["lbfgs"]["loglik"]) < 1e-6 * abs(fits["lbfgs"]["loglik"])


def test_second_order_benchmark_smoke():
    result = _main("second_order.py")(["--sizes", "16x3", "--repeats", "1"])
    row = result["costs"][0]
    assert set(row["ratio"]) >= {"HVP, all arguments", "jax.hessian in s", "hessian_log_var"}
    assert max(row["agree"].values()) < 1e-10  # the HVP and jax.hessian route equal the closed form


def test_missing_benchmark_smoke(tmp_path):
    import importlib.util

    import jax.numpy as jnp

    from kronlik import reference

    out = tmp_path / "missing.json"
    argv = ["--sizes", "16x3", "--missing", "0.5", "--repeats", "1", "--budget", "0.1", "--json", str(out)]
    argv += ["--gpytorch-size", "12x3"] if importlib.util.find_spec("gpytorch") else ["--no-gpytorch"]
    module = runpy.run_path(str(ROOT / "benchmarks" / "missing.py"))
    result = module["main"](argv)
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and [r["n_missing"] for r in saved["rows"]] == [24]
    Y, M, K, s = module["problem"](16, 3, jnp.float64)
    for r in saved["rows"]:
        assert {"masked value", "masked value+grad", "complete value+grad", "dense value+grad"} <= set(r["seconds"])
        assert r["ratio"]["masked value+grad"] == 1.0
        assert max(v for k, v in r["agree"].items() if k.startswith("value")) < 1e-9
        assert max(v for k, v in r["agree"].items() if k.startswith("∂")) < 1e-8
        mask = module["random_mask"](16, 3, r["missing_fraction"])
        want = float(reference.loglik(jnp.where(mask, Y, jnp.nan), M, K, jnp.diag(jnp.exp(s)), mask=mask))
        assert abs(r["value"] - want) < 1e-9 * abs(want)  # the density of the observed entries, not of all
    if saved["gpytorch"] is not None:
        gp = saved["gpytorch"]
        assert gp["gpytorch Cholesky rel diff"] < 1e-9 and gp["gpytorch Cholesky ∂K rel diff"] < 1e-8


def test_mixed_benchmark_smoke():
    result = _main("mixed.py")(["--T", "30", "--D", "2", "--variants", "4", "--dense-variants", "2"])
    assert result["value_grad_agreement"] < 1e-10
    assert abs(result["fit"]["kronlik_minus_dense_loglik"]) < 1e-6
    assert result["scan"]["max_rel_chi2_difference"] < 1e-8


def test_mixed_many_benchmark_smoke(tmp_path):
    small = ["--T", "60", "--D", "5", "--n-snps", "60", "--T-missing", "30", "--D-missing", "2"]
    small += ["--T-big", "60", "--D-big", "2", "--n-big", "20", "--no-before", "--json", str(tmp_path / "m.json")]
    result = _main("mixed_many.py")(small)
    assert result["many"]["split_vs_joint"] < 1e-10 and result["many"]["fit"]["steps"] > 0
    assert result["many"]["fit"]["loglik"] < 0 and result["many"]["T"] == 60
    assert result["missing"]["missing_cells"] > 0 and result["big"]["fit"]["steps"] > 0
    assert json.loads((tmp_path / "m.json").read_text())["many"]["D"] == 5


def test_statespace_benchmark_smoke(tmp_path, capsys):
    import importlib.util

    out = tmp_path / "statespace.json"
    argv = ["--T", "16", "--D", "2", "--repeats", "1", "--budget", "0", "--dense-max-T", "16", "--json", str(out)]
    result = _main("statespace.py")(argv + ["--bars", "16x2", "--bar-rounds", "2"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and [(r["T"], r["D"]) for r in saved["rows"]] == [(16, 2)]
    row = saved["rows"][0]
    assert {"kronlik value", "kronlik value+grad", "eigh value", "eigh value+grad"} <= set(row["seconds"])
    assert row["ratios"]["kronlik value+grad / kronlik value"] > 0
    assert row["agree"]["eigh value"] < 1e-10 and row["agree"]["eigh gradients (max over arguments)"] < 1e-8
    assert saved["bars"][0]["ratios"]["cpu: kronlik value+grad / kronlik value"]["median"] > 0
    printed = capsys.readouterr().out
    for name in ("tinygp", "celerite2"):  # optional baselines: skipped, never an error, when not installed
        if importlib.util.find_spec(name) is None:
            assert row["skipped"][name] == "skipped: not installed" and f"{name}: skipped: not installed" in printed


def test_statespace_second_order_benchmark_smoke(tmp_path):
    out = tmp_path / "second_order.json"
    rows = _main("statespace_second_order.py")(["--sizes", "16x2", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and [(r["T"], r["D"]) for r in rows] == [(16, 2)]
    assert all(rows[0][f"{name} / value+grad"] > 0 for name in ("hvp θ,Y", "hvp K,s", "hvp all"))


def test_statespace_missing_benchmark_smoke(tmp_path):
    out = tmp_path / "missing.json"
    argv = ["--sizes", "16x2", "--missing", "0", "0.5", "--extra", "--dense-max-T", "16", "--repeats", "1"]
    rows = _main("statespace_missing.py")([*argv, "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == rows and [r["missing"] for r in rows] == [0.0, 0.5]
    assert "pencil value+grad" in rows[0] and all(r["dense relative difference"] < 1e-9 for r in rows)


def test_sharded_benchmark_smoke(tmp_path):
    # one device in this process (tests/test_sharding.py runs 4 and 2 processes)
    out = tmp_path / "s.json"
    (row,) = _main("sharded.py")(["--T", "64", "--r", "8", "--D", "2", "--devices", "1", "--json", str(out)])
    assert row["devices"] == 1 and row["loglik_rel_diff"] < 1e-12 and row["grad_rel_diff"] < 1e-10
    assert row["basis_bytes_per_device"]["sharded"] == 64 * 8 * 8
    assert json.loads(out.read_text())["rows"][0]["T"] == 64
