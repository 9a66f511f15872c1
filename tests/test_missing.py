"""Missing entries (``mask=``): exact arithmetic, finite differences, degenerate and graded
spectra, jit/vmap with a traced mask, and every way the input can be bad.

The conformance test (tests/test_conformance.py) runs every form × noise model × entry point with
a mask against the dense Cholesky of U_oo; here are the other witnesses. Tolerances: float64
against mpmath (60 digits) 1e-10 relative to the largest entry, as for complete data: the
Schur complement adds one m×m Cholesky of S (whose inverse, the covariance of the missing
entries given the observed, is at least their noise) and one step of iterative refinement
takes back what P v₀ - Z S⁻¹ α cancels (measured ≤ 3e-13 on these cases).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import eqns, max_rel, spd, with_spectrum

import kronlik
from kronlik import kernels, reference


def _rbf(T, ell):
    x = np.linspace(0.0, 1.0, T)
    return np.asarray(kernels.rbf(jnp.asarray(x), jnp.asarray(x), ell))


def _cases():
    rng = np.random.default_rng(21)
    T, D = 4, 3
    scattered = rng.random((T, D)) > 0.35
    scattered[0] = [True, False, True]
    one_missing = np.ones((T, D), bool)
    one_missing[1, 0] = False
    output_missing = np.ones((T, D), bool)
    output_missing[:, 0] = False
    k = spd(rng, D, 0.1)
    near = np.array([[1.0, 0.999, 0.5], [0.999, 1.0, 0.5], [0.5, 0.5, 1.0]])
    scales = np.array([1e-4, 1.0, 1e4])
    return {
        # (M, K, Σ, mask)
        "random": (spd(rng, T, 0.1), k, spd(rng, D, 0.3), scattered),
        # a missing entry whose noise is 1e-10 and which the others predict almost exactly:
        # P v₀ and Z S⁻¹ α are 1e10 times the solve and cancel (the refinement's case)
        "tiny noise, missing": (np.ones((T, T)) + 1e-3 * np.eye(T), near, np.diag([1e-10, 1.0, 1.0]), one_missing),
        # an output never observed: its noise and its row of K do not enter L (gradient exactly 0)
        "output never observed": (_rbf(T, 0.3), near, np.diag([1e-10, 1.0, 1.0]), output_missing),
        "graded noise": (_rbf(T, 0.3), k, np.diag([1e-6, 1.0, 1e6]), scattered),
        "graded units": (_rbf(T, 0.3), k * np.outer(scales, scales), np.diag(0.1 * scales**2), scattered),
        "ties: M = I, K = 2I, Σ = I/2": (np.eye(T), 2.0 * np.eye(D), 0.5 * np.eye(D), scattered),
        "M = 0": (np.zeros((T, T)), k, spd(rng, D, 0.3), scattered),
        "K = 0": (spd(rng, T, 0.1), np.zeros((D, D)), spd(rng, D, 0.3), scattered),
        "rank-1 M, repeated eigenvalue 0": (with_spectrum(rng, [3.0, 0, 0, 0]), k, spd(rng, D, 0.3), scattered),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_against_exact_arithmetic(case):
    M, K, Sigma, mask = CASES[case]
    rng = np.random.default_rng(22)
    scale = np.sqrt(np.diag(Sigma) + np.diag(K) * np.max(np.diag(M)))
    Y = rng.standard_normal(mask.shape) * scale[None, :]
    exact = reference.exact(Y, M, K, Sigma, mask=mask, digits=60)
    y_nan = jnp.asarray(np.where(mask, Y, np.nan))
    value, grads = jax.jit(jax.value_and_grad(lambda *a: kronlik.loglik(*a, mask=mask), argnums=(0, 1, 2, 3)))(
        y_nan, M, K, Sigma
    )
    assert abs(float(value) - exact.value) < 1e-10 * abs(exact.value), case
    for name, got, want in zip("YMKΣ", grads, (exact.y, exact.m, exact.k, exact.noise)):
        assert np.all(np.isfinite(got)), (case, name)
        assert max_rel(got, want) < 1e-10, f"{case} ∂L/∂{name}: {max_rel(got, want):.1e}"
    assert max_rel(kronlik.solve(y_nan, M, K, Sigma, mask=mask), exact.solve) < 1e-10, case
    if np.all(Sigma == np.diag(np.diag(Sigma))):  # diagonal noise: the log-variance gradient too
        log_var = np.log(np.diag(Sigma))
        diag = reference.exact(Y, M, K, log_var=log_var, mask=mask, digits=60)
        got = kronlik.grad_log_var(y_nan, M, K, log_var, mask=mask)
        assert max_rel(got, diag.noise) < 1e-10, case


def test_output_never_observed_has_zero_noise_gradient():
    M, K, Sigma, mask = CASES["output never observed"]
    Y = jnp.asarray(np.where(mask, np.random.default_rng(23).standard_normal(mask.shape), np.nan))
    g = kronlik.grad_sigma(Y, M, K, Sigma, mask=mask)
    assert np.max(np.abs(np.asarray(g)[0])) < 1e-12 * np.max(np.abs(g))  # exact: 0


def test_central_differences(rng):
    # The third witness: dL along a random direction of each argument, by the hand-derived
    # gradient and by central differences (step 1e-5: truncation ≈ 1e-10, rounding ≈ 1e-11).
    T, D = 5, 3
    mask = rng.random((T, D)) > 0.3
    M, K, S = spd(rng, T, 0.2), spd(rng, D, 0.2), spd(rng, D, 0.4)
    args = [jnp.asarray(a) for a in (rng.standard_normal((T, D)), M, K, S)]

    def f(*a):
        return kronlik.loglik(*a, mask=mask)

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(*args)
    h = 1e-5
    for i in range(4):
        d = rng.standard_normal(args[i].shape)
        d = d if i == 0 else 0.5 * (d + d.T)
        up = [a + h * d if j == i else a for j, a in enumerate(args)]
        down = [a - h * d if j == i else a for j, a in enumerate(args)]
        fd = (float(f(*up)) - float(f(*down))) / (2 * h)
        hand = float(jnp.sum(grads[i] * d))
        assert abs(fd - hand) < 1e-7 * max(1.0, abs(hand)), (i, fd, hand)


def test_masking_is_exactly_ignoring():
    M, K, Sigma, mask = CASES["random"]
    rng = np.random.default_rng(24)
    Y = rng.standard_normal(mask.shape)
    with_nan, with_junk = np.where(mask, Y, np.nan), np.where(mask, Y, 1e6)
    values = [kronlik.loglik(y, M, K, Sigma, mask=mask) for y in (with_nan, with_junk, Y)]
    assert values[0] == values[1] == values[2]
    g = jax.grad(kronlik.loglik)(jnp.asarray(with_nan), M, K, Sigma, mask=mask)
    assert np.all(np.asarray(g)[~mask] == 0.0) and np.all(np.isfinite(g))
    # all observed: the complete-data likelihood, bit for bit (no Schur complement is built)
    full = np.ones(mask.shape, bool)
    assert kronlik.loglik(Y, M, K, Sigma, mask=full) == kronlik.loglik(Y, M, K, Sigma)
    # nothing observed: the empty product, L = 0
    assert abs(float(kronlik.loglik(with_nan, M, K, Sigma, mask=np.zeros(mask.shape, bool)))) < 1e-12
    # NaN where Y is observed is still invalid input
    bad = with_nan.copy()
    bad[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1]] = np.nan
    assert np.isnan(kronlik.loglik(bad, M, K, Sigma, mask=mask))
    assert np.all(np.isnan(jax.grad(kronlik.loglik, argnums=2)(jnp.asarray(bad), M, K, Sigma, mask=mask)))


def test_traced_masks_under_jit_and_vmap():
    M, K, Sigma, _ = CASES["random"]
    rng = np.random.default_rng(25)
    T, D = 4, 3
    masks = rng.random((5, T, D)) > 0.4
    masks[0] = True  # nothing missing in one of them
    Y = jnp.asarray(rng.standard_normal((T, D)))
    most = int(np.max(np.sum(~masks, axis=(1, 2))))

    @jax.jit
    def batched(Y, masks):
        return jax.vmap(
            lambda m: jax.value_and_grad(kronlik.loglik, argnums=3)(Y, M, K, Sigma, mask=m, max_missing=most)
        )(masks)

    values, grads = batched(Y, masks)
    for b in range(masks.shape[0]):
        want = reference.loglik(Y, M, K, Sigma, mask=masks[b])
        assert abs(float(values[b]) - float(want)) < 1e-10 * abs(float(want))
        want_g = jax.grad(reference.loglik, argnums=3)(Y, M, K, Sigma, mask=masks[b])
        assert max_rel(grads[b], want_g) < 1e-10
    # a bound that is too small gives NaN, never a number
    tight = jax.jit(lambda m: kronlik.loglik(Y, M, K, Sigma, mask=m, max_missing=most - 1))
    assert np.isnan(tight(masks[np.argmax(np.sum(~masks, axis=(1, 2)))]))
    with pytest.raises(ValueError, match="max_missing"):
        jax.jit(lambda m: kronlik.loglik(Y, M, K, Sigma, mask=m))(masks[1])


def test_bad_masks_are_refused():
    M, K, Sigma, mask = CASES["random"]
    Y = np.zeros(mask.shape)
    with pytest.raises(TypeError, match="boolean"):
        kronlik.loglik(Y, M, K, Sigma, mask=mask.astype(np.float64))
    with pytest.raises(ValueError, match=r"shape of Y, \(4, 3\)"):
        kronlik.loglik(Y, M, K, Sigma, mask=mask[:, :2])
    with pytest.raises(ValueError, match="without a mask"):
        kronlik.loglik(Y, M, K, Sigma, max_missing=3)
    with pytest.raises(ValueError, match="non-negative int"):
        kronlik.loglik(Y, M, K, Sigma, mask=mask, max_missing=2.5)


def test_derivatives_beyond_the_rules_raise():
    M, K, Sigma, mask = CASES["random"]
    Y = jnp.asarray(np.where(mask, 1.0, np.nan))
    with pytest.raises(TypeError, match="with a mask"):
        jax.hessian(kronlik.loglik, argnums=3)(Y, M, K, Sigma, mask=mask)
    with pytest.raises(TypeError, match="with a mask"):
        jax.jacfwd(lambda k: kronlik.solve(Y, M, k, Sigma, mask=mask))(K)


def test_no_td_by_td_array_anywhere():
    # T = 20, D = 5, 4 missing: every intermediate of value and all gradients (nested jaxprs
    # walked) is far below (TD)² = 10⁴ entries; the largest are T×T and (m + 1)×T×D.
    rng = np.random.default_rng(26)
    T, D = 20, 5
    mask = np.ones((T, D), bool)
    mask[[1, 5, 9, 17], [0, 2, 2, 4]] = False
    args = (rng.standard_normal((T, D)), spd(rng, T, 0.1), spd(rng, D, 0.1), rng.standard_normal(D))
    fn = jax.value_and_grad(lambda *a: kronlik.loglik_diag(*a, mask=mask), argnums=(0, 1, 2, 3))
    jaxpr = jax.make_jaxpr(fn)(*args)
    sizes = [int(np.prod(v.aval.shape)) for e in eqns(jaxpr.jaxpr) for v in e.outvars if hasattr(v.aval, "shape")]
    assert max(sizes) <= max(T * T, 5 * T * D) < (T * D) ** 2 // 10  # (m + 1) T D: w̃ and the q_k


def _degenerate_cases():
    # The complete U is singular or nearly so, U_oo is well conditioned: rows and outputs that
    # are never observed must not be able to spoil the observed entries' likelihood.
    rng = np.random.default_rng(27)
    T, D = 5, 3
    k = spd(rng, D, 0.1)
    zero_row = spd(rng, T, 0.1)
    zero_row[4, :] = zero_row[:, 4] = 0.0
    row_missing = np.ones((T, D), bool)
    row_missing[4] = False
    out_missing = np.ones((T, D), bool)
    out_missing[:, 0] = False
    scattered = row_missing.copy()
    scattered[1, 2] = scattered[2, 0] = False
    a = rng.standard_normal((T, T - 1))
    singular = a @ a.T / T
    k_zero = k.copy()
    k_zero[2, :] = k_zero[:, 2] = 0.0
    x = np.array([0.0, 0.3, 0.3 + 1e-7, 0.7, 1.0])
    near = np.asarray(kernels.rbf(jnp.asarray(x), jnp.asarray(x), 0.3))
    dup_missing = np.ones((T, D), bool)
    dup_missing[2] = False
    return {
        # (M, K, Σ, mask)
        "M zero row, row missing, Σ = 1e-40 I": (zero_row, k, 1e-40 * np.eye(D), scattered),
        "M zero row, row missing, Σ = 0": (zero_row, k, np.zeros((D, D)), row_missing),
        "M singular, output never observed, its noise 1e-15": (singular, k, np.diag([1e-15, 0.5, 0.7]), out_missing),
        "M singular, output never observed, its noise 0": (singular, k, np.diag([0.0, 0.5, 0.7]), out_missing),
        "K zero for an output never observed, its noise 0": (
            spd(rng, T, 0.1),
            k_zero,
            np.diag([0.3, 0.4, 0.0]),
            out_missing[:, ::-1],
        ),
        "near-duplicate time missing, noise 1e-14": (near, k, 1e-14 * np.eye(D), dup_missing),
    }


DEGENERATE = _degenerate_cases()


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_complete_model_with_a_well_posed_observed_part(case):
    M, K, Sigma, mask = DEGENERATE[case]
    Y = np.random.default_rng(28).standard_normal(mask.shape)
    exact = reference.exact(Y, M, K, Sigma, mask=mask, digits=60)
    y_nan = jnp.asarray(np.where(mask, Y, np.nan))
    value, grads = jax.value_and_grad(lambda *a: kronlik.loglik(*a, mask=mask), argnums=(0, 1, 2, 3))(
        y_nan, M, K, Sigma
    )
    assert abs(float(value) - exact.value) < 1e-10 * abs(exact.value), case
    for name, got, want in zip("YMKΣ", grads, (exact.y, exact.m, exact.k, exact.noise)):
        assert max_rel(got, want) < 1e-10, f"{case} ∂L/∂{name}: {max_rel(got, want):.1e}"
    # the same through a LowRank M (M = G Gᵀ) where M is given as one
    if np.allclose(M[4], 0):
        G = jnp.asarray(np.linalg.cholesky(M[:4, :4] + 0.0))
        G = jnp.concatenate([G, jnp.zeros((1, 4))])
        got = kronlik.loglik(y_nan, kronlik.LowRank(G), K, Sigma, mask=mask)
        assert abs(float(got) - exact.value) < 1e-10 * abs(exact.value), case


def test_traced_masks_give_nan_not_a_wrong_number_where_the_complete_model_is_singular():
    # A traced mask cannot drop what is never observed; where the complete U is too ill
    # conditioned for the Schur complement (eps·cond(U) > sqrt(eps)), NaN, never a number.
    M, K, Sigma, mask = DEGENERATE["M zero row, row missing, Σ = 1e-40 I"]
    Y = jnp.asarray(np.where(mask, 1.0, np.nan))
    assert np.isfinite(kronlik.loglik(Y, M, K, Sigma, mask=mask))  # concrete: rows dropped, exact
    traced = jax.jit(lambda m: kronlik.loglik(Y, M, K, Sigma, mask=m, max_missing=4))(mask)
    assert np.isnan(traced)


def test_max_missing_zero_means_nothing_may_be_missing():
    M, K, Sigma, mask = CASES["random"]
    Y = jnp.asarray(np.random.default_rng(29).standard_normal(mask.shape))
    full = np.ones(mask.shape, bool)
    want = kronlik.loglik(Y, M, K, Sigma)
    assert kronlik.loglik(Y, M, K, Sigma, mask=full, max_missing=0) == want
    fn = jax.jit(lambda m: kronlik.loglik(Y, M, K, Sigma, mask=m, max_missing=0))
    assert abs(float(fn(full)) - float(want)) < 1e-12 * abs(float(want)) and np.isnan(fn(mask))


@pytest.mark.slow
def test_fit_log_var_with_a_mask_reaches_the_dense_optimum():
    # The masked likelihood maximised over the log-variances: the dense gradient vanishes there,
    # and the observed information (central differences of the exact gradient) equals -jax.hessian
    # of the dense reference (to its eps^(2/3) ≈ 4e-11, relative to the largest entry, with margin).
    rng = np.random.default_rng(30)
    T, D = 30, 3
    M, K = _rbf(T, 0.2) + 1e-6 * np.eye(T), spd(rng, D, 0.2)
    U = np.kron(M, K) + np.kron(np.eye(T), np.diag([0.3, 0.1, 1.0]))
    Y = (np.linalg.cholesky(U) @ rng.standard_normal(T * D)).reshape(T, D)
    mask = rng.random((T, D)) > 0.2
    fitted = kronlik.fit_log_var(jnp.asarray(np.where(mask, Y, np.nan)), M, K, jnp.zeros(D), mask=mask, tol=1e-9)
    assert bool(fitted.converged)

    def dense(s):
        return reference.loglik(jnp.asarray(Y), M, K, jnp.diag(jnp.exp(s)), mask=mask)

    assert np.max(np.abs(jax.grad(dense)(fitted.params))) < 1e-7 * T
    assert max_rel(fitted.information, -jax.hessian(dense)(fitted.params)) < 1e-8
    with pytest.raises(ValueError, match="with a mask"):
        kronlik.fit_log_var(jnp.asarray(Y), M, K, jnp.zeros(D), mask=mask, method="newton")
