r"""The public functions: thin wrappers around the one core (:mod:`kronlik._core`).

``vec(Y) ~ N(0, U)``, ``U = M ⊗ K + I_T ⊗ Σ``, ``Y`` of shape (T, D), ``vec(Y) = Y.reshape(-1)``.
M may be a (T, T) array or any form in :mod:`kronlik.forms` (:class:`~kronlik.EighFactor`,
:class:`~kronlik.LowRank`, :class:`~kronlik.Diagonal`); Σ is a (D, D) array (``loglik``) or
``diag(exp(log_var))`` (``loglik_diag``). One ``jax.custom_jvp`` function, :func:`_loglik`, serves
both: its tangent is Σ ⟨∂L/∂x, dx⟩ with the gradients from the core's backward kernel (so reverse
mode transposes it into exactly that kernel), computed by :func:`_value_and_grads`, whose own
``custom_jvp`` rule is the core's second-order kernel. So ``jax.jvp``, ``jax.grad``,
``jax.hessian``, grad of grad and Hessian-vector products all run on hand-derived rules, and no
eigendecomposition is differentiated. The gradient helpers are that backward kernel, selected
and compiled (jit drops what a helper does not return).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import _statespace_core as ss
from . import _statespace_masked as ss_masked
from ._checks import as_float_arrays, check_eigh_dtype, prepare, same_dtype
from ._core import (
    Direction,
    Factors,
    Solved,
    backward,
    factor,
    forward,
    m_gradient,
    nan_unless,
    nan_unless_linear,
    not_differentiable,
    second_order,
    solution_tangent,
    solve_in_pencil_basis,
)
from ._missing import (
    Missing,
    _concrete,
    extra_terms,
    masked_forward,
    observed_problem,
    predictive_correction,
)
from ._noise import FullNoise, LogVarNoise
from .forms import Dense, Diagonal, EighFactor, LowRank
from .statespace import StateSpace

Array = jax.Array
MForm = Array | EighFactor | LowRank | Diagonal | StateSpace

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


def _is_zero(t) -> bool:
    return isinstance(t, SymbolicZero)


def _moving(primal, tangent):
    """The tangent with JAX's symbolic zeros instantiated, or None if no leaf of it moves."""
    if all(_is_zero(t) for t in jax.tree_util.tree_leaves(tangent, is_leaf=_is_zero)):
        return None
    return jax.tree_util.tree_map(lambda p, t: jnp.zeros_like(p) if _is_zero(t) else t, primal, tangent)


def _pair(grads, tangents) -> Array:
    """Σ ⟨∂L/∂x, dx⟩ over the leaves that move: the tangent of L."""
    pairs = [
        jnp.sum(g * t)
        for g, t in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(tangents, is_leaf=_is_zero))
        if not _is_zero(t)
    ]
    return sum(pairs[1:], pairs[0])


def _gradients_of(form, noise, f: Factors, s: Solved):
    """(∂L/∂Y, ∂L/∂M in M's form, ∂L/∂K, ∂L/∂noise): the backward kernel, mapped back."""
    ct = backward(f, s, jnp.ones((), s.value.dtype))
    return ct.y, form.cotangent(f.basis, ct.m), ct.k, noise.cotangent(f.pencil, ct.s_hat)


def _direction(f: Factors, r: Array, form, noise, dY, dform, dK, dnoise) -> Direction:
    """A direction of (Y, M, K, noise) in the eigenbasis; dM's pieces by forward mode of the form."""
    p = f.pencil.p
    m_r = m_rot = m_cross = m_trace_perp = None
    if dform is not None:
        vectors, thin = f.basis.vectors, f.num_complement() > 0

        def moved(fm):  # polynomial in the form's arrays: its jvp needs no eigh derivative
            out = (fm.matmul(r), fm.rotated(f.basis))
            return out + (fm.matmul(vectors), fm.trace()) if thin else out

        moves = jax.jvp(moved, (form,), (dform,))[1]
        m_r, m_rot = moves[:2]
        if thin:
            m_cross, m_trace_perp = moves[2] - vectors @ m_rot, moves[3] - jnp.trace(m_rot)
    k = None if dK is None else p.T @ (0.5 * (dK + dK.T)) @ p
    noise_dir = None if dnoise is None else noise.rotated_tangent(f.pencil, dnoise)
    return Direction(None if dY is None else dY @ p, m_r, m_rot, m_cross, m_trace_perp, k, noise_dir)


