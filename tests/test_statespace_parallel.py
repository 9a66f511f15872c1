"""The state-space recursions by associative scans (``kronlik._kalman_parallel``), for accelerators.

The sequential recursions have their witnesses in tests/test_statespace.py (the dense reference,
jax.grad through a plain joint-state filter, central differences, exact arithmetic); the
conformance test runs ``StateSpace(..., scan="parallel")`` through every entry point
("statespace parallel"). Here: every output of the filter, the reverse pass and M X (not only L)
agrees between the two on hard inputs; the parallel one has no loop over T; the hard cases of
test_statespace.py hold against the dense reference with it too; and the setting is checked,
static (a jit-compiled function traces each choice apart) and read from the environment.

Tolerances: both sum the same terms in different orders, so they differ by rounding amplified
by the conditioning of each quantity. Between the two: 1e-11 relative to the largest entry of each
array (the conditioning of the inputs used, below); on the hard inputs the promise is the public
one, 1e-10 against the dense reference, as for the sequential recursions.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel, spd
from test_statespace import HARD, _dense_value_and_grads, _hard_case

import kronlik
from kronlik import reference
from kronlik._kalman import kalman_filter, kalman_reverse, matmul_sorted
from kronlik.statespace import SHO, Matern12, Matern32, Matern52, StateSpace, scan_method

T, D = 37, 3  # T odd and not a power of two: the scans' ragged levels run


def _s(*values):
    return [jnp.asarray(v, jnp.float64) for v in values]


KERNELS = {
    "matern12 (J = 1)": Matern12(*_s(1.3, 0.7)),
    "matern32 + sho (J = 4)": Matern32(*_s(1.3, 0.7)) + SHO(*_s(0.5, 3.0, 2.0)),
    "matern52 * matern12 (J = 3)": Matern52(*_s(0.8, 1.7)) * Matern12(*_s(1.0, 2.0)),
}


def _times(rng, kind):
    t = rng.uniform(0.0, 4.0, T)
    if kind == "near-duplicate":
        t[1::4] = t[0:-1:4] + 1e-12
    elif kind == "duplicate":
        t[1::4] = t[0:-1:4]
    return jnp.asarray(t)


def _internals(z, form, kappa, nu, method):
    """Everything the two implementations return: the filter, the reverse pass (with the upper
    part of M z̄), and M X."""
    g = form.generators()
    h = jnp.asarray(g.h, z.dtype)
    f = kalman_filter(z, g.a, g.q, h, kappa, nu, True, method=method)
    r = kalman_reverse(z, g.a, g.q, h, kappa, nu, f, p_inf_h=g.p_inf @ h, method=method)
    return f, r, matmul_sorted(g, z, method=method)


_internals_jit = jax.jit(_internals, static_argnums=4)


def _both(*args):
    return _internals_jit(*args, "sequential"), _internals_jit(*args, "parallel")


def test_the_combines_small_solve_is_lu_with_exact_row_swaps():
    # On the CPU backend the combine solves (I + C₁J₂) X = R by an unrolled elimination. Its rows
    # differ by up to 1/ν (1e17 at a log-variance of -40); a row swap written as arithmetic,
    # m + (row_p - m), rounded [1, 1e17] beside [2, 1] to [2, 0] and missed the accuracy promise
    # 2.4x there. Graded rows and columns, J = 1…5, against LAPACK: within a few eps of its
    # result, relative to the solution's largest entry in each column (the bound of LU with
    # partial pivoting on these well-conditioned systems).
    from kronlik._kalman_parallel import _solve_small

    def check(a, b):
        got, want = np.asarray(_solve_small(jnp.asarray(a), jnp.asarray(b))), np.linalg.solve(a, b)
        assert np.max(np.abs(got - want) / np.max(np.abs(want), axis=-2, keepdims=True)) < 1e-12, a

    check(np.array([[1.0, 1e17], [2.0, 1.0]]), np.eye(2))
    rng = np.random.default_rng(3)
    for J in range(1, 6):
        scale = 10.0 ** rng.integers(-17, 18, size=(4, J, 1))
        check(scale * rng.standard_normal((4, J, J)) + np.eye(J), scale * rng.standard_normal((4, J, 2)))


@pytest.mark.parametrize("times", ["random", "near-duplicate", "duplicate"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_output_equals_the_sequential_recursions(kernel, times):
    rng = np.random.default_rng(0)
    form = StateSpace(jnp.sort(_times(rng, times)), KERNELS[kernel])
    z = jnp.asarray(rng.standard_normal((T, D)))
    # a signal-dominated problem, a balanced one and a noise-dominated one side by side. With
    # κ/ν up to 1e3 the conditioning of κM + νI reaches ~T·κ/ν ≈ 4e4, so two orders of summation
    # may differ by ~cond·eps ≈ 1e-11 (measured: 5e-13 at most). Harder inputs are checked
    # against exact arithmetic (benchmarks/statespace_accuracy.py --scan=parallel) and the dense
    # reference (below), where the reference is known to be right.
    kappa, nu = jnp.asarray([1.0, 0.7, 1e-3]), jnp.asarray([1e-3, 0.3, 2.0])
    seq, par = _both(z, form, kappa, nu)
    names = ["loglik", "s_min", "m_prev", "p_prev", "z̄", "κ̄", "ν̄", "Ā", "Q̄", "upper", "M X"]
    leaves_seq, leaves_par = jax.tree_util.tree_leaves(seq), jax.tree_util.tree_leaves(par)
    assert len(leaves_seq) == len(leaves_par) == len(names)
    for name, a, b in zip(names, leaves_seq, leaves_par):
        assert a.shape == b.shape, name
        assert bool(jnp.all(jnp.isfinite(b))), f"{kernel}/{times}: {name} not finite"
        assert max_rel(b, a) < 1e-11, f"{kernel}/{times}: {name} differs by {max_rel(b, a):.1e}"


def _loops(jaxpr, found):
    """(kind, trip count or carried shapes) of every scan and while loop, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(("scan", eqn.params["length"]))
        elif eqn.primitive.name == "while":
            found.append(("while", [tuple(v.shape) for v in eqn.params["body_jaxpr"].in_avals]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _loops(inner, found)
    return found


def test_no_loop_over_time_in_the_parallel_recursions(monkeypatch):
    # The claim of scan_method's docstring: O(log T) depth, no sequential loop over the T steps.
    # The value and every gradient, traced: a loop over time is a scan of length T or a while loop
    # carrying an array with an axis of size T. The sequential recursions have them (the check
    # can fail); the parallel ones only the pencil's D-sized loops.
    monkeypatch.delenv("KRONLIK_STATESPACE_SCAN", raising=False)  # "auto" as CI runs it
    rng = np.random.default_rng(1)
    kernel = KERNELS["matern32 + sho (J = 4)"]
    times = _times(rng, "random")
    rest = (jnp.asarray(spd(rng, D, 0.1)), jnp.zeros(D))
    Y = jnp.asarray(rng.standard_normal((T, D)))

    def over_time(scan):
        args = (Y, StateSpace(times, kernel, scan), *rest)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))(*args)
        loops = _loops(jaxpr.jaxpr, [])
        assert loops, "the walk found no loop at all (the pencil has one)"
        return [(k, n) for k, n in loops if n == T or (k == "while" and any(T in shape for shape in n))]

    assert over_time("sequential"), "the sequential recursions should loop over time"
    assert over_time("parallel") == []
    # "auto" is the sequential recursions on this CPU backend
    assert jax.default_backend() != "cpu" or over_time("auto") == over_time("sequential")


