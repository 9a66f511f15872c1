"""Missing cells with a StateSpace M: the joint-state Kalman filter (kronlik._kalman_joint).

Every case runs through ONE compiled program per entry point (the mask is traced, so a new
pattern is new data, not a new program), against three witnesses: the dense log N(y_o; 0, U_oo)
(a Cholesky of U with the missing rows and columns replaced by the identity, which leaves
log det and the quadratic form of U_oo unchanged; the 2π term counts observed cells), jax.grad
through a plain joint filter (tests/helpers.py), and central differences; and exact arithmetic
(mpmath) on tiny cases. solve, predict and the gradient helpers with a mask run in the
conformance test (tests/test_conformance.py, second tier for this form); the smoother behind the
command line's gap filling in tests/test_cli_statespace.py.

Tolerances: float64 1e-10 relative against the dense Cholesky on problems with κ(U_oo) ≲ 1e4
(its own error ~κ·eps ≈ 1e-12). Where the dense float64 answer is itself in doubt (a noise-free
output, log-variance -40), the reference is exact arithmetic at T = 5. Central differences, step
1e-5 on L ~ 50: truncation ~h²|L'''| and rounding ~eps|L|/h, both ≈ 1e-10, so 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel, plain_joint_filter_loglik, spd

import kronlik
from kronlik import reference
from kronlik.statespace import Matern52, StateSpace

T, D = 16, 3


def _dense_masked(Y, M, K, Sigma, mask):
    """log N(y_o; 0, U_oo) with a traced mask: U's missing rows and columns replaced by the identity."""
    U = reference.dense_covariance(M.dense(), K, Sigma)
    o = mask.reshape(-1)
    U = jnp.where(o[:, None] & o[None, :], U, jnp.where(jnp.eye(T * D, dtype=bool), 1.0, 0.0))
    v = jnp.where(o, Y.reshape(-1), 0.0)
    c = jnp.linalg.cholesky(U)
    w = jax.scipy.linalg.solve_triangular(c, v, lower=True)
    n_obs = jnp.sum(jnp.where(o, 1.0, 0.0))
    return -jnp.sum(jnp.log(jnp.diagonal(c))) - 0.5 * (w @ w + n_obs * jnp.log(2 * jnp.pi))


def _log_var(fn):
    return lambda Y, M, K, s, mask: fn(Y, M, K, jnp.diag(jnp.exp(s)), mask)


def _ours(loglik):
    return jax.jit(jax.value_and_grad(lambda Y, M, K, n, m: loglik(Y, M, K, n, mask=m), argnums=(0, 1, 2, 3)))


def _witness(fn):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))


OURS = {"Sigma": _ours(kronlik.loglik), "log_var": _ours(kronlik.loglik_diag)}
DENSE = {"Sigma": _witness(_dense_masked), "log_var": _witness(_log_var(_dense_masked))}
PLAIN = {"Sigma": _witness(plain_joint_filter_loglik), "log_var": _witness(_log_var(plain_joint_filter_loglik))}


def _times(rng, duplicates=False):
    t = rng.uniform(0.0, 4.0, T)
    if duplicates:
        t[5] = t[6]  # an exact duplicate
        t[9] = t[10] + 1e-12  # a near duplicate
    return jnp.asarray(t)


def _case(name, seed=0):
    """(Y with NaN on missing cells, M, K, noise, mask, noise_name) for a named case."""
    rng = np.random.default_rng(seed)
    M = StateSpace(_times(rng, "duplicate" in name), Matern52(jnp.asarray(1.2), jnp.asarray(0.8)))
    Y = rng.standard_normal((T, D))
    K = jnp.asarray(spd(rng, D, 0.1))
    noise_name, noise = "log_var", jnp.asarray(rng.uniform(-1.0, 1.0, D))
    mask = rng.uniform(size=(T, D)) < 0.5
    if name == "whole output missing":
        mask[:, 1] = False
    elif name == "whole rows missing":
        mask[[0, 4, 5, 15]] = False
    elif name == "alternating cells":
        mask = (np.arange(T)[:, None] + np.arange(D)[None, :]) % 2 == 0
    elif name == "90% missing":
        mask = rng.uniform(size=(T, D)) < 0.1
        mask[3, 0] = True
    elif name == "graded log-variances":
        noise = jnp.asarray([-9.0, -2.0, 5.0])
    elif name == "full Sigma":
        noise_name, noise = "Sigma", jnp.asarray(spd(rng, D, 0.2))
    elif name == "full Sigma, one noise-free output":
        sigma = spd(rng, D, 0.2)
        sigma[0, :] = sigma[:, 0] = 0.0
        noise_name, noise = "Sigma", jnp.asarray(sigma)
    elif name == "K of rank one":
        K = jnp.outer(jnp.arange(1.0, D + 1), jnp.arange(1.0, D + 1)) / D
    elif name == "Sigma = cI (ties)":
        noise = jnp.zeros(D)
    return jnp.asarray(np.where(mask, Y, np.nan)), M, K, noise, jnp.asarray(mask), noise_name


