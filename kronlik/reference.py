r"""Dense, obviously-correct references: they build the (TD, TD) matrix U.

These exist to check the structured code against, on small problems: memory is
O(T²D²) and time O(T³D³). ``jax.grad(reference.loglik)`` is the autodiff witness of
the tests and of :func:`kronlik.check_gradients`. Like the structured code they
symmetrise M, K and Σ, so both define the same function of non-symmetric inputs.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

from ._checks import prepare

Array = jax.Array

__all__ = ["dense_covariance", "loglik", "blockdiag_sum", "grad_sigma"]


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


@jax.jit
def _dense_covariance(M: Array, K: Array, Sigma: Array) -> Array:
    eye_t = jnp.eye(M.shape[0], dtype=M.dtype)
    return jnp.kron(_sym(M), _sym(K)) + jnp.kron(eye_t, _sym(Sigma))


def dense_covariance(M: Array, K: Array, Sigma: Array) -> Array:
    """U = M ⊗ K + I_T ⊗ Σ, the (TD, TD) covariance of ``Y.reshape(-1)``."""
    T, D = M.shape[0], K.shape[0]
    _, M, K, Sigma = prepare(jnp.zeros((T, D), jnp.asarray(M).dtype), M, K, Sigma)
    return _dense_covariance(M, K, Sigma)


@jax.jit
def _loglik(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    v = Y.reshape(-1)
    chol = jnp.linalg.cholesky(_dense_covariance(M, K, Sigma))
    white = solve_triangular(chol, v, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (logdet + white @ white + v.shape[0] * math.log(2.0 * math.pi))


def loglik(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    """L = -½ log det U - ½ vᵀU⁻¹v - (TD/2) log 2π via the Cholesky factor of U."""
    return _loglik(*prepare(Y, M, K, Sigma))


@partial(jax.jit, static_argnums=1)
def blockdiag_sum(A: Array, n: int) -> Array:
    """B = Σ_k bldiag(A, k, n): the sum of the n diagonal blocks of A.

    A is (n·m, n·p) and B is (m, p), block k being ``A[k m:(k+1) m, k p:(k+1) p]``. As
    in the original answer, each block is read by index ranges and added into B; no
    vector or stacked copy of the blocks is made.
    """
    if A.ndim != 2 or n < 1 or A.shape[0] % n or A.shape[1] % n:
        raise ValueError(f"blockdiag_sum needs a 2-D A whose sides divide by n={n}; got {A.shape}")
    m, p = A.shape[0] // n, A.shape[1] // n

    def add_block(k, acc):
        return acc + jax.lax.dynamic_slice(A, (k * m, k * p), (m, p))

    return jax.lax.fori_loop(0, n, add_block, jnp.zeros((m, p), A.dtype))


@jax.jit
def _grad_sigma(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    T = Y.shape[0]
    v = Y.reshape(-1)
    chol = jnp.linalg.cholesky(_dense_covariance(M, K, Sigma))
    u_inv = cho_solve((chol, True), jnp.eye(v.shape[0], dtype=v.dtype))
    w = u_inv @ v
    b = blockdiag_sum(u_inv, T)  # ∂ log det U / ∂Σ
    c = blockdiag_sum(jnp.outer(w, w), T)  # -∂ (vᵀU⁻¹v) / ∂Σ
    return 0.5 * (c - b)


def grad_sigma(Y: Array, M: Array, K: Array, Sigma: Array) -> Array:
    """∂L/∂Σ = ½ (C - B) built literally: B and C are block-diagonal sums of U⁻¹ and U⁻¹vvᵀU⁻¹."""
    return _grad_sigma(*prepare(Y, M, K, Sigma))