def test_the_setting_is_checked_static_and_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("KRONLIK_STATESPACE_SCAN", raising=False)
    form = StateSpace(jnp.linspace(0.0, 1.0, T), Matern32(*_s(1.0, 0.5)))
    assert form.scan == "auto" and form.recursions() == scan_method()
    assert scan_method() == ("sequential" if jax.default_backend() == "cpu" else "parallel")
    assert scan_method("parallel") == "parallel" and scan_method("sequential") == "sequential"
    with pytest.raises(ValueError, match="StateSpace's scan must be one of 'auto', 'sequential', 'parallel'"):
        StateSpace(form.times, form.kernel, scan="fast")
    # static: the cotangent and every transformation keep it; one jit-compiled function traces
    # the two choices apart (the sequential program loops over time, the parallel one does not)
    parallel = StateSpace(form.times, form.kernel, "parallel")
    Y, K, s = jnp.ones((T, D)), jnp.eye(D), jnp.zeros(D)
    grad = jax.grad(kronlik.loglik_diag, argnums=1)(Y, parallel, K, s)
    assert isinstance(grad, StateSpace) and grad.scan == "parallel"
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(parallel)
    assert jax.tree_util.tree_structure(parallel) != jax.tree_util.tree_structure(form)
    compiled = jax.jit(kronlik.loglik_diag)
    for scan in ("sequential", "parallel", "sequential"):  # the jaxpr that jit traced (and cached)
        loops = _loops(jax.make_jaxpr(compiled)(Y, StateSpace(form.times, form.kernel, scan), K, s).jaxpr, [])
        assert (("scan", T) in loops) == (scan == "sequential"), scan
    assert "auto" in repr(form) and "parallel" in repr(parallel)
    # "auto" reads KRONLIK_STATESPACE_SCAN (checked) when traced
    code = "import kronlik.statespace as s; print(s.scan_method())"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, env={**env, "KRONLIK_STATESPACE_SCAN": "parallel"}, capture_output=True, text=True)
    assert out.stdout.strip() == "parallel", out.stderr
    out = subprocess.run(run, env={**env, "KRONLIK_STATESPACE_SCAN": "gpu"}, capture_output=True, text=True)
    assert out.returncode != 0 and "KRONLIK_STATESPACE_SCAN must be one of" in out.stderr


