r"""The pencil of (K, Σ) with a state-space M: value, gradients, solve and predictions in O(T).

The same pencil as the eigenbasis core (:mod:`kronlik._noise`): Pᵀ K P = diag(κ),
Pᵀ Σ P = diag(ν), Pᵀ (αK + Σ) P = I with α = k(0) (M's mean eigenvalue). Then with Z = Y P
(rows sorted by time) and C_j = κ_j M + ν_j I,

    L = Σ_j ℓ_j - (T/2) log det(αK + Σ),   ℓ_j = log N(z_j; 0, C_j)   (Kalman filter),

and, with R = W P = [C_j⁻¹ z_j]_j (the reverse pass gives it as -∂ℓ_j/∂z_j), the core's
gradients read in the pencil basis

    ∂L/∂Σ = P Ŝ Pᵀ,  Ŝ_jk = ½ r_jᵀ r_k (j ≠ k),  Ŝ_jj = ∂ℓ_j/∂ν_j = ½ (r_jᵀ r_j - tr C_j⁻¹)
    ∂L/∂K = P K̂ Pᵀ,  K̂_jk = ½ r_jᵀ M r_k (j ≠ k),  K̂_jj = ∂ℓ_j/∂κ_j = ½ (r_jᵀ M r_j - tr C_j⁻¹ M)
    ∂L/∂Y = -W = -R Pᵀ,   ∂L/∂θ = Σ_j ∂ℓ_j/∂θ  (θ: kernel parameters and times, P held fixed)

The diagonals come from the reverse recursion (:mod:`kronlik._kalman`) directly, so no trace is
formed as a difference. L does not depend on α (it only balances K against Σ), so α is taken as
a constant: the gradient in θ needs no derivative of the pencil. Second derivatives in every
argument hold P fixed as well (:func:`gradient_tangents`); the pencil itself is never
differentiated (a third derivative in K or the noise raises ``TypeError``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._core import nan_unless, nan_unless_linear, not_differentiable
from ._kalman import Filtered, kalman_filter, kalman_reverse, matmul, matmul_sorted, pair_traces, recursions_of
from .forms import resolution
from .statespace import Generators, StateSpace, generators

Array = jax.Array

_PENCIL_ORDER = (
    "with a StateSpace M, kronlik's hand-derived rules give the first and second derivatives "
    "(Hessian-vector products) of loglik, loglik_diag and solve in every argument; a third derivative "
    "in K or the noise needs the derivative of the pencil's eigendecomposition, which kronlik does not "
    "take (use an eigenbasis form, e.g. M.dense(), for those at small T)"
)


def _finite(tree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _pencil_impl(K, noise, alpha):
    return noise.pencil(K, alpha)


_pencil = not_differentiable(_pencil_impl, message=_PENCIL_ORDER)


def _in_form_recursions(fn):
    """Trace ``fn``'s Kalman recursions as its form (the second argument, or primals[1]) says."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        form = args[1] if not isinstance(args[0], tuple) else args[0][1]
        with recursions_of(form):
            return fn(*args, **kwargs)

    return traced


class SSFactors(NamedTuple):
    g: Generators
    pencil: object
    ok: Array  # () inputs valid: K, Σ PSD, αK + Σ PD, kernel parameters valid, all finite
    # (Ā, Q̄) ↦ (∂/∂times, ∂/∂kernel) through the generators, if asked for (with_pull)
    pull: object = None


def generators_and_pull(form: StateSpace, with_pull: bool) -> tuple[Generators, object]:
    """The generators and, if asked for, their VJP (Ā, Q̄) ↦ (∂/∂times, ∂/∂kernel) from one evaluation
    (not twice, as a later ``jax.vjp`` would)."""
    if not with_pull:
        return form.generators(), None

    def both(t, k):
        gg = generators(t, k)
        return (gg.a, gg.q), gg

    _, pull, g = jax.vjp(both, form.times, form.kernel, has_aux=True)
    return g, pull