CASES = [
    "scattered",
    "whole output missing",
    "whole rows missing",
    "alternating cells",
    "90% missing",
    "graded log-variances",
    "full Sigma",
    "full Sigma, one noise-free output",
    "K of rank one",
    "Sigma = cI (ties)",
    "duplicate times",
]


def _assert_close(got, want, tol, what):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        err = max_rel(g, w)
        assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("name", CASES)
def test_value_and_every_gradient_against_dense_and_a_plain_filter(name):
    Y, M, K, noise, mask, noise_name = _case(name)
    value, grads = OURS[noise_name](Y, M, K, noise, mask)
    Y0 = jnp.where(mask, Y, 0.0)
    for witness, tol in ((DENSE, 1e-10), (PLAIN, 1e-10)):
        ref_value, ref_grads = witness[noise_name](Y0, M, K, noise, mask)
        assert abs(float(value - ref_value)) < tol * abs(float(ref_value)), name
        ref_grads = (jnp.where(mask, ref_grads[0], 0.0), *ref_grads[1:])
        _assert_close(grads, ref_grads, tol, f"{name} vs {'dense' if witness is DENSE else 'plain filter'}")
    assert np.all(np.asarray(grads[0])[~np.asarray(mask)] == 0.0), name  # missing cells do not enter L


def test_central_differences_in_every_argument():
    Y, M, K, noise, mask, noise_name = _case("whole rows missing", seed=3)
    fn = OURS[noise_name]
    _, grads = fn(Y, M, K, noise, mask)
    rng = np.random.default_rng(4)
    args = (jnp.where(mask, Y, 0.0), M, K, noise)
    h = 1e-5
    for i in range(4):
        d = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), args[i])
        if i == 2:
            d = 0.5 * (d + d.T)

        def at(step, i=i, d=d):
            moved = list(args)
            moved[i] = jax.tree_util.tree_map(lambda x, dx: x + step * dx, args[i], d)
            return float(fn(*moved, mask)[0])

        fd = (at(h) - at(-h)) / (2 * h)
        leaves = zip(jax.tree_util.tree_leaves(grads[i]), jax.tree_util.tree_leaves(d))
        g = sum(float(jnp.sum(gl * dl)) for gl, dl in leaves)
        assert abs(fd - g) < 1e-6 * max(1.0, abs(g)), (i, fd, g)


def test_vmap_over_masks_and_the_complete_path():
    # One program for a batch of masks (traced), equal to each case alone; an all-True mask
    # equals the complete-data pencil path (no mask).
    cases = [_case(n) for n in ("scattered", "whole output missing", "alternating cells")]
    Y0, M, K, noise, _, _ = cases[0]
    Y0 = jnp.where(cases[0][4], Y0, 0.0)
    masks = jnp.stack([c[4] for c in cases] + [jnp.ones((T, D), bool)])
    batched = jax.vmap(lambda m: OURS["log_var"](Y0, M, K, noise, m))(masks)
    for b in range(masks.shape[0]):
        one = OURS["log_var"](Y0, M, K, noise, masks[b])
        _assert_close(jax.tree_util.tree_map(lambda x, b=b: x[b], batched), one, 1e-12, f"mask {b}")
    complete = jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))(Y0, M, K, noise)
    _assert_close(jax.tree_util.tree_map(lambda x: x[-1], batched), complete, 1e-10, "all observed")
    # a concrete all-True mask takes the pencil path itself; none observed is the empty density
    # (bit for bit: the same program as no mask at all)
    no_mask = float(kronlik.loglik_diag(Y0, M, K, noise))
    assert float(kronlik.loglik_diag(Y0, M, K, noise, mask=np.ones((T, D), bool))) == no_mask
    assert float(kronlik.loglik_diag(Y0, M, K, noise, mask=np.zeros((T, D), bool))) == 0.0