def _gradient_tangents(primals, tangents, f: Factors, s: Solved, r: Array, grads):
    """The tangents of the gradients (Hessian-vector products): the core's second-order kernel
    plus the curvature of M's form (EighFactor, LowRank) and of the noise model (log-variances)."""
    Y, form, K, noise = primals
    dY, dform, dK, dnoise = (_moving(x, t) for x, t in zip(primals, tangents))
    so = second_order(f, s, r, _direction(f, r, form, noise, dY, dform, dK, dnoise))
    p = f.pencil.p
    k_tan = p @ so.k_hat @ p.T
    noise_tan = noise.cotangent(f.pencil, so.s_hat)
    if dnoise is not None and (curved := noise.curvature(dnoise, grads[3])) is not None:
        noise_tan = jax.tree_util.tree_map(jnp.add, noise_tan, curved)
    m_tan = jax.grad(lambda fm: so.m(f.basis, fm))(form)
    if dform is not None and not form.linear:
        first = m_gradient(f, r)
        curved = jax.jvp(jax.grad(lambda fm: first(f.basis, fm)), (form,), (dform,))[1]
        m_tan = jax.tree_util.tree_map(jnp.add, m_tan, curved)
    tans = (-(so.r @ p.T), m_tan, 0.5 * (k_tan + k_tan.T), noise_tan)
    return jax.tree_util.tree_map(lambda t: nan_unless_linear(s.ok, t), tans)