_value_and_grads_jit = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3)))


def test_one_and_two_steps():
    # The scans' smallest inputs: a single time point (no combine at all) and two.
    rng = np.random.default_rng(2)
    for n in (1, 2):
        form = StateSpace(jnp.asarray(rng.uniform(0.0, 1.0, n)), KERNELS["matern32 + sho (J = 4)"], "parallel")
        Y, K, s = jnp.asarray(rng.standard_normal((n, D))), jnp.asarray(spd(rng, D, 0.1)), jnp.zeros(D)
        value, grads = _value_and_grads_jit(Y, form, K, s)
        dense = jax.jit(
            jax.value_and_grad(lambda Y, m, K, s: reference.loglik(Y, m, K, jnp.diag(jnp.exp(s))), (0, 2, 3))
        )(Y, form.dense(), K, s)
        assert abs(float(value - dense[0])) < 1e-12 * abs(float(dense[0])), n
        for g, r in zip((grads[0], grads[2], grads[3]), dense[1]):
            assert max_rel(g, r) < 1e-12, n


@pytest.mark.slow
@pytest.mark.parametrize("name", HARD)
def test_hard_cases_against_the_dense_reference(name):
    # test_statespace.py's hard cases (T = 300: near-duplicate and duplicate times, lengthscales
    # 1e-3 and 1e4 times the span, K singular, Σ = cI), by the parallel recursions.
    Y, M, K, s = _hard_case(name)
    args = (Y, StateSpace(M.times, M.kernel, "parallel"), K, s)
    value, grads = _value_and_grads_jit(*args)
    dense_value, dense_grads = _dense_value_and_grads(Y, M, K, s)
    assert abs(float(value - dense_value)) < 1e-10 * abs(float(dense_value)), name
    for what, g, r in zip(("Y", "M", "K", "log_var"), grads, dense_grads):
        for gl, rl in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(r)):
            assert max_rel(gl, rl) < 1e-10, f"{name}: ∂L/∂{what}"


@pytest.mark.slow
def test_not_positive_definite_is_nan_and_float32_is_close():
    rng = np.random.default_rng(3)
    t = _times(rng, "random")
    form = StateSpace(t.at[7].set(t[8]), Matern32(*_s(1.0, 0.5)), "parallel")
    Y = jnp.asarray(rng.standard_normal((T, D)))
    k_rank1 = jnp.outer(jnp.arange(1.0, D + 1), jnp.arange(1.0, D + 1))
    # duplicate times with no noise on the output K reaches: U singular, NaN (never finite)
    value, grads = _value_and_grads_jit(Y, form, k_rank1, jnp.asarray([-1e4, 0.0, 0.0]))
    assert np.isnan(float(value))
    assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree_util.tree_leaves(grads))
    # float32: within validate's estimate, as for the sequential recursions (test_statespace.py),
    # on a plain and a graded noise; the float64 witness by the sequential recursions
    K = jnp.asarray(spd(rng, D, 0.1))
    good = StateSpace(t, Matern32(*_s(1.0, 0.5)), "parallel")
    sequential = StateSpace(t, good.kernel, "sequential")
    for lv in (jnp.asarray(rng.uniform(-1.0, 0.0, D)), jnp.linspace(-10.0, 1.0, D)):
        v64, g64 = _value_and_grads_jit(Y, sequential, K, lv)
        low = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), (Y, good, K, lv))
        v32, g32 = _value_and_grads_jit(*low)
        report = kronlik.validate(*low[:3], log_var=low[3], warn=False)
        assert v32.dtype == jnp.float32
        assert abs(float(v32) - float(v64)) <= report.error_bound * abs(float(v64))
        for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g64)):
            assert max_rel(a, b) <= report.gradient_error_bound