@pytest.mark.parametrize("log_var0", [0.0, -40.0])
def test_exact_arithmetic_on_a_tiny_gappy_problem(log_var0):
    # T = 5, D = 2: log-variance -40 (a noise-free output to float64) where the dense float64
    # Cholesky of U_oo is itself in doubt; value and every gradient against mpmath.
    rng = np.random.default_rng(7)
    t = jnp.asarray([0.0, 0.4, 0.5, 1.7, 2.0])
    M = StateSpace(t, Matern52(jnp.asarray(1.1), jnp.asarray(0.9)))
    Y = jnp.asarray(rng.standard_normal((5, 2)))
    K = jnp.asarray(spd(rng, 2, 0.1))
    s = jnp.asarray([log_var0, -0.5])
    mask = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], bool)
    value, grads = jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))(Y, M, K, s, mask=mask)
    ex = reference.exact(Y, M.dense(), K, log_var=s, mask=mask)
    assert abs(float(value) - ex.value) < 1e-12 * abs(ex.value)
    assert max_rel(grads[0], np.where(mask, ex.y, 0.0)) < 1e-10
    assert max_rel(grads[2], ex.k) < 1e-10
    assert max_rel(grads[3], ex.noise) < 1e-10
    # ∂L/∂θ = ⟨∂L/∂M, ∂M/∂θ⟩ with the exact ∂L/∂M
    for leaf, path in zip(jax.tree_util.tree_leaves(grads[1]), ("times", "amplitude", "lengthscale")):
        tangent = jax.tree_util.tree_map(jnp.zeros_like, M)
        tangent = tangent._replace(times=jnp.ones_like(t)) if path == "times" else tangent
        if path != "times":
            tangent = tangent._replace(kernel=tangent.kernel._replace(**{path: jnp.asarray(1.0)}))
        dm = jax.jvp(lambda m: m.dense(), (M,), (tangent,))[1]
        want = float(np.sum(np.asarray(ex.m) * np.asarray(dm)))
        got = float(jnp.sum(leaf)) if path == "times" else float(leaf)
        assert abs(got - want) < 1e-10 * max(1.0, abs(want)), path


def test_nan_never_a_finite_wrong_number():
    # U_oo singular: a noise-free output observed twice at the same time; Σ not PSD; Y NaN on an
    # observed cell. Every output NaN, value and gradients.
    Y, M, K, noise, mask, _ = _case("full Sigma, one noise-free output")
    times = M.times.at[2].set(M.times[1])
    mask = mask.at[1, 0].set(True).at[2, 0].set(True)
    Y = Y.at[1, 0].set(0.3).at[2, 0].set(0.4)
    bad = {
        "duplicate noise-free observation": (Y, StateSpace(times, M.kernel), K, noise, mask),
        "Sigma not PSD": (Y, M, K, noise.at[1, 1].set(-1.0), mask),
        "NaN on an observed cell": (Y.at[1, 0].set(jnp.nan), M, K, noise, mask),
    }
    for name, args in bad.items():
        value, grads = OURS["Sigma"](*args)
        assert np.isnan(float(value)), name
        assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree_util.tree_leaves(grads)), name
    with pytest.raises(ValueError, match="U_oo .* is numerically singular"):
        kronlik.validate(*bad["duplicate noise-free observation"][:4], mask=np.asarray(mask))


def test_validate_reports_the_path_taken():
    # The joint filter's estimate: small on a well-posed gappy problem, larger (and still above
    # the error measured against the dense reference) with a noise-free output.
    estimates = {}
    for name in ("scattered", "full Sigma, one noise-free output"):
        Y, M, K, noise, mask, noise_name = _case(name)
        kwargs = {"log_var": noise} if noise_name == "log_var" else {"Sigma": noise}
        report = kronlik.validate(Y, M, K, mask=np.asarray(mask), warn=False, **kwargs)
        value, grads = OURS[noise_name](Y, M, K, noise, mask)
        ref_value, _ = DENSE[noise_name](jnp.where(mask, Y, 0.0), M, K, noise, mask)
        assert abs(float(value - ref_value)) / abs(float(ref_value)) < report.error_bound, name
        estimates[name] = report.error_bound
    assert estimates["scattered"] < 1e-11 < estimates["full Sigma, one noise-free output"]


@pytest.mark.slow
def test_float32_against_the_float64_reference():
    Y, M, K, noise, mask, _ = _case("scattered", seed=8)
    low = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (Y, M, K, noise))
    value, grads = jax.value_and_grad(kronlik.loglik_diag, argnums=(0, 1, 2, 3))(*low, mask=mask)
    ref_value, ref_grads = DENSE["log_var"](jnp.where(mask, Y, 0.0), M, K, noise, mask)
    assert value.dtype == jnp.float32
    # κ(U_oo)·eps32 ≈ 1e-4 at worst here
    assert abs(float(value) - float(ref_value)) < 1e-4 * abs(float(ref_value))
    ref_grads = (jnp.where(mask, ref_grads[0], 0.0), *ref_grads[1:])
    _assert_close(grads, ref_grads, 1e-3, "float32")