# eigh_dtype is a static dtype name or None, never an array.
@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _value_and_grads(Y, form, K, noise, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    return s.value, _gradients_of(form, noise, f, s)


@partial(_value_and_grads.defjvp, symbolic_zeros=True)
def _value_and_grads_jvp(eigh_dtype, primals, tangents):
    # Called with primals that are not differentiated here; if an outer derivative (a third
    # order) reaches ``factor``, it refuses with a TypeError that says why.
    Y, form, K, noise = primals
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    grads = _gradients_of(form, noise, f, s)
    r = solve_in_pencil_basis(f, s)  # R = W P, shared by every piece of the rule
    return (s.value, grads), (_pair(grads, tangents), _gradient_tangents(primals, tangents, f, s, r, grads))


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _loglik(Y, form, K, noise, eigh_dtype):
    return forward(Y, factor(form, K, noise, eigh_dtype)).value


@partial(_loglik.defjvp, symbolic_zeros=True)
def _loglik_jvp(eigh_dtype, primals, tangents):
    # dL = Σ ⟨∂L/∂x, dx⟩: linear in the tangents, so reverse mode transposes it to the gradients
    # (computed once, by the backward kernel), and differentiating the gradients again goes
    # through _value_and_grads' own rule.
    value, grads = _value_and_grads(*primals, eigh_dtype)
    return value, _pair(grads, tangents)


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _solve(Y, form, K, noise, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    return nan_unless(s.ok, solve_in_pencil_basis(f, s) @ f.pencil.p.T)


@partial(_solve.defjvp, symbolic_zeros=True)
def _solve_jvp(eigh_dtype, primals, tangents):
    Y, form, K, noise = primals
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    r, p = solve_in_pencil_basis(f, s), f.pencil.p
    d = _direction(f, r, form, noise, *(_moving(x, t) for x, t in zip(primals, tangents)))
    return nan_unless(s.ok, r @ p.T), nan_unless_linear(s.ok, solution_tangent(f, s, r, d) @ p.T)


_MASKED_ORDER = (
    "with a mask, kronlik's hand-derived rules give the first derivatives of loglik and loglik_diag "
    "in every argument (and none of solve or predict); this needs a second derivative, which is "
    "not implemented with missing entries yet (without a mask it is)"
)


def _apply_u(form, K, noise):
    """W ↦ unvec(U vec(W)) = M W K + W Σ, from the inputs themselves (for iterative refinement)."""
    k_sym = 0.5 * (K + K.T)
    return lambda W: form.matmul(W @ k_sym) + noise.apply(W)


def _masked_value_and_grads_impl(Y, form, K, noise, miss: Missing, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    ms = masked_forward(Y, f, miss, _apply_u(form, K, noise))
    ct = backward(f, ms.solved, jnp.ones((), Y.dtype), extra_terms(f, ms))
    y = jnp.where(miss.mask, ct.y, jnp.zeros((), Y.dtype))  # missing entries do not enter L
    return ms.solved.value, (y, form.cotangent(f.basis, ct.m), ct.k, noise.cotangent(f.pencil, ct.s_hat))


_masked_value_and_grads = not_differentiable(_masked_value_and_grads_impl, (5,), _MASKED_ORDER)


@partial(jax.custom_jvp, nondiff_argnums=(5,))
def _loglik_masked(Y, form, K, noise, miss, eigh_dtype):
    return masked_forward(Y, factor(form, K, noise, eigh_dtype), miss, _apply_u(form, K, noise)).solved.value


@partial(_loglik_masked.defjvp, symbolic_zeros=True)
def _loglik_masked_jvp(eigh_dtype, primals, tangents):
    value, grads = _masked_value_and_grads(*primals, eigh_dtype)
    return value, _pair(grads, tangents[:4])


def _masked_solve_impl(Y, form, K, noise, miss: Missing, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    s = masked_forward(Y, f, miss, _apply_u(form, K, noise)).solved
    w = solve_in_pencil_basis(f, s) @ f.pencil.p.T
    return nan_unless(s.ok, jnp.where(miss.mask, w, jnp.zeros((), Y.dtype)))


_masked_solve = not_differentiable(_masked_solve_impl, (5,), _MASKED_ORDER.replace("a second", "a derivative"))


# ---------------------------------------------------------------------------------------------
# A StateSpace M: the pencil's D scalar problems solved by Kalman recursions (kronlik._kalman).
# The value's tangent is Σ ⟨∂L/∂x, dx⟩ with the hand-derived gradients, which are plain JAX
# functions of Y and the kernel (P held fixed). Their tangents (second order in every argument)
# are _ss_value_and_grads' rule, P still held fixed; the pencil refuses to be differentiated.
# ---------------------------------------------------------------------------------------------


@jax.custom_jvp
def _ss_value_and_grads(Y, form, K, noise):
    return ss.value_and_grads(Y, form, K, noise)


@partial(_ss_value_and_grads.defjvp, symbolic_zeros=True)
def _ss_value_and_grads_jvp(primals, tangents):
    # The gradients' tangents in the pencil basis held fixed (ss.gradient_tangents); a third
    # derivative in K or the noise reaches the pencil, which refuses with a TypeError.
    moving = [_moving(x, t) for x, t in zip(primals, tangents)]
    value, grads, grad_tangents = ss.gradient_tangents(primals, *moving)
    return (value, grads), (_pair(grads, tangents), grad_tangents)


@jax.custom_jvp
def _ss_loglik(Y, form, K, noise):
    return ss.value(Y, form, K, noise)


@partial(_ss_loglik.defjvp, symbolic_zeros=True)
def _ss_loglik_jvp(primals, tangents):
    value, grads = _ss_value_and_grads(*primals)
    return value, _pair(grads, tangents)


@jax.custom_jvp
def _ss_solve(Y, form, K, noise):
    return ss.solve(Y, form, K, noise)


@partial(_ss_solve.defjvp, symbolic_zeros=True)
def _ss_solve_jvp(primals, tangents):
    # dW = U⁻¹ (dY - dU W), one more solve.
    Y, form, K, noise = primals
    dY, dform, dK, dnoise = (_moving(x, t) for x, t in zip(primals, tangents))
    w = ss.solve(Y, form, K, noise)
    rhs = -ss.apply_u_tangent(w, form, K, noise, dform, dK, dnoise)
    if dY is not None:
        rhs = rhs + dY
    return w, ss.solve(rhs, form, K, noise)


_ss_predict = not_differentiable(
    ss.predict,
    message="predict with a StateSpace M is not differentiable yet (loglik, loglik_diag, solve and the "
    "gradient helpers are)",
)


def _statespace_mask(args, mask, max_missing):
    """A StateSpace M's mask: None where nothing is missing (concrete all True), else the (T, D) bool.

    The joint-state filter's cost does not depend on the number missing, so ``max_missing`` is
    checked but not needed (a traced mask is used as it is).
    """
    if mask is None:
        if max_missing is not None:
            raise ValueError("max_missing is given without a mask")
        return None
    concrete = _concrete(mask)
    mask = jnp.asarray(mask) if concrete is None else concrete
    if mask.dtype != bool:
        raise TypeError(f"mask must be a boolean array (True = observed); got dtype {mask.dtype}")
    if mask.shape != args[0].shape:
        raise ValueError(f"mask must have the shape of Y, {args[0].shape}; got {mask.shape}")
    if max_missing is not None and (not isinstance(max_missing, (int, np.integer)) or max_missing < 0):
        raise ValueError(f"max_missing must be a non-negative int; got {max_missing!r}")
    if concrete is not None and concrete.all():
        return None  # the complete-data pencil path: D scalar filters, cheaper than the joint one
    return jnp.asarray(mask)


# With a mask (kronlik._statespace_masked): first derivatives by the joint filter's hand-derived
# reverse pass; a second derivative raises TypeError.
_ss_masked_value_and_grads = not_differentiable(
    ss_masked.value_and_grads, message=_MASKED_ORDER.replace("without a mask it is", "without a mask it is, in O(T)")
)


@jax.custom_jvp
def _ss_loglik_masked(Y, form, K, noise, mask):
    return ss_masked.value(Y, form, K, noise, mask)


@partial(_ss_loglik_masked.defjvp, symbolic_zeros=True)
def _ss_loglik_masked_jvp(primals, tangents):
    value, grads = _ss_masked_value_and_grads(*primals)
    return value, _pair(grads, tangents[:4])


_ss_masked_solve = not_differentiable(ss_masked.solve, message=_MASKED_ORDER.replace("a second", "a derivative"))
_ss_masked_predict = not_differentiable(ss_masked.predict, message=_MASKED_ORDER.replace("a second", "a derivative"))


def loglik(
    Y: Array,
    M: MForm,
    K: Array,
    Sigma: Array,
    *,
    mask: Array | None = None,
    max_missing: int | None = None,
    eigh_dtype: str | None = None,
) -> Array:
    r"""Log-density of ``vec(Y) ~ N(0, M ⊗ K + I_T ⊗ Σ)``, constant included.

    L = -½ log det U - ½ vᵀ U⁻¹ v - (TD/2) log 2π with v = ``Y.reshape(-1)``, in
    O(T³ + D³ + TD(T + D)) time and O(T² + D² + TD) memory, backward stable: K and Σ are
    diagonalised together through αK + Σ, never by whitening with Σ alone.

    Differentiable twice in all four arguments, in forward and reverse mode (``jax.grad``,
    ``jax.jvp``, ``jax.hessian``, grad of grad, Hessian-vector products) through hand-derived
    rules that reuse the forward factorisation and never differentiate an eigendecomposition, so
    they are exact where eigenvalues repeat; a third derivative in M, K or Σ raises ``TypeError``.
    M, K and Σ are symmetrised, so their gradients are symmetric.

    Args:
      Y: (T, D) observations.
      M: (T, T) PSD covariance across rows, or a form of it: :func:`factorize` (an
        :class:`EighFactor`), :class:`LowRank`, :class:`Diagonal`. The gradient has the same form.
      K: (D, D) PSD covariance across outputs.
      Sigma: (D, D) PSD noise covariance (singular is fine where U stays positive definite).
      mask: optional (T, D) boolean, True where Y is observed: L is then the exact log-density of
        the observed entries, log N(y_o; 0, U_oo), with Y's missing entries ignored (NaN allowed
        there) and their gradient zero. Computed through the complete-data factors and a Schur
        complement over the m missing entries (``kronlik._missing``): O(m T D (T + D) + m² T D + m³)
        more, no TD×TD matrix; first derivatives in every argument (a second raises TypeError).
      max_missing: with a traced mask (inside ``jit`` or ``vmap``), a static bound on the number
        of missing entries (more give NaN); a concrete mask needs none.
      eigh_dtype: the dtype in which M is eigendecomposed (None: the inputs' dtype). With float32
        inputs, ``"float64"`` (needs ``jax_enable_x64``) is kronlik's mixed-precision mode: the one
        step whose float32 error is amplified by K/noise in M's small eigenvalues runs in float64,
        the rest in float32 (see docs/accuracy.md).

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
    return _dispatch(prepare(Y, M, K, Sigma, FullNoise), mask, max_missing, check_eigh_dtype(eigh_dtype))


def _dispatch(args, mask, max_missing, eigh_dtype) -> Array:
    if isinstance(args[1], StateSpace):
        ss_mask = _statespace_mask(args, mask, max_missing)
        return _ss_loglik(*args) if ss_mask is None else _ss_loglik_masked(*args, ss_mask)
    obs = observed_problem(args, mask, max_missing)
    if obs.nothing_observed:
        return jnp.zeros((), args[0].dtype)  # the density of no entries
    if obs.miss is None:
        return _loglik(*obs.args, eigh_dtype)
    if obs.miss.size == 0:  # max_missing=0: the complete-data value, NaN if anything is missing
        return jnp.where(obs.miss.fits, _loglik(*obs.args, eigh_dtype), jnp.nan)
    return _loglik_masked(*obs.args, obs.miss, eigh_dtype)


def loglik_diag(
    Y: Array,
    M: MForm,
    K: Array,
    log_var: Array,
    *,
    mask: Array | None = None,
    max_missing: int | None = None,
    eigh_dtype: str | None = None,
) -> Array:
    """:func:`loglik` with Σ = diag(exp(log_var)).

    exp(log_var) is never formed on its own (only Σ_dd / (αK_dd + Σ_dd) and logaddexp), so the
    value and gradients are finite for every finite ``log_var`` where U is positive definite: a
    variance of e^800 (overflow) or e^-800 (underflow, a noise-free output) included.

    Args:
      Y: (T, D) observations.
      M: (T, T) PSD covariance across rows, or a form of it (see :func:`loglik`).
      K: (D, D) PSD covariance across outputs.
      log_var: (D,) log noise variances s, Σ = diag(eˢ).
      mask, max_missing, eigh_dtype: as in :func:`loglik`.

    Returns:
      The scalar log-density; its gradient in ``log_var`` is :func:`grad_log_var`.
    """
    return _dispatch(prepare(Y, M, K, log_var, LogVarNoise), mask, max_missing, check_eigh_dtype(eigh_dtype))


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


def _predictive(f: Factors, s: Solved, K: Array, M_cross: Array, m_new_diag: Array):
    """(mean, var) of :func:`predict` from the factors, and the pieces their tangents reuse."""
    k_sym = 0.5 * (K + K.T)
    kp = k_sym @ f.pencil.p  # (D, D) K P
    r = solve_in_pencil_basis(f, s)
    w = r @ f.pencil.p.T
    mean = M_cross @ (w @ k_sym)
    cross = f.basis.rotate(M_cross.T).T  # (N, r) = M_cross V
    q = (cross * cross) @ f.inv_e  # (N, D) q_nj = x_nᵀ f_j x_n, x_n = M_cross[n]
    outside = None
    if f.num_complement():
        outside = M_cross - f.basis.unrotate(cross.T).T  # the part of M_cross where M vanishes
        q = q + jnp.sum(outside * outside, axis=1)[:, None] / f.pencil.nu[None, :]
    var = m_new_diag[:, None] * jnp.diagonal(k_sym)[None, :] - q @ (kp * kp).T
    return (nan_unless(s.ok, mean), nan_unless(s.ok, var)), (k_sym, kp, r, w, cross, q, outside)


@partial(jax.custom_jvp, nondiff_argnums=(6,))
def _predict(Y, form, K, noise, M_cross, m_new_diag, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    return _predictive(f, forward(Y, f), K, M_cross, m_new_diag)[0]


@partial(_predict.defjvp, symbolic_zeros=True)
def _predict_jvp(eigh_dtype, primals, tangents):
    r"""mean = M_× W K; var_nd = m_n K_dd - x_ndᵀ U⁻¹ x_nd for x_nd = x_n ⊗ K e_d, so with Ξ = U⁻¹ x_nd
    (block j of it in the basis I ⊗ P is k_dj f_j x_n, k = K P):

        d var_nd = dm_n K_dd + m_n dK_dd - 2 Ξᵀ dx_nd + Ξᵀ dU Ξ,

    Ξᵀ dU Ξ = Σ_j κ_j k_dj² u_njᵀ dM u_nj + Σ_jk k_dj k_dk (K̃_jk u_njᵀ M u_nk + S̃_jk u_njᵀ u_nk),
    u_nj = f_j x_n = V (c_n ⊙ h_·j) + Π x_n / ν_j (c = M_× V, h = 1/E): sums over t of 1/E only.
    """
    Y, form, K, noise, M_cross, m_new_diag = primals
    f = factor(form, K, noise, eigh_dtype)
    s = forward(Y, f)
    (mean, var), (k_sym, kp, r, w, cross, q, outside) = _predictive(f, s, K, M_cross, m_new_diag)
    dY, dform, dK, dnoise, d_cross, d_new = (_moving(x, t) for x, t in zip(primals, tangents))
    d = _direction(f, r, form, noise, dY, dform, dK, dnoise)
    h, lam, kappa, nu = f.inv_e, f.basis.lam, f.pencil.kappa, f.pencil.nu
    d_mean, d_var = jnp.zeros_like(mean), jnp.zeros_like(var)
    if any(x is not None for x in (dY, dform, dK, dnoise)):
        d_mean = d_mean + M_cross @ ((solution_tangent(f, s, r, d) @ f.pencil.p.T) @ k_sym)
    if d_cross is not None:
        d_mean = d_mean + d_cross @ (w @ k_sym)
        dc = f.basis.rotate(d_cross.T).T
        x_f_dx = (cross * dc) @ h  # x_nᵀ f_j dx_n
        if outside is not None:
            x_f_dx = x_f_dx + jnp.sum(outside * d_cross, axis=1)[:, None] / nu[None, :]
        d_var = d_var - 2.0 * x_f_dx @ (kp * kp).T
    if d_new is not None:
        d_var = d_var + d_new[:, None] * jnp.diagonal(k_sym)[None, :]
    if dK is not None:
        dk_sym = 0.5 * (dK + dK.T)
        d_mean = d_mean + M_cross @ (w @ dk_sym)
        d_var = d_var + m_new_diag[:, None] * jnp.diagonal(dk_sym)[None, :] - 2.0 * q @ (kp * (dk_sym @ f.pencil.p)).T
    c2 = cross * cross
    if d.k is not None:  # Σ_jk k_dj k_dk K̃_jk Σ_t λ_t c_nt² h_tj h_tk
        d_var = d_var + (c2 * lam[None, :]) @ jnp.einsum("tj,dj,jk,dk,tk->td", h, kp, d.k, kp, h)
    if d.s is not None:
        d_var = d_var + c2 @ jnp.einsum("tj,dj,jk,dk,tk->td", h, kp, d.s, kp, h)
        if outside is not None:
            kn = kp / nu[None, :]
            d_var = d_var + jnp.sum(outside * outside, axis=1)[:, None] * jnp.sum((kn @ d.s) * kn, axis=1)[None, :]
    if d.m_rot is not None:  # Σ_j κ_j k_dj² u_njᵀ dM u_nj
        u = cross[:, :, None] * h[None, :, :]  # (N, r, D): V-coordinates of u_nj
        if f.basis.vectors is None:
            e = jnp.einsum("ntj,t,ntj->nj", u, d.m_rot, u)
        else:
            e = jnp.einsum("ntj,ts,nsj->nj", u, d.m_rot, u)
        if outside is not None and d.m_cross is not None:  # 2 (c_n ⊙ h_j)ᵀ Vᵀ dM Π x_n / ν_j
            e = e + 2.0 * jnp.einsum("ntj,nt->nj", u, outside @ d.m_cross) / nu[None, :]
        d_var = d_var + (e * kappa[None, :]) @ (kp * kp).T
    return (mean, var), (nan_unless_linear(s.ok, d_mean), nan_unless_linear(s.ok, d_var))


def _masked_predict_impl(Y, form, K, noise, M_cross, m_new_diag, miss, eigh_dtype):
    f = factor(form, K, noise, eigh_dtype)
    ms = masked_forward(Y, f, miss, _apply_u(form, K, noise))
    (_, var), (k_sym, kp, _, w, cross, _, outside) = _predictive(f, ms.solved, K, M_cross, m_new_diag)
    # the mean from W̃ with its missing entries exactly 0 (they hold the Schur formula's round-off)
    mean = nan_unless(ms.solved.ok, M_cross @ (jnp.where(miss.mask, w, jnp.zeros((), w.dtype)) @ k_sym))
    return mean, var + predictive_correction(f, ms, miss, kp, cross, outside)


_masked_predict = not_differentiable(_masked_predict_impl, (7,), _MASKED_ORDER.replace("a second", "a derivative"))


@partial(jax.jit, static_argnums=4)
def _gradients(Y, form, K, noise, eigh_dtype):
    # The hand-derived backward pass; under jit only what a caller returns is computed.
    return _value_and_grads(Y, form, K, noise, eigh_dtype)[1]


@jax.jit
def _ss_gradients(Y, form, K, noise):
    return _ss_value_and_grads(Y, form, K, noise)[1]


def _grads(args, mask, max_missing, eigh_dtype):
    if isinstance(args[1], StateSpace) and _statespace_mask(args, mask, max_missing) is None:
        return _ss_gradients(*args)
    if mask is None and max_missing is None:
        return _gradients(*args, eigh_dtype)
    # With a mask, the gradient of the dispatched likelihood: dropped rows and replaced outputs
    # map back by the derivative of the slicing (zeros there), the rest is the hand-derived rule.
    Y, form, K, noise = args
    grad = jax.grad(lambda n: _dispatch((Y, form, K, n), mask, max_missing, eigh_dtype))(noise)
    return None, None, None, grad


def grad_sigma(
    Y: Array,
    M: MForm,
    K: Array,
    Sigma: Array,
    *,
    mask: Array | None = None,
    max_missing: int | None = None,
    eigh_dtype: str | None = None,
) -> Array:
    """∂L/∂Σ = ½ (C - B), the (D, D) gradient of :func:`loglik` in Σ.

    B = Σ_k bldiag(U⁻¹, k) is the sum of the T diagonal D×D blocks of U⁻¹ and C = Wᵀ W with
    W = unvec(U⁻¹ v) of shape (T, D); in the pencil basis P (Pᵀ K P, Pᵀ Σ P diagonal),
    ½ (C - B) = P ½ (Rᵀ R - diag(Σ_t 1/E_t·)) Pᵀ with R = W P, never U⁻¹. Equal to
    ``jax.grad(loglik, argnums=3)``; NaN where :func:`loglik` is NaN. With a ``mask`` (see
    :func:`loglik`), the gradient of the observed entries' log-density.
    """
    args = prepare(Y, M, K, Sigma, FullNoise)
    return _grads(args, mask, max_missing, check_eigh_dtype(eigh_dtype))[3].sigma


def grad_log_var(
    Y: Array,
    M: MForm,
    K: Array,
    log_var: Array,
    *,
    mask: Array | None = None,
    max_missing: int | None = None,
    eigh_dtype: str | None = None,
) -> Array:
    """∂L/∂s = eˢ ⊙ diag(∂L/∂Σ) for Σ = diag(eˢ), shape (D,).

    The Hadamard product with the diagonal only: eˢ ⊙ diag(P Ŝ Pᵀ) = w ⊙ diag(P̃ Ŝ P̃ᵀ) with
    w_d = eˢᵈ / (αK_dd + eˢᵈ) ≤ 1 and P̃ the Jacobi-scaled pencil basis, so no D×D gradient and
    no eˢ is formed, and the result is finite for every finite ``log_var``. Equal to
    ``jax.grad(loglik_diag, argnums=3)``; with a ``mask``, of the observed entries' log-density.
    """
    args = prepare(Y, M, K, log_var, LogVarNoise)
    return _grads(args, mask, max_missing, check_eigh_dtype(eigh_dtype))[3].log_var


def solve(
    Y: Array,
    M: MForm,
    K: Array,
    Sigma: Array,
    *,
    mask: Array | None = None,
    max_missing: int | None = None,
    eigh_dtype: str | None = None,
) -> Array:
    """W = unvec(U⁻¹ vec(Y)), shape (T, D): the solve behind every gradient (∂L/∂Y = -W).

    Linear in Y. Differentiable once in every argument (forward and reverse mode):
    dW = U⁻¹ (dY - dU W) computed in the eigenbasis, exact where eigenvalues repeat.
    With a ``mask`` (see :func:`loglik`): U_oo⁻¹ y_o on the observed entries and 0 on the
    missing ones (then not differentiable: a derivative raises TypeError).
    """
    args, eigh = prepare(Y, M, K, Sigma, FullNoise), check_eigh_dtype(eigh_dtype)
    if isinstance(args[1], StateSpace):
        ss_mask = _statespace_mask(args, mask, max_missing)
        return _ss_solve(*args) if ss_mask is None else _ss_masked_solve(*args, ss_mask)
    obs = observed_problem(args, mask, max_missing)
    if obs.nothing_observed:
        return jnp.zeros_like(args[0])
    if obs.miss is None:
        w = _solve(*obs.args, eigh)
    elif obs.miss.size == 0:
        w = jnp.where(obs.miss.fits, _solve(*obs.args, eigh), jnp.nan)
    else:
        w = _masked_solve(*obs.args, obs.miss, eigh)
    return w if obs.rows is None else jnp.zeros_like(args[0]).at[obs.rows].set(w)


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
    mask: Array | None = None,
    max_missing: int | None = None,
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
    enters with E = ν). Differentiable once in every argument (forward and reverse mode), by a
    hand-derived rule in the eigenbasis; a derivative of ``var`` in M costs O(N T² D) more.
    With a ``mask`` (see :func:`loglik`), the predictive given the observed entries only:
    mean = M_× W̃ K with W̃ the masked :func:`solve`, and var adds back what the missing entries
    would have explained (O(N m (T D + m)) more; not differentiable).

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
    eigh = check_eigh_dtype(eigh_dtype)
    if isinstance(form, StateSpace):
        ss_mask = _statespace_mask((Y, form, K, noise), mask, max_missing)
        if ss_mask is None:
            mean, var = _ss_predict(Y, form, K, noise, M_cross, m_new_diag)
        else:
            mean, var = _ss_masked_predict(Y, form, K, noise, ss_mask, M_cross, m_new_diag)
        return mean, var + noise.diagonal()[None, :] if include_noise else var
    obs = observed_problem((Y, form, K, noise), mask, max_missing, keep_k=True)
    if obs.nothing_observed:  # the prior
        k_diag = jnp.diagonal(K)
        mean, var = jnp.zeros((M_cross.shape[0], Y.shape[1]), Y.dtype), m_new_diag[:, None] * k_diag[None, :]
    else:
        cross = M_cross if obs.rows is None else M_cross[:, obs.rows]
        if obs.miss is None:
            mean, var = _predict(*obs.args, cross, m_new_diag, eigh)
        elif obs.miss.size == 0:
            mean, var = _predict(*obs.args, cross, m_new_diag, eigh)
            mean, var = (jnp.where(obs.miss.fits, x, jnp.nan) for x in (mean, var))
        else:
            mean, var = _masked_predict(*obs.args, cross, m_new_diag, obs.miss, eigh)
    if include_noise:
        var = var + noise.diagonal()[None, :]
    return mean, var
