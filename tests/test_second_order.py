"""Second derivatives of the likelihood: three witnesses, degenerate spectra, exact arithmetic,
and the JAX transformations they compose with.

Every form × noise model × entry point is in test_conformance.py; here the dense M and both
noise models, on spectra where jax.hessian through eigh is NaN or wrong. The witnesses of each
Hessian: kronlik's hand-derived rules (jax.hessian of loglik), jax.hessian of the dense
Cholesky reference, and central differences of kronlik's (first-order, hand-derived) gradient.

Tolerances: the problems have κ(U) ≲ 1e2, second derivatives carry U⁻¹ twice (κ²·eps ≈ 1e-12),
so 1e-9 against the dense reference; central differences with step eps^(1/3)·scale have
truncation + rounding error ≈ eps^(2/3) ≈ 4e-11 times the third derivative's scale, so 1e-6.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import exact_log_var_hessian, max_rel, random_problem, with_spectrum

import kronlik
from kronlik import reference

T, D = 5, 3
REFUSAL = "kronlik does not differentiate its eigendecompositions"


def _cases():
    rng = np.random.default_rng(3)
    Y, M, K, S = (np.asarray(a) for a in random_problem(rng, T, D))
    g = rng.standard_normal((T, 2))
    gap = 1e-10
    return {
        "random": (Y, M, K, S),
        "M = I, K = 2I, Σ = I/2": (Y, np.eye(T), 2.0 * np.eye(D), 0.5 * np.eye(D)),
        "K = 0": (Y, M, np.zeros((D, D)), S),
        "M = GGᵀ of rank 2": (Y, g @ g.T, K, S),
        "Σ = cI, K = cI": (Y, M, 0.7 * np.eye(D), 0.7 * np.eye(D)),
        "gaps 1e-10": (
            Y,
            with_spectrum(rng, [1.0, 1.0 + gap, 1.0 + 2 * gap, 2.0, 2.0 + gap]),
            with_spectrum(rng, [1.0, 1.0 + gap, 3.0]),
            np.diag([0.5, 0.5 + gap, 0.5]),
        ),
    }


CASES = _cases()


def _flat(fn, args):
    """fn as a function of one flat vector (ravel_pytree order of args), and that vector."""
    flat, unravel = jax.flatten_util.ravel_pytree(args)
    return (lambda x: fn(*unravel(x))), flat


def _log_var_args(args):
    Y, M, K, S = args
    return Y, M, K, np.log(np.diagonal(S))


def _fns(noise):
    if noise == "Sigma":
        return kronlik.loglik, reference.loglik
    return kronlik.loglik_diag, lambda Y, M, K, s: reference.loglik(Y, M, K, jnp.diag(jnp.exp(s)))


@pytest.mark.parametrize("noise", ["Sigma", pytest.param("log_var", marks=pytest.mark.slow)])  # log_var: conformance
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_three_witnesses(case, noise):
    args = CASES[case] if noise == "Sigma" else _log_var_args(CASES[case])
    args = tuple(jnp.asarray(a) for a in args)
    fn, ref = _fns(noise)
    f, x = _flat(fn, args)
    f_ref, _ = _flat(ref, args)
    hess = jax.jit(jax.hessian(f))(x)
    assert np.all(np.isfinite(hess)), "a finite dense reference must give a finite Hessian"
    dense = jax.hessian(f_ref)(x)
    assert max_rel(hess, dense) < 1e-9, f"{case}: {max_rel(hess, dense):.1e} against jax.hessian of the dense reference"
    # central differences of the hand-derived gradient, column by column, where both sides are
    # in the domain (at K = 0 or a singular M, a step that makes them indefinite leaves it: NaN)
    grad = jax.jit(jax.grad(f))
    step = float(jnp.finfo(x.dtype).eps) ** (1 / 3) * max(1.0, float(jnp.max(jnp.abs(x))))
    eye = np.eye(x.shape[0])
    fd = np.stack([(grad(x + step * e) - grad(x - step * e)) / (2 * step) for e in eye], axis=1)
    inside = np.all(np.isfinite(fd), axis=0)
    n_y, n_noise = T * D, args[3].size
    assert np.all(inside[:n_y]) and np.all(inside[-n_noise:]), "Y and noise steps stay in the domain"
    err = max_rel(np.asarray(hess)[:, inside], fd[:, inside])
    assert err < 1e-6, f"{case}: {err:.1e} against central differences"


@pytest.mark.slow
def test_jax_hessian_through_eigh_is_nan_where_kronlik_is_exact():
    # The claim the rules exist for: an eigh-based likelihood differentiated by JAX at M = I.
    Y, M, K, S = (jnp.asarray(a) for a in CASES["M = I, K = 2I, Σ = I/2"])

    def through_eigh(K):
        lam, q = jnp.linalg.eigh(M)
        kap, p = jnp.linalg.eigh(K)
        z = q.T @ Y @ p
        e = lam[:, None] * kap[None, :] + 0.5
        return -0.5 * (jnp.sum(jnp.log(e)) + jnp.sum(z * z / e))

    assert not np.all(np.isfinite(jax.hessian(through_eigh)(K)))
    hess = jax.hessian(kronlik.loglik, argnums=2)(Y, M, K, S)
    assert np.all(np.isfinite(hess))
    assert max_rel(hess, jax.hessian(reference.loglik, argnums=2)(Y, M, K, S)) < 1e-12


@pytest.mark.parametrize("s", [[0.0, -20.0, -40.0], [0.0, 0.0, -35.0], [30.0, 0.0, -30.0]])
def test_graded_noise_hessian_against_exact_arithmetic(s):
    # One output nearly noise-free: the dense float64 reference is in doubt, exact arithmetic is not.
    pytest.importorskip("mpmath")
    rng = np.random.default_rng(7)
    Y, M, K = rng.standard_normal((3, D)), np.eye(3), np.eye(D) + 0.5
    exact, _ = exact_log_var_hessian(Y, M, K, s)
    hess = np.asarray(jax.hessian(kronlik.loglik_diag, argnums=3)(*(jnp.asarray(a) for a in (Y, M, K, s))))
    # Each entry against √|H_dd H_ee| (the entries span 1e-43 to 1; measured ≤ 2e-15), plus
    # round-off of the O(T) terms that cancel on the diagonal (∂L/∂s_d and the curvature of
    # e^{s_d}, both ≤ T/2 in size): H_00 = -1.9e-13 at s = [30, 0, -30] is found to 2e-16
    # absolute. kronlik.hessian_log_var sums the diagonal without that cancellation.
    scale = np.sqrt(np.outer(np.abs(np.diagonal(exact)), np.abs(np.diagonal(exact))))
    cancellation = 10 * np.finfo(np.float64).eps * Y.shape[0]
    assert np.all(np.abs(hess - exact) <= 1e-11 * scale + cancellation)


@pytest.mark.slow
def test_forward_and_reverse_compositions_agree():
    rng = np.random.default_rng(4)
    args = random_problem(rng, 3, 2)  # small: four full Hessians
    f, x = _flat(kronlik.loglik, args)
    fwd_rev = jax.jacfwd(jax.jacrev(f))(x)
    for other in (jax.jacrev(jax.jacrev(f)), jax.jacfwd(jax.jacfwd(f)), jax.jacrev(jax.jacfwd(f))):
        assert max_rel(other(x), fwd_rev) < 1e-12
    assert max_rel(jax.jacfwd(f)(x), jax.grad(f)(x)) < 1e-13  # jacfwd = jacrev at first order


@pytest.mark.slow
def test_hessian_vector_products_vmap_jit_and_linearize():
    args = tuple(jnp.asarray(a) for a in CASES["gaps 1e-10"])
    f, x = _flat(kronlik.loglik, args)
    hess = jax.hessian(f)(x)
    directions = jnp.asarray(np.random.default_rng(0).standard_normal((4, x.shape[0])))
    hvp = jax.jit(jax.vmap(lambda v: jax.jvp(jax.grad(f), (x,), (v,))[1]))(directions)
    assert max_rel(hvp, directions @ hess.T) < 1e-12
    value, linear = jax.linearize(f, x)
    assert max_rel(jax.vmap(linear)(directions), directions @ jax.grad(f)(x)) < 1e-13
    assert float(value) == pytest.approx(float(f(x)), rel=1e-15)


def test_value_tangent_against_central_differences():
    args = tuple(jnp.asarray(a) for a in _log_var_args(CASES["random"]))
    f, x = _flat(kronlik.loglik_diag, args)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))
    _, tangent = jax.jvp(f, (x,), (v,))
    step = 1e-5
    fd = (f(x + step * v) - f(x - step * v)) / (2 * step)
    assert abs(float(tangent) - float(fd)) < 1e-7 * float(jnp.linalg.norm(jax.grad(f)(x)) * jnp.linalg.norm(v))


@pytest.mark.slow
def test_third_order_in_m_k_or_noise_raises_and_in_y_alone_works():
    Y, M, K, S = (jnp.asarray(a) for a in CASES["random"])
    for argnums in (1, 2, 3):
        with pytest.raises(TypeError, match=REFUSAL):
            jax.jacfwd(jax.hessian(kronlik.loglik, argnums=argnums), argnums=argnums)(Y, M, K, S)
    # L is quadratic in Y: its third derivative is zero, and needs no eigh derivative
    third = jax.jacfwd(jax.hessian(kronlik.loglik, argnums=0), argnums=0)(Y, M, K, S)
    assert third.shape == (T, D) * 3 and np.all(third == 0.0)
    # and the Hessian in Y is -U⁻¹
    hess_y = jax.hessian(kronlik.loglik, argnums=0)(Y, M, K, S).reshape(T * D, T * D)
    assert max_rel(hess_y, -jnp.linalg.inv(reference.dense_covariance(M, K, S))) < 1e-12


@pytest.mark.slow
def test_nan_for_invalid_input_in_every_mode():
    # Forward and reverse: a rule's NaN mask must survive transposition (reverse over reverse,
    # reverse mode of the helpers), never become a finite zero.
    Y, M, K, S = (jnp.asarray(a) for a in CASES["random"])
    bad_k = K - 10.0 * jnp.eye(D)
    m_cross, m_new = M[:2], jnp.diagonal(M)[:2]
    derivatives = {
        "fwd over rev": jax.hessian(kronlik.loglik, argnums=(0, 2, 3))(Y, M, bad_k, S),
        "rev over rev": jax.jacrev(jax.grad(kronlik.loglik, argnums=(0, 2, 3)), argnums=(0, 2, 3))(Y, M, bad_k, S),
        "solve, rev": jax.jacrev(kronlik.solve, argnums=(0, 2))(Y, M, bad_k, S),
        "grad_sigma, rev": jax.jacrev(kronlik.grad_sigma, argnums=(0, 2))(Y, M, bad_k, S),
        "grad_log_var, rev": jax.jacrev(kronlik.grad_log_var, argnums=(0, 2))(Y, M, bad_k, jnp.zeros(D)),
        "predict, rev": jax.jacrev(
            lambda y, k, c, m: kronlik.predict(y, M, k, S, c, m, include_noise=True), argnums=(0, 1, 2, 3)
        )(Y, bad_k, m_cross, m_new),
    }
    for name, tree in derivatives.items():
        assert all(np.all(np.isnan(x)) for x in jax.tree_util.tree_leaves(tree)), name