def ss_factor(form: StateSpace, K: Array, noise, with_pull: bool = False) -> SSFactors:
    g, pull = generators_and_pull(form, with_pull)
    alpha = jax.lax.stop_gradient(form.variance())
    alpha = jnp.where(alpha > 0, alpha, jnp.ones((), alpha.dtype))
    pencil = _pencil(K, noise, alpha)
    ok = pencil.ok_k & pencil.ok_noise & pencil.ok_s & form.valid() & _finite((K, noise))
    return SSFactors(g, pencil, ok, pull)


class SSSolved(NamedTuple):
    value: Array  # () L, NaN unless ok
    z: Array  # (T, D) Y P, rows sorted
    filtered: Filtered
    ok: Array


def ss_forward(Y: Array, f: SSFactors, store: bool) -> SSSolved:
    T, D = Y.shape
    z = Y[f.g.order] @ f.pencil.p
    filt = kalman_filter(z, f.g.a, f.g.q, f.g.h, f.pencil.kappa, f.pencil.nu, store)
    value = jnp.sum(filt.loglik) - 0.5 * T * f.pencil.logdet_s
    # U is numerically singular where an innovation variance is round-off relative to its prior
    # variance κ_j k(0) + ν_j (duplicate times with no noise, M ⊗ K and Σ both vanishing there).
    resolved = jnp.all(filt.s_min > resolution(T, Y.dtype))
    ok = f.ok & resolved & jnp.all(jnp.isfinite(Y)) & jnp.isfinite(value)
    return SSSolved(jnp.where(ok, value, jnp.nan), z, filt, ok)


class SSGradients(NamedTuple):
    y: Array  # (T, D) ∂L/∂Y in the user's row order
    form: StateSpace
    k: Array
    noise: object
    r: Array  # (T, D) R = W P, sorted rows


def ss_backward(form: StateSpace, noise, f: SSFactors, s: SSSolved) -> SSGradients:
    nan = jnp.where(s.ok, 1.0, jnp.nan).astype(s.z.dtype)
    return _backward(form, noise, f.g, f.pencil, f.pencil.kappa, f.pencil.nu, s.z, s.filtered, nan, f.pull)


def _backward(form, noise, g: Generators, pencil, kappa, nu, z, filtered, nan, pull=None) -> SSGradients:
    """The reverse pass and the map back (module docstring), κ and ν given apart from the pencil."""
    h = jnp.asarray(g.h, z.dtype)
    rv = kalman_reverse(z, g.a, g.q, h, kappa, nu, filtered, p_inf_h=g.p_inf @ h)
    r = -rv.z
    D = r.shape[1]
    off = ~jnp.eye(D, dtype=bool)
    rr = r.T @ r
    # Rᵀ M R = k(0) RᵀR + RᵀU + UᵀR, U_i = Σ_{k>i} M_ik r_k (the reverse pass's upper part; its
    # sign flips with z̄ = -R, twice)
    ru = rv.z.T @ rv.upper
    s_hat = jnp.where(off, 0.5 * rr, jnp.diag(rv.nu))
    k_hat = jnp.where(off, 0.5 * (h @ g.p_inf @ h) * rr + 0.5 * (ru + ru.T), jnp.diag(rv.kappa))
    p = pencil.p
    k_cot = p @ k_hat @ p.T
    noise_cot = noise.cotangent(pencil, s_hat * nan)
    y_sorted = -(r @ p.T)
    y_cot = jnp.zeros_like(y_sorted).at[g.order].set(y_sorted)
    if pull is None:
        _, pull = jax.vjp(lambda t, k: (lambda gg: (gg.a, gg.q))(generators(t, k)), form.times, form.kernel)
    t_bar, k_bar = pull((rv.a, rv.q))
    form_cot = jax.tree_util.tree_map(lambda x: x * nan, form.like(t_bar, k_bar))
    return SSGradients(y_cot * nan, form_cot, 0.5 * (k_cot + k_cot.T) * nan, noise_cot, r)


@_in_form_recursions
def value(Y, form, K, noise) -> Array:
    return ss_forward(Y, ss_factor(form, K, noise), store=False).value


