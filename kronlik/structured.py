r"""The public functions: thin wrappers around the one core (:mod:`kronlik._core`).

``vec(Y) ~ N(0, U)``, ``U = M ⊗ K + I_T ⊗ Σ``, ``Y`` of shape (T, D), ``vec(Y) = Y.reshape(-1)``.
M may be a (T, T) array or any form in :mod:`kronlik.forms` (:class:`~kronlik.EighFactor`,
:class:`~kronlik.LowRank`, :class:`~kronlik.Diagonal`); Σ is a (D, D) array (``loglik``) or
``diag(exp(log_var))`` (``loglik_diag``). One ``jax.custom_vjp`` function, :func:`_loglik`, serves
both: its backward pass is the hand-derived one of the core, and the gradient helpers below are
that backward pass, selected and compiled (jit drops what a helper does not return).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ._checks import as_float_arrays, check_eigh_dtype, prepare, same_dtype
from ._core import backward, factor, forward, nan_unless, not_differentiable, solve_in_pencil_basis
from ._noise import FullNoise, LogVarNoise
from .forms import Dense, Diagonal, EighFactor, LowRank

Array = jax.Array
MForm = Array | EighFactor | LowRank | Diagonal

__all__ = [
    "factorize",
    "loglik",
    "loglik_diag",
    "loglik_diag_rotated",
    "grad_sigma",
    "grad_log_var",
    "solve",
    "predict",
]


# eigh_dtype is a static dtype name or None, never an array.
@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loglik(Y, form, K, noise, eigh_dtype):
    return forward(Y, factor(form, K, noise, eigh_dtype)).value


def _loglik_fwd(Y, form, K, noise, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    return s.value, (form, noise, f, s)


def _loglik_bwd(eigh_dtype, res, g):
    form, noise, f, s = res
    ct = backward(f, s, g)
    return ct.y, form.cotangent(f.basis, ct.m), ct.k, noise.cotangent(f.pencil, ct.s_hat)


_loglik.defvjp(_loglik_fwd, _loglik_bwd)


def loglik(Y: Array, M: MForm, K: Array, Sigma: Array, *, eigh_dtype: str | None = None) -> Array:
    r"""Log-density of ``vec(Y) ~ N(0, M ⊗ K + I_T ⊗ Σ)``, constant included.

    L = -½ log det U - ½ vᵀ U⁻¹ v - (TD/2) log 2π with v = ``Y.reshape(-1)``, in
    O(T³ + D³ + TD(T + D)) time and O(T² + D² + TD) memory, backward stable: K and Σ are
    diagonalised together through αK + Σ, never by whitening with Σ alone.

    Differentiable in all four arguments by reverse mode (``jax.grad``, ``jax.vjp``) through a
    hand-derived backward pass that reuses the forward factorisation (no eigh derivative);
    forward mode is not defined. M, K and Σ are symmetrised, so their gradients are symmetric.

    Args:
      Y: (T, D) observations.
      M: (T, T) PSD covariance across rows, or a form of it: :func:`factorize` (an
        :class:`EighFactor`), :class:`LowRank`, :class:`Diagonal`. The gradient has the same form.
      K: (D, D) PSD covariance across outputs.
      Sigma: (D, D) PSD noise covariance (singular is fine where U stays positive definite).
      eigh_dtype: the dtype in which M is eigendecomposed (None: the inputs' dtype). With float32
        inputs, ``"float64"`` (needs ``jax_enable_x64``) is kronlik's mixed-precision mode: the one
        step whose float32 error is amplified by K/noise in M's small eigenvalues runs in float64,
        the rest in float32 (see README, "Accuracy").

    Returns:
      A scalar of the inputs' dtype; NaN (never a finite number, never -inf) if an input is not
      finite, M, K or Σ has a negative eigenvalue beyond round-off (:func:`kronlik.psd_tolerance`),
      or U is singular. :func:`kronlik.validate` says which.

    Raises:
      ValueError: at trace time, for shapes that do not fit together.
      TypeError: for non-floating inputs or mixed float dtypes.

    >>> import jax.numpy as jnp, kronlik
    >>> T, D = 3, 2
    >>> L = kronlik.loglik(jnp.ones((T, D)), jnp.eye(T), jnp.eye(D), jnp.eye(D))
    >>> bool(jnp.isclose(L, -0.5 * (T * D * jnp.log(2.0) + T * D / 2 + T * D * jnp.log(2 * jnp.pi))))
    True
    """
    return _loglik(*prepare(Y, M, K, Sigma, FullNoise), check_eigh_dtype(eigh_dtype))


def loglik_diag(Y: Array, M: MForm, K: Array, log_var: Array, *, eigh_dtype: str | None = None) -> Array:
    """:func:`loglik` with Σ = diag(exp(log_var)).

    exp(log_var) is never formed on its own (only Σ_dd / (αK_dd + Σ_dd) and logaddexp), so the
    value and gradients are finite for every finite ``log_var`` where U is positive definite: a
    variance of e^800 (overflow) or e^-800 (underflow, a noise-free output) included.

    Args:
      Y: (T, D) observations.
      M: (T, T) PSD covariance across rows, or a form of it (see :func:`loglik`).
      K: (D, D) PSD covariance across outputs.
      log_var: (D,) log noise variances s, Σ = diag(eˢ).
      eigh_dtype: as in :func:`loglik`.

    Returns:
      The scalar log-density; its gradient in ``log_var`` is :func:`grad_log_var`.
    """
    return _loglik(*prepare(Y, M, K, log_var, LogVarNoise), check_eigh_dtype(eigh_dtype))


def loglik_diag_rotated(Y_rot: Array, lam: Array, K: Array, log_var: Array) -> Array:
    """:func:`loglik_diag` for data already rotated by a fixed M's eigenvectors.

    With ``fm = factorize(M)`` and ``Y_rot = fm.vectors.T @ Y`` (done once, O(T²D)),
    ``loglik_diag_rotated(Y_rot, fm.values, K, log_var) == loglik_diag(Y, M, K, log_var)``
    because L is invariant under the orthogonal change of rows Y → QᵀY, M → QᵀMQ = diag(λ).
    Each call then costs O(TD² + D³) instead of O(T³): the idiom for a loop over the noise
    (and K) with M fixed, as in :func:`kronlik.fit_log_var`. The same as
    ``loglik_diag(Y_rot, Diagonal(lam), K, log_var)``; differentiable in all four arguments.

    Args:
      Y_rot: (T, D) rotated observations Q_Mᵀ Y.
      lam: (T,) eigenvalues of M (non-negative; round-off negatives are clipped).
      K: (D, D) PSD covariance across outputs.
      log_var: (D,) log noise variances.
    """
    return _loglik(*prepare(Y_rot, Diagonal(lam), K, log_var, LogVarNoise, y_name="Y_rot"), None)


@partial(jax.jit, static_argnums=4)
def _gradients(Y, form, K, noise, eigh_dtype):
    # The hand-derived backward pass; under jit only what a caller returns is computed.
    return jax.grad(_loglik, argnums=(0, 1, 2, 3))(Y, form, K, noise, eigh_dtype)


def grad_sigma(Y: Array, M: MForm, K: Array, Sigma: Array, *, eigh_dtype: str | None = None) -> Array:
    """∂L/∂Σ = ½ (C - B), the (D, D) gradient of :func:`loglik` in Σ.

    B = Σ_k bldiag(U⁻¹, k) is the sum of the T diagonal D×D blocks of U⁻¹ and C = Wᵀ W with
    W = unvec(U⁻¹ v) of shape (T, D); in the pencil basis P (Pᵀ K P, Pᵀ Σ P diagonal),
    ½ (C - B) = P ½ (Rᵀ R - diag(Σ_t 1/E_t·)) Pᵀ with R = W P, never U⁻¹. Equal to
    ``jax.grad(loglik, argnums=3)``; NaN where :func:`loglik` is NaN.
    """
    return _gradients(*prepare(Y, M, K, Sigma, FullNoise), check_eigh_dtype(eigh_dtype))[3].sigma


def grad_log_var(Y: Array, M: MForm, K: Array, log_var: Array, *, eigh_dtype: str | None = None) -> Array:
    """∂L/∂s = eˢ ⊙ diag(∂L/∂Σ) for Σ = diag(eˢ), shape (D,).

    The Hadamard product with the diagonal only: eˢ ⊙ diag(P Ŝ Pᵀ) = w ⊙ diag(P̃ Ŝ P̃ᵀ) with
    w_d = eˢᵈ / (αK_dd + eˢᵈ) ≤ 1 and P̃ the Jacobi-scaled pencil basis, so no D×D gradient and
    no eˢ is formed, and the result is finite for every finite ``log_var``. Equal to
    ``jax.grad(loglik_diag, argnums=3)``.
    """
    return _gradients(*prepare(Y, M, K, log_var, LogVarNoise), check_eigh_dtype(eigh_dtype))[3].log_var


def solve(Y: Array, M: MForm, K: Array, Sigma: Array, *, eigh_dtype: str | None = None) -> Array:
    """W = unvec(U⁻¹ vec(Y)), shape (T, D): the solve behind every gradient (∂L/∂Y = -W).

    Linear in Y (and differentiable in Y); its derivative in M, K or Σ is not available yet.
    """
    return -_gradients(*prepare(Y, M, K, Sigma, FullNoise), check_eigh_dtype(eigh_dtype))[0]


_eigenbasis = not_differentiable(lambda m, eigh_dtype: Dense(m).eigenbasis(eigh_dtype), nondiff_argnums=(1,))


def factorize(M: Array, *, eigh_dtype: str | None = None) -> EighFactor:
    """Eigendecompose a fixed (T, T) PSD M once, for reuse by every kronlik function.

    Every function that takes M accepts the returned :class:`EighFactor` instead and then skips
    the O(T³) ``eigh``; its values are NaN when M is not PSD to round-off, so the likelihood is
    NaN as it would be for M itself. ``eigh_dtype="float64"`` computes it in float64 and rounds
    it to M's dtype: the mixed-precision mode for a float32 M (see :func:`loglik`).

    >>> import jax.numpy as jnp, kronlik
    >>> Y, M, K, s = jnp.ones((4, 2)), 2.0 * jnp.eye(4), jnp.eye(2), jnp.zeros(2)
    >>> fm = kronlik.factorize(M)
    >>> bool(jnp.isclose(kronlik.loglik_diag(Y, fm, K, s), kronlik.loglik_diag(Y, M, K, s)))
    True
    """
    (M,) = as_float_arrays(("M",), (M,))
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square 2-D array; got shape {M.shape}")
    basis = _eigenbasis(M, check_eigh_dtype(eigh_dtype))
    return EighFactor(basis.vectors, nan_unless(basis.ok, basis.lam))


def predict(
    Y: Array,
    M: Array | EighFactor,
    K: Array,
    Sigma: Array,
    M_cross: Array,
    m_new_diag: Array,
    *,
    include_noise: bool = False,
    eigh_dtype: str | None = None,
) -> tuple[Array, Array]:
    r"""Posterior predictive of the multi-output GP at N new rows: mean and marginal variances.

    The latent F (T, D) has vec(F) ~ N(0, M ⊗ K) and Y = F + noise with rows ~ N(0, Σ).
    For new rows with cross-covariance ``M_cross`` (N, T) to the training rows and prior
    variances ``m_new_diag`` (N,) = diag(M_new):

    * mean = M_cross W K, with W = unvec(U⁻¹ vec(Y));
    * var[n, d] = m_new[n] K_dd - Σ_tj ((M_cross V)[n, t] (K P)[d, j])² / E_tj, plus Σ_dd if
      ``include_noise`` (the predictive of a new observation rather than of F).

    Cost O(N T² + N T D + N D² + T D (T + D)) after the factorisation; no TD×TD matrix.
    M may be any form (for a :class:`LowRank` M the part of ``M_cross`` outside span(G)
    enters with E = ν). Differentiable in ``M_cross`` and ``m_new_diag``; its derivative in
    Y, M, K or Σ is not available yet.

    Returns:
      (mean, var), both (N, D); NaN where :func:`loglik` would be NaN.
    """
    Y, form, K, noise = prepare(Y, M, K, Sigma, FullNoise)
    M_cross, m_new_diag = same_dtype("M_cross", M_cross, Y), same_dtype("m_new_diag", m_new_diag, Y)
    if M_cross.ndim != 2 or M_cross.shape[1] != Y.shape[0] or m_new_diag.shape != M_cross.shape[:1]:
        raise ValueError(
            f"M_cross must be (N, T) with T = {Y.shape[0]} and m_new_diag (N,); "
            f"got {M_cross.shape} and {m_new_diag.shape}"
        )
    f = factor(form, K, noise, check_eigh_dtype(eigh_dtype))
    s = forward(Y, f)
    p = f.pencil.p
    k_sym = 0.5 * (K + K.T)
    mean = M_cross @ ((solve_in_pencil_basis(f, s) @ p.T) @ k_sym)
    cross = f.basis.rotate(M_cross.T).T  # (N, r) = M_cross V
    kp2 = (k_sym @ p) ** 2  # (D, D)
    var = m_new_diag[:, None] * jnp.diagonal(k_sym)[None, :] - (cross * cross) @ f.inv_e @ kp2.T
    if f.num_complement():
        outside = M_cross - f.basis.unrotate(cross.T).T  # the part of M_cross where M vanishes
        var = var - jnp.sum(outside * outside, axis=1)[:, None] * (kp2 @ (1.0 / f.pencil.nu))[None, :]
    if include_noise:
        var = var + noise.diagonal()[None, :]
    return nan_unless(s.ok, mean), nan_unless(s.ok, var)
