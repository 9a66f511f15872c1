"""check_gradients and `python -m kronlik check`: they pass on good gradients and catch wrong ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronlik
from kronlik import gradcheck
from kronlik.__main__ import main


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_demo_problems_pass(dtype):
    for name, problem in gradcheck.demo_problems(dtype).items():
        report = kronlik.check_gradients(*problem)
        assert report.passed, f"{name}\n{report}"
        assert report.dtype == dtype and report.reference_dtype == "float64"
        limit = 1e-9 if dtype == "float64" else 1e-4
        for arg in ("Y", "M", "K", "Sigma"):
            assert report.max_error(arg, "autodiff") < limit
            assert report.max_error(arg, "finite differences") < 10 * limit
        text = str(report)
        assert "finite differences" in text and text.endswith("PASS")
        # second order: the Fisher information always, the log-variance Hessian for a diagonal Σ
        assert report.max_error("Fisher", "dense formula") < limit
        if name != "smooth":  # the problems with a diagonal Σ
            assert report.max_error("log_var", "Hessian autodiff") < limit
            assert report.max_error("log_var", "Hessian fin. diff.") < 1e3 * limit


@pytest.mark.slow
def test_a_wrong_second_derivative_is_caught(monkeypatch):
    def off_by_one_percent(Y, M, K, log_var):
        return 1.01 * kronlik.hessian_log_var(Y, M, K, log_var)

    monkeypatch.setattr(gradcheck, "hessian_log_var", off_by_one_percent)
    report = kronlik.check_gradients(*gradcheck.demo_problems()["degenerate"])
    failed = {(c.argument, c.witness) for c in report if not c.passed}
    assert failed == {("log_var", "Hessian autodiff"), ("log_var", "Hessian fin. diff.")}


def _loglik_with_wrong_k_gradient(Y, M, K, Sigma):
    # The same value, but ∂/∂K off by 1%, as a wrong factor in a derivation would give.
    sg = jax.lax.stop_gradient
    only_k = kronlik.loglik(sg(Y), sg(M), K, sg(Sigma))
    return kronlik.loglik(Y, M, K, Sigma) + 0.01 * (only_k - sg(only_k))


@pytest.mark.slow
def test_a_wrong_gradient_is_caught(monkeypatch):
    monkeypatch.setattr(gradcheck, "loglik", _loglik_with_wrong_k_gradient)
    report = kronlik.check_gradients(*gradcheck.demo_problems()["smooth"])
    assert not report.passed
    failed = {(c.argument, c.witness) for c in report if not c.passed}
    # the wrong K part also curves wrongly: the HVP in K against the dense reference fails too
    assert failed == {("K", "autodiff"), ("K", "finite differences"), ("K", "HVP autodiff")}
    assert report.max_error("K", "autodiff") > 5e-3
    assert str(report).endswith("FAIL")
    assert main(["check", "--dtype", "float64"]) == 1


def test_check_gradients_validates_input():
    Y, M, K, Sigma = gradcheck.demo_problems()["smooth"]
    with pytest.raises(ValueError, match="not positive"):
        kronlik.check_gradients(Y, M, K, -Sigma)


@pytest.mark.slow
def test_cli_in_process(capsys):
    assert main(["check", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "all gradient checks passed" in out and "[degenerate]" in out


def test_cli_rejects_unknown_arguments():
    with pytest.raises(SystemExit) as exc:
        main(["check", "--dtype", "float16"])
    assert exc.value.code == 2


def test_demo_problem_arrays_have_requested_dtype():
    for problem in gradcheck.demo_problems(np.float32).values():
        assert all(a.dtype == jnp.float32 for a in problem)
