"""float32, mixed precision (eigh_dtype="float64") and what validate says about accuracy.

The claims tested are those of docs/accuracy.md ("float32 and mixed precision"): on a realistic
float32 GP problem the accuracy estimate of ``kronlik.validate`` bounds the measured errors, and
the mixed-precision mode is more accurate than plain float32. Truth: kronlik in float64 (itself
checked against exact arithmetic in test_exact).
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel

import kronlik
from kronlik import kernels

ALL = (0, 1, 2, 3)


def _gp_problem(T=256, D=4, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, T)
    M = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.1)) + 1e-6 * np.eye(T)
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.1 * np.eye(D)
    F = np.linalg.cholesky(M) @ rng.standard_normal((T, D)) @ np.linalg.cholesky(K).T
    return F + 0.03 * rng.standard_normal((T, D)), M, K, np.full(D, np.log(1e-3))


@pytest.mark.slow
def test_validate_bounds_the_float32_errors_and_mixed_precision_improves_them():
    args64 = tuple(jnp.asarray(a) for a in _gp_problem())
    args32 = tuple(a.astype(jnp.float32) for a in args64)
    truth_value, truth = jax.value_and_grad(kronlik.loglik_diag, argnums=ALL)(*args64)
    errors = {}
    for mode in (None, "float64"):
        value, grads = jax.value_and_grad(lambda *a, m=mode: kronlik.loglik_diag(*a, eigh_dtype=m), argnums=ALL)(
            *args32
        )
        assert value.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
        report = kronlik.validate(*args32[:3], log_var=args32[3], eigh_dtype=mode, warn=False)
        value_error = abs(float(value) - float(truth_value)) / abs(float(truth_value))
        grad_errors = [max_rel(g, t) for g, t in zip(grads, truth)]
        assert value_error <= report.error_bound, (mode, value_error, report)
        assert max(grad_errors) <= report.gradient_error_bound, (mode, grad_errors, report)
        errors[mode] = (value_error, *grad_errors)
    # mixed precision: the value, ∂L/∂M and ∂L/∂K at least 3× more accurate than plain float32
    for i in (0, 2, 3):
        assert errors["float64"][i] * 3 < errors[None][i], errors


@pytest.mark.slow
def test_validate_warns_when_float32_is_not_enough():
    args32 = tuple(jnp.asarray(a, jnp.float32) for a in _gp_problem())
    with pytest.warns(UserWarning, match="eigh_dtype='float64'"):
        kronlik.validate(*args32[:3], log_var=args32[3])
    report = kronlik.validate(*args32[:3], log_var=args32[3], eigh_dtype="float64", warn=False)
    assert report.error_bound < 1e-3


@pytest.mark.slow
def test_factorize_in_float64_gives_a_float32_factor():
    Y, M, K, s = (jnp.asarray(a, jnp.float32) for a in _gp_problem(T=64))
    fm = kronlik.factorize(M, eigh_dtype="float64")
    assert fm.vectors.dtype == jnp.float32 and fm.values.dtype == jnp.float32
    direct = kronlik.loglik_diag(Y, M, K, s, eigh_dtype="float64")
    assert abs(float(kronlik.loglik_diag(Y, fm, K, s)) - float(direct)) < 1e-5 * abs(float(direct))
    fit = kronlik.fit_log_var(Y, M, K, jnp.zeros(4, jnp.float32), eigh_dtype="float64", num_steps=5)
    assert fit.params.dtype == jnp.float32


def test_eigh_dtype_float64_without_x64_is_refused():
    code = (
        "import jax.numpy as jnp, kronlik\n"
        "try:\n"
        "    kronlik.loglik(jnp.ones((2, 1)), jnp.eye(2), jnp.eye(1), jnp.eye(1), eigh_dtype='float64')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "needs jax.config.update('jax_enable_x64', True)" in done.stdout, done.stdout + done.stderr
    with pytest.raises(ValueError, match="eigh_dtype must be"):
        kronlik.loglik(jnp.ones((2, 1)), jnp.eye(2), jnp.eye(1), jnp.eye(1), eigh_dtype="float16")