@_in_form_recursions
def value_and_grads(Y, form, K, noise):
    """(L, (∂L/∂Y, ∂L/∂M as a StateSpace, ∂L/∂K, ∂L/∂noise)): filter, then the reverse pass."""
    f = ss_factor(form, K, noise, with_pull=True)
    s = ss_forward(Y, f, store=True)
    gr = ss_backward(form, noise, f, s)
    return s.value, (gr.y, gr.form, gr.k, gr.noise)


# ---------------------------------------------------------------------------------------------
# Second order in every argument, with the pencil basis P held fixed (no derivative of the
# pencil). In that basis a direction (dY, dθ, dK, dΣ) moves U_P = M ⊗ diag(κ) + I ⊗ diag(ν) by
# dM ⊗ diag(κ) + M ⊗ K̃ + I ⊗ S̃ (K̃ = Pᵀ dK P, S̃ = Pᵀ dΣ P). Split K̃, S̃ into diagonal and off-
# diagonal parts. The diagonal part moves each scalar problem's κ_j, ν_j; with dθ and dY it is
# forward mode through the per-problem rules (filter, reverse pass, map back). The off-diagonal
# part couples the problems; to first order it moves the gradients (as for the eigenbasis core,
# :mod:`kronlik._core`'s second-order block) by
#
#   dR ∋ -F (M R K̃ₒ + R S̃ₒ)         (F = blockdiag C_j⁻¹: as if z moved by -(M R K̃ₒ + R S̃ₒ))
#   dŜ_jk ∋ ½ (K̃ₒ ⊙ Ω₁ + S̃ₒ ⊙ Ω₀)_jk,   dK̂_jk ∋ ½ (K̃ₒ ⊙ Ω₂ + S̃ₒ ⊙ Ω₁)_jk     (j ≠ k)
#   d ∂L/∂M ∋ ½ R K̃ₒ Rᵀ
#
# with Ω_p the pair traces of :func:`kronlik._kalman.pair_traces`. The first line is forward mode
# through the same rules with a tangent on z; the others are added. The noise model's own
# curvature (log-variances) is added by the caller, as for the eigenbasis core.
# ---------------------------------------------------------------------------------------------


@_in_form_recursions
def gradient_tangents(primals, dY, dform, dK, dnoise):
    """(L, the gradients, their tangents along the direction); None where an input does not move."""
    Y, form, K, noise = primals
    f = ss_factor(form, K, noise, with_pull=True)
    s = ss_forward(Y, f, store=True)
    grads = ss_backward(form, noise, f, s)
    p, kappa, nu = f.pencil.p, f.pencil.kappa, f.pencil.nu
    D = p.shape[1]
    dtype = s.z.dtype
    off = ~jnp.eye(D, dtype=bool)
    k_t = jnp.zeros((D, D), dtype) if dK is None else p.T @ (0.5 * (dK + dK.T)) @ p
    s_t = jnp.zeros((D, D), dtype) if dnoise is None else noise.rotated_tangent(f.pencil, dnoise)
    k_off, s_off = jnp.where(off, k_t, 0.0), jnp.where(off, s_t, 0.0)
    r = grads.r
    one = jnp.ones((), dtype)

    def fixed_basis(Y_, form_, kappa_, nu_, shift):
        g = form_.generators()
        z = Y_[g.order] @ p + shift
        filt = kalman_filter(z, g.a, g.q, g.h, kappa_, nu_, True)
        out = _backward(form_, noise, g, f.pencil, kappa_, nu_, z, filt, one)
        return out.y, out.form, out.k, out.noise

    shift_t = -(matmul_sorted(f.g, r) @ k_off + r @ s_off)
    tangents = (
        jnp.zeros_like(Y) if dY is None else dY,
        jax.tree_util.tree_map(jnp.zeros_like, form) if dform is None else dform,
        jnp.diagonal(k_t),
        jnp.diagonal(s_t),
        shift_t,
    )
    _, (y_t, form_t, k_tan, noise_t) = jax.jvp(fixed_basis, (Y, form, kappa, nu, jnp.zeros_like(s.z)), tangents)
    if D > 1 and (dK is not None or dnoise is not None):
        om0, om1, om2 = pair_traces(f.g.a, f.g.q, f.g.h, kappa, nu)
        dk_hat = 0.5 * (k_off * om2 + s_off * om1)
        k_tan = k_tan + p @ dk_hat @ p.T
        noise_t = jax.tree_util.tree_map(jnp.add, noise_t, noise.cotangent(f.pencil, 0.5 * (k_off * om1 + s_off * om0)))
        if dK is not None:
            rk = r @ k_off
            coupled = jax.grad(lambda fm: 0.5 * jnp.sum(rk * matmul_sorted(fm.generators(), r)))(form)
            form_t = jax.tree_util.tree_map(jnp.add, form_t, coupled)
    if dnoise is not None and (curved := noise.curvature(dnoise, grads.noise)) is not None:
        noise_t = jax.tree_util.tree_map(jnp.add, noise_t, curved)
    gated = jax.tree_util.tree_map(lambda t: nan_unless_linear(s.ok, t), (y_t, form_t, k_tan, noise_t))
    return s.value, (grads.y, grads.form, grads.k, grads.noise), gated


