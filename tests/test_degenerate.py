"""Repeated, nearly repeated and zero eigenvalues: where jax.grad through eigh breaks, kronlik must not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel

import kronlik
from kronlik import reference

ALL = (0, 1, 2, 3)


def _orthogonal(rng, n):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def _spectrum(rng, eigenvalues):
    q = _orthogonal(rng, len(eigenvalues))
    return (q * np.asarray(eigenvalues)) @ q.T


def _degenerate_cases(rng):
    T, D = 6, 4
    Y = rng.standard_normal((T, D))
    G = rng.standard_normal((T, 2))
    spd = _spectrum(rng, [0.5, 1.0, 1.5, 2.0])
    return {
        "M=I, K=cI, Sigma=cI": (Y, np.eye(T), 0.7 * np.eye(D), 0.7 * np.eye(D)),
        "M=I, Sigma=cI": (Y, np.eye(T), spd, 0.3 * np.eye(D)),
        "low-rank M": (Y, G @ G.T, spd, np.diag([0.2, 0.4, 0.4, 1.0])),
        "K=0": (Y, _spectrum(rng, np.linspace(0.5, 2, T)), np.zeros((D, D)), spd),
        "M=0": (Y, np.zeros((T, T)), spd, spd),
        "low-rank M and K": (Y, G @ G.T, np.outer(Y[0], Y[0]), 0.5 * np.eye(D)),
    }


@pytest.mark.parametrize("case", list(_degenerate_cases(np.random.default_rng(0))))
def test_degenerate_spectra_finite_and_correct(case):
    args = tuple(jnp.asarray(a) for a in _degenerate_cases(np.random.default_rng(0))[case])
    value, grads = jax.value_and_grad(kronlik.loglik, argnums=ALL)(*args)
    ref_value, ref_grads = jax.value_and_grad(reference.loglik, argnums=ALL)(*args)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    assert max_rel(value, ref_value) < 1e-10
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 1e-10

    # the same through the diagonal-noise entry points where Sigma is diagonal
    Y, M, K, Sigma = args
    if np.count_nonzero(Sigma - jnp.diag(jnp.diagonal(Sigma))) == 0:
        log_var = jnp.log(jnp.diagonal(Sigma))
        value_d, grads_d = jax.value_and_grad(kronlik.loglik_diag, argnums=ALL)(Y, M, K, log_var)
        assert max_rel(value_d, ref_value) < 1e-10
        for g, r in zip(grads_d[:3], ref_grads[:3]):
            assert max_rel(g, r) < 1e-10
        expected = jnp.diagonal(ref_grads[3]) * jnp.exp(log_var)
        assert max_rel(grads_d[3], expected) < 1e-10
        assert max_rel(kronlik.grad_log_var(Y, M, K, log_var), expected) < 1e-10


@pytest.mark.slow
def test_float32_degenerate_is_finite():
    case = _degenerate_cases(np.random.default_rng(0))["M=I, K=cI, Sigma=cI"]
    Y, M, K, Sigma = (jnp.asarray(a, jnp.float32) for a in case)
    grads = jax.grad(kronlik.loglik, argnums=ALL)(Y, M, K, Sigma)
    assert all(np.all(np.isfinite(g)) for g in grads)
    g_s = kronlik.grad_log_var(Y, M, K, jnp.log(jnp.diagonal(Sigma)))
    assert np.all(np.isfinite(g_s))


@pytest.mark.parametrize("gap", [1e-10, 1e-12])
def test_near_degenerate_spectra(rng, gap):
    # Clusters of eigenvalues 1e-10 apart in M and in the whitened K̃ (Σ = cI): an eigh
    # derivative would divide by the gaps; the structured backward pass never does.
    T, D = 8, 5
    M = _spectrum(rng, [1.0 + k * gap for k in range(4)] + [2.0 + k * gap for k in range(4)])
    K = _spectrum(rng, [0.5 + k * gap for k in range(D)])
    Sigma = 0.25 * np.eye(D)
    args = tuple(jnp.asarray(a) for a in (rng.standard_normal((T, D)), M, K, Sigma))
    grads = jax.grad(kronlik.loglik, argnums=ALL)(*args)
    ref_grads = jax.grad(reference.loglik, argnums=ALL)(*args)
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 1e-8
    log_var = jnp.log(jnp.diagonal(args[3]))
    g_s = kronlik.grad_log_var(*args[:3], log_var)
    assert max_rel(g_s, jnp.diagonal(ref_grads[3]) * jnp.exp(log_var)) < 1e-8


def test_roundoff_negative_eigenvalues_are_clipped(rng):
    # A kernel matrix that is numerically indefinite by ~1e-12 is treated
    # as the PSD matrix it should be: finite, equal to the clipped M, validate accepts.
    T, D = 7, 3
    q = _orthogonal(rng, T)
    lam = np.array([-2e-15, 0.0, 1e-3, 0.5, 1.0, 2.0, 3.0])  # round-off: within 10·sqrt(7)·eps·3
    M = (q * lam) @ q.T
    M_clipped = (q * np.maximum(lam, 0)) @ q.T
    Y, K, Sigma = rng.standard_normal((T, D)), np.eye(D), 0.5 * np.eye(D)
    value, grads = jax.value_and_grad(kronlik.loglik, argnums=ALL)(Y, M, K, Sigma)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    assert max_rel(value, kronlik.loglik(Y, M_clipped, K, Sigma)) < 1e-12
    assert max_rel(value, reference.loglik(Y, M, K, Sigma)) < 1e-12
    kronlik.validate(Y, M, K, Sigma)
    # same for K, through the diagonal path
    q3 = _orthogonal(rng, D)
    K_round = (q3 * np.array([-1e-15, 1.0, 2.0])) @ q3.T
    assert np.isfinite(kronlik.loglik_diag(Y, M_clipped, K_round, jnp.zeros(D)))
    kronlik.validate(Y, M_clipped, K_round, log_var=jnp.zeros(D))
