"""The benchmark scripts run (tiny sizes: a smoke test, not a timing)."""

import json
import runpy
from pathlib import Path

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