def solve_sorted(Y: Array, f: SSFactors) -> tuple[Array, Array]:
    """(W = unvec(U⁻¹ vec(Y)) in the user's row order, ok)."""
    s = ss_forward(Y, f, store=True)
    rv = kalman_reverse(s.z, f.g.a, f.g.q, f.g.h, f.pencil.kappa, f.pencil.nu, s.filtered)
    w = (-rv.z) @ f.pencil.p.T
    return jnp.zeros_like(w).at[f.g.order].set(w), s.ok


@_in_form_recursions
def solve(Y, form, K, noise) -> Array:
    w, ok = solve_sorted(Y, ss_factor(form, K, noise))
    return nan_unless(ok, w)


@_in_form_recursions
def apply_u_tangent(W, form, K, noise, dform, dK, dnoise):
    """dU W = dM W K + M W dK + W dΣ (None tangents skipped), W (T, D)."""
    k_sym = 0.5 * (K + K.T)
    out = jnp.zeros_like(W)
    if dform is not None:
        out = out + jax.jvp(lambda fm: fm.matmul(W @ k_sym), (form,), (dform,))[1]
    if dK is not None:
        out = out + form.matmul(W @ (0.5 * (dK + dK.T)))
    if dnoise is not None:
        out = out + jax.jvp(lambda n: n.apply(W), (noise,), (dnoise,))[1]
    return out


@_in_form_recursions
def predict(Y, form, K, noise, M_cross, m_new_diag):
    """mean = M_× W K, var_nd = m_n K_dd - Σ_j (K P)_dj² x_nᵀ C_j⁻¹ x_n, by N·D more solves."""
    f = ss_factor(form, K, noise)
    w, ok = solve_sorted(Y, f)
    k_sym = 0.5 * (K + K.T)
    mean = M_cross @ (w @ k_sym)
    N, T = M_cross.shape
    D = K.shape[0]
    x = M_cross.T[f.g.order]  # (T, N) sorted
    xs = jnp.repeat(x, D, axis=1)  # column n·D + j: x_n for problem j
    kappa, nu = jnp.tile(f.pencil.kappa, N), jnp.tile(f.pencil.nu, N)
    filt = kalman_filter(xs, f.g.a, f.g.q, f.g.h, kappa, nu, True)
    rv = kalman_reverse(xs, f.g.a, f.g.q, f.g.h, kappa, nu, filt)
    q = jnp.sum(xs * (-rv.z), axis=0).reshape(N, D)  # x_nᵀ C_j⁻¹ x_n
    kp = k_sym @ f.pencil.p
    var = m_new_diag[:, None] * jnp.diagonal(k_sym)[None, :] - q @ (kp * kp).T
    return nan_unless(ok, mean), nan_unless(ok, var)


def log2pi() -> float:
    return math.log(2.0 * math.pi)


__all__ = ["value", "value_and_grads", "solve", "predict", "matmul"]
