r"""The structured core: one factorisation, one forward kernel, one backward kernel.

Notation: ``Y`` is (T, D), ``v = Y.reshape(-1)``, ``U = M ⊗ K + I_T ⊗ Σ`` (never formed).
The form of M gives M = V diag(λ) Vᵀ (:mod:`kronlik.forms`), with λ = 0 on the complement of
span(V) when V is thin; the noise model gives P with Pᵀ K P = diag(κ), Pᵀ Σ P = diag(ν) and
Pᵀ (αK + Σ) P = I (:mod:`kronlik._noise`). Then (V ⊗ P)ᵀ U (V ⊗ P) = diag(E) with

    E_tj = λ_t κ_j + ν_j = (λ_t/α) ρ_j + ν_j        (a sum of non-negative terms: no cancellation)

and on the complement E = ν. With Z = Vᵀ Y P, A = Z / E, and R = W P for W = unvec(U⁻¹v)
(R = V A + Y_⊥ P / ν, Y_⊥ the part of Y outside span(V)):

    log det U = T log det(αK + Σ) + Σ_tj log E_tj + (T - r) Σ_j log ν_j
    vᵀ U⁻¹ v  = Σ Z ⊙ A + Σ Z_⊥ ⊙ A_⊥,     W = R Pᵀ.

Backward. dL = -½ tr(U⁻¹ dU) + ½ wᵀ dU w and U⁻¹ = Σ_tj (v_t ⊗ p_j)(v_t ⊗ p_j)ᵀ / E_tj give,
in the pencil basis (Ŝ, K̂ are D×D; every gradient is P (·) Pᵀ of one of them):

    ∂L/∂Σ = P Ŝ Pᵀ,  Ŝ = ½ (Rᵀ R - diag(b)),          b_j = Σ_t 1/E_tj + (T - r)/ν_j
    ∂L/∂K = P K̂ Pᵀ,  K̂ = ½ (Aᵀ diag(λ) A - diag(c)),  c_j = Σ_t λ_t/E_tj
    ∂L/∂M = ½ (R diag(κ) Rᵀ - V diag(a) Vᵀ - c₀ (I - V Vᵀ)),  a_t = Σ_j κ_j/E_tj, c₀ = Σ_j κ_j/ν_j
    ∂L/∂Y = -W

(Wᵀ W = P Rᵀ R Pᵀ since W = R Pᵀ, and W K Wᵀ = R diag(κ) Rᵀ since Pᵀ K P = diag(κ).)
Only E appears in a denominator, never an eigenvalue gap, so every gradient is exact where
eigenvalues repeat (M = I, Σ = cI, K = 0).
The factorisation itself is never differentiated: :func:`factor` refuses forward and reverse
derivatives with a clear error. Second order (:func:`second_order`, below) is hand-derived in the
same basis, so only a third derivative in M, K or Σ would need one.

Validity: one definition, :class:`Flags`, computed here and explained by :func:`kronlik.validate`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._noise import FullNoise, LogVarNoise, Pencil
from .forms import Basis, MCotangent

Array = jax.Array
Noise = FullNoise | LogVarNoise

_NOT_DIFFERENTIABLE = (
    "kronlik does not differentiate its eigendecompositions (their derivative divides by eigenvalue "
    "gaps: NaN or wrong where eigenvalues repeat). Its hand-derived rules give the first and second "
    "derivatives of loglik, loglik_diag and loglik_diag_rotated, and the first derivatives of solve, "
    "grad_sigma, grad_log_var and predict, in every argument; this derivative needs more: a third or "
    "higher derivative of the likelihood (a second of those helpers) in M, K or the noise, or a "
    "derivative of factorize."
)


class Flags(NamedTuple):
    """Why the likelihood is (or is not) defined: every flag True means it is."""

    finite: Array  # M, K and the noise have finite entries
    m_psd: Array  # M positive semi-definite to round-off
    k_psd: Array  # K positive semi-definite to round-off (measured in the pencil)
    noise_psd: Array  # Σ positive semi-definite to round-off
    s_pd: Array  # αK + Σ positive definite
    u_pd: Array  # no E_tj is round-off (ν_j, or λ_t and ρ_j, resolved from 0): U numerically PD

    def all(self) -> Array:
        return self.finite & self.m_psd & self.k_psd & self.noise_psd & self.s_pd & self.u_pd


class Factors(NamedTuple):
    """The factorisation of U: M's basis, the pencil of (K, Σ), and E."""

    basis: Basis
    pencil: Pencil
    alpha: Array  # () the balance α = mean eigenvalue of M
    e: Array  # (r, D) E_tj = λ_t κ_j + ν_j
    inv_e: Array  # (r, D)
    flags: Flags

    def num_complement(self) -> int:
        return self.basis.num_complement()


def _all_finite(tree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _factor(form, K: Array, noise: Noise, eigh_dtype=None) -> Factors:
    basis = form.eigenbasis(eigh_dtype)
    n_perp = basis.num_complement()
    lam = basis.lam
    T = lam.shape[0] + n_perp
    # α balances M against K: the mean eigenvalue (zeros on the complement included), computed
    # relative to the largest so that it does not overflow; 1 when M = 0 (K then plays no role).
    lam_max = jnp.max(lam)
    alpha = lam_max * (jnp.sum(lam / jnp.where(lam_max > 0, lam_max, 1.0)) / T)
    alpha = jnp.where(alpha > 0, alpha, jnp.ones((), lam.dtype))
    pencil = noise.pencil(K, alpha)
    e = (lam / alpha)[:, None] * pencil.rho[None, :] + pencil.nu[None, :]
    # U is numerically singular where the noise vanishes (ν_j unresolved) and so does M ⊗ K
    # (λ_t or ρ_j unresolved): E_tj is then round-off, and any value computed from it noise.
    resolved = (basis.resolved[:, None] & pencil.rho_resolved[None, :]) | pencil.nu_resolved[None, :]
    u_pd = jnp.all(resolved) & jnp.all(e > 0)
    if n_perp:
        u_pd = u_pd & jnp.all(pencil.nu_resolved)
    finite = _all_finite((form, K, noise))
    flags = Flags(finite, basis.ok, pencil.ok_k, pencil.ok_noise, pencil.ok_s, u_pd)
    return Factors(basis, pencil, alpha, e, 1.0 / e, flags)


def not_differentiable(fn, nondiff_argnums: tuple[int, ...] = (), message: str = _NOT_DIFFERENTIABLE):
    """``fn`` with every derivative (forward or reverse) refused by a ``TypeError(message)``.

    Where no input carries a tangent (e.g. a derivative with respect to Y only), JAX does not
    ask for the rule and ``fn`` is simply evaluated.
    """
    guarded = jax.custom_jvp(fn, nondiff_argnums=nondiff_argnums)

    def refuse(*args):
        raise TypeError(message)

    guarded.defjvp(refuse)
    return guarded


factor = not_differentiable(_factor, nondiff_argnums=(3,))
factor.__doc__ = "factor(form, K, noise, eigh_dtype): M's basis, the pencil of K and Σ, E; never differentiated."


class Solved(NamedTuple):
    """The forward pass: the value and the solve in the eigenbasis."""

    value: Array  # () L, NaN unless ok
    a: Array  # (r, D) A = Z / E
    a_perp: Array | None  # (T, D) Y_⊥ P / ν, or None without a complement
    ok: Array  # () the value is defined: flags all True, Y finite, value finite


def log_det(f: Factors, T: int) -> Array:
    """log det U = T log det(αK + Σ) + Σ_tj log E_tj + (T - r) Σ_j log ν_j."""
    logdet = T * f.pencil.logdet_s + jnp.sum(jnp.log(f.e))
    if f.num_complement():
        logdet = logdet + f.num_complement() * jnp.sum(jnp.log(f.pencil.nu))
    return logdet


def forward(Y: Array, f: Factors) -> Solved:
    """L = -½ (log det U + vᵀU⁻¹v + TD log 2π) from the factors: O(TD(r + D)) after rotation."""
    T, D = Y.shape
    p, nu = f.pencil.p, f.pencil.nu
    y_rot = f.basis.rotate(Y)
    z = y_rot @ p
    a = z * f.inv_e
    logdet = log_det(f, T)
    quad = jnp.sum(z * a)
    a_perp = None
    if f.num_complement():
        z_perp = (Y - f.basis.unrotate(y_rot)) @ p  # the part of Y on which M vanishes
        a_perp = z_perp / nu[None, :]
        quad = quad + jnp.sum(z_perp * a_perp)
    value = -0.5 * (logdet + quad + T * D * math.log(2.0 * math.pi))
    ok = f.flags.all() & jnp.all(jnp.isfinite(Y)) & jnp.isfinite(value)
    return Solved(jnp.where(ok, value, jnp.nan), a, a_perp, ok)


class Cotangents(NamedTuple):
    """g times the gradients, in the pieces the forms and noise models map back."""

    y: Array  # (T, D) -g W
    m: MCotangent
    k: Array  # (D, D) g ∂L/∂K
    s_hat: Array  # (D, D) g Ŝ: the noise model maps it to its own cotangent
    w: Array  # (T, D) W = unvec(U⁻¹ v)


def solve_in_pencil_basis(f: Factors, s: Solved) -> Array:
    """R = W P = V A + Y_⊥ P / ν, shape (T, D)."""
    r = f.basis.unrotate(s.a)
    return r if s.a_perp is None else r + s.a_perp


class DataTerms(NamedTuple):
    """n more terms q_k q_kᵀ added to w wᵀ in dL = ½ tr((w wᵀ - U⁻¹ + Σ_k q_k q_kᵀ) dU).

    Each q_k is given like W: its A = Vᵀ unvec(q_k) P and its complement part (missing entries,
    :mod:`kronlik._missing`, add such terms).
    """

    a: Array  # (n, r, D)
    a_perp: Array | None  # (n, T, D)
    r: Array  # (n, T, D) unvec(q_k) P


class PencilColumnTerms(NamedTuple):
    """Data terms that each live on one column of the pencil basis: n·D terms held in n arrays.

    Term (k, j) is column j of ``a[k]`` (and of ``a_perp[k]``, ``r[k]``) with the other columns
    zero, so Σ_terms AᵀA and AᵀΛA are diagonal; R diag(κ) Rᵀ sums over columns anyway, so the
    form's cotangent takes ``r`` and ``a`` as they are. GLS with the trait design I_D gives such
    terms (:func:`kronlik._gls.profile`): D·c terms in c·T·D numbers.
    """

    a: Array  # (n, r, D)
    a_perp: Array | None  # (n, T, D)
    r: Array  # (n, T, D)


def backward(f: Factors, s: Solved, g: Array, extra: DataTerms | PencilColumnTerms | None = None) -> Cotangents:
    """The hand-derived cotangents of L (module docstring); NaN everywhere unless ``s.ok``."""
    g = jnp.where(s.ok, g, jnp.nan)  # never a finite gradient of a NaN value
    p, lam, kappa, nu = f.pencil.p, f.basis.lam, f.pencil.kappa, f.pencil.nu
    r = solve_in_pencil_basis(f, s)
    b = jnp.sum(f.inv_e, axis=0)
    rtr = s.a.T @ s.a
    lam_gram = s.a.T @ (lam[:, None] * s.a)
    c0 = jnp.zeros((), lam.dtype)
    if f.num_complement():
        b = b + f.num_complement() / nu
        rtr = rtr + s.a_perp.T @ s.a_perp
        c0 = jnp.sum(kappa / nu)
    r_all, a_all, kappa_all = r, s.a, kappa
    if extra is not None:
        n, T, D = extra.r.shape
        if isinstance(extra, PencilColumnTerms):
            sq_sum = jnp.einsum("nrj,nrj->j", extra.a, extra.a)
            if extra.a_perp is not None:
                sq_sum = sq_sum + jnp.einsum("ntj,ntj->j", extra.a_perp, extra.a_perp)
            rtr = rtr + jnp.diag(sq_sum)
            lam_gram = lam_gram + jnp.diag(jnp.einsum("nrj,r,nrj->j", extra.a, lam, extra.a))
        else:
            rtr = rtr + jnp.einsum("nrj,nrk->jk", extra.a, extra.a)
            if extra.a_perp is not None:
                rtr = rtr + jnp.einsum("ntj,ntk->jk", extra.a_perp, extra.a_perp)
            lam_gram = lam_gram + jnp.einsum("nrj,r,nrk->jk", extra.a, lam, extra.a)
        # Every form uses R and A only through R diag(κ) Rᵀ and A diag(κ) Aᵀ: side by side.
        r_all = jnp.concatenate([r, jnp.transpose(extra.r, (1, 0, 2)).reshape(T, n * D)], axis=1)
        a_all = jnp.concatenate([s.a, jnp.transpose(extra.a, (1, 0, 2)).reshape(-1, n * D)], axis=1)
        kappa_all = jnp.tile(kappa, n + 1)
    c = lam @ f.inv_e
    k_hat = 0.5 * (lam_gram - jnp.diag(c))
    s_hat = 0.5 * (rtr - jnp.diag(b))
    k_cot = p @ (0.5 * (k_hat + k_hat.T)) @ p.T
    w = r @ p.T
    m = MCotangent(r_all, a_all, kappa_all, f.inv_e @ kappa, c0, 0.5 * g)
    return Cotangents(-g * w, m, g * 0.5 * (k_cot + k_cot.T), g * 0.5 * (s_hat + s_hat.T), w)


def nan_unless(ok: Array, x: Array) -> Array:
    """x where ok, NaN elsewhere: the helpers' way to never return a finite number for bad input."""
    return jnp.where(ok, x, jnp.nan)


def nan_unless_linear(ok: Array, tangent: Array) -> Array:
    """``nan_unless`` for a tangent, kept linear: tangent · (1 or NaN).

    ``where(ok, t, nan)`` would transpose to a zero cotangent where not ok (the NaN branch is a
    constant), so reverse mode through a jvp rule would return finite zeros for bad input.
    """
    return tangent * jnp.where(ok, 1.0, jnp.nan).astype(tangent.dtype)


def noise_weights(f: Factors) -> tuple[Array, Array, Array, Array]:
    """h = 1/E (r, D), and the D×D weights Ω₀, Ω₁, Ω₂ = hᵀ diag(λᵖ) h (complement in Ω₀).

    (Ω_p)_jk = tr(f_j Mᵖ f_k) for f_j = (κ_j M + ν_j I)⁻¹, the j-th block of U⁻¹ in the basis I ⊗ P.
    """
    h, lam, nu = f.inv_e, f.basis.lam, f.pencil.nu
    omega0 = h.T @ h
    if f.num_complement():
        inv_nu = 1.0 / nu
        omega0 = omega0 + f.num_complement() * jnp.outer(inv_nu, inv_nu)
    return h, omega0, h.T @ (lam[:, None] * h), h.T @ ((lam * lam)[:, None] * h)


# ---------------------------------------------------------------------------------------------
# Second order. In the basis I ⊗ P, U = M ⊗ diag(κ) + I ⊗ diag(ν) splits into D blocks
# U_j = κ_j M + ν_j I with inverses f_j = V diag(1/E_·j) Vᵀ + Π/ν_j (Π = I - VVᵀ), and a
# direction (dY, dM, dK, dΣ) moves it by dU_jk = δ_jk κ_j dM + K̃_jk M + S̃_jk I (K̃ = PᵀdKP,
# S̃ = PᵀdΣP). The gradients are ∂L/∂Y = -R Pᵀ, ∂L/∂Σ = P Ŝ Pᵀ, ∂L/∂K = P K̂ Pᵀ and
# ∂L/∂M = ½ (R diag(κ) Rᵀ - Σ_j κ_j f_j) (module docstring), so with dR = F (dY P - dU R),
#
#   dŜ = ½ (dRᵀR + RᵀdR + [tr(f_j dU_jk f_k)]_jk)
#   dK̂ = ½ (dAᵀΛA + AᵀΛdA + RᵀdM R - diag(tr(f_j dM)) + [tr(M f_j dU_jk f_k)]_jk)
#   d∂L/∂M = ½ (dR κ Rᵀ + R κ dRᵀ + R K̃ Rᵀ - Σ_j K̃_jj f_j + Σ_j κ_j f_j dU_jj f_j),
#
# every trace a sum over t of products of 1/E (noise_weights): the only denominators are E and
# ν, never an eigenvalue gap, so the second derivatives are exact where eigenvalues repeat. The
# form of M and the noise model then add the curvature of their parametrisation.
# ---------------------------------------------------------------------------------------------


class Direction(NamedTuple):
    """A direction (dY, dM, dK, dΣ) in the eigenbasis; None where that input does not move."""

    y: Array | None  # (T, D) dY P
    m_r: Array | None  # (T, D) dM R
    m_rot: Array | None  # (r, r) Vᵀ dM V, or its diagonal (T,) when V = I
    m_cross: Array | None  # (T, r) Π dM V, only where V is thin (Π dM Π = 0 is assumed there)
    m_trace_perp: Array | None  # () tr(Π dM), only where V is thin
    k: Array | None  # (D, D) K̃ = Pᵀ dK P
    s: Array | None  # (D, D) S̃ = Pᵀ dΣ P


class MPairing(NamedTuple):
    r"""A symmetric (T, T) matrix G, given by what ⟨G, M'⟩ needs (never formed):

        ⟨G, M'⟩ = Σ left ⊙ (M' right) + Σ x ⊙ (Vᵀ M' V) + c tr(Π M') + Σ cross ⊙ (M' V),

    for x (r, r) (or its diagonal where V = I) and cross (T, r) or None. The gradient in a
    form's arrays of ⟨G, M(arrays)⟩ is that form's cotangent for ∂L/∂M = G.
    """

    left: Array  # (T, D)
    right: Array  # (T, D)
    x: Array
    c: Array | None
    cross: Array | None

    def __call__(self, basis: Basis, form) -> Array:
        value = jnp.sum(self.left * form.matmul(self.right))
        rotated = form.rotated(basis)
        x = self.x if rotated.ndim == self.x.ndim else jnp.diagonal(self.x)
        value = value + jnp.sum(x * rotated)
        if self.c is not None:
            value = value + self.c * (form.trace() - jnp.trace(rotated))
        if self.cross is not None:
            value = value + jnp.sum(self.cross * form.matmul(basis.vectors))
        return value


def m_gradient(f: Factors, r: Array) -> MPairing:
    """∂L/∂M = ½ (R diag(κ) Rᵀ - V diag(a) Vᵀ - c₀ Π) as an :class:`MPairing`; r is R (T, D)."""
    kappa = f.pencil.kappa
    a = f.inv_e @ kappa
    x = -0.5 * (a if f.basis.vectors is None else jnp.diag(a))
    c = -0.5 * jnp.sum(kappa / f.pencil.nu) if f.num_complement() else None
    return MPairing(0.5 * r * kappa[None, :], r, x, c, None)


class SecondOrder(NamedTuple):
    """The tangents of the gradients along a :class:`Direction`, before the forms' curvature."""

    r: Array  # (T, D) dR: the tangent of W is dR Pᵀ
    s_hat: Array  # (D, D) dŜ: of ∂L/∂Σ, P dŜ Pᵀ
    k_hat: Array  # (D, D) dK̂: of ∂L/∂K, P dK̂ Pᵀ
    m: MPairing  # of ∂L/∂M


def _diag_or_zero(x: Array | None, n: int, dtype) -> Array:
    return jnp.zeros((n,), dtype) if x is None else (x if x.ndim == 1 else jnp.diagonal(x))


def solution_tangent(f: Factors, s: Solved, r: Array, d: Direction) -> Array:
    """dR = dW P = F (dY P - dU_P R) for dU_P R = dM R diag(κ) + M R K̃ + R S̃ (T, D); r is R."""
    lam, kappa = f.basis.lam, f.pencil.kappa
    x = jnp.zeros_like(r) if d.y is None else d.y
    if d.m_r is not None:
        x = x - d.m_r * kappa[None, :]
    if d.k is not None:
        x = x - f.basis.unrotate(lam[:, None] * s.a) @ d.k
    if d.s is not None:
        x = x - r @ d.s
    x_rot = f.basis.rotate(x)
    dr = f.basis.unrotate(x_rot * f.inv_e)
    if f.num_complement():
        dr = dr + (x - f.basis.unrotate(x_rot)) / f.pencil.nu[None, :]
    return dr


def second_order(f: Factors, s: Solved, r: Array, d: Direction) -> SecondOrder:
    """The tangents of the hand-derived gradients along ``d`` (the block comment above)."""
    lam, kappa, nu = f.basis.lam, f.pencil.kappa, f.pencil.nu
    h, omega0, omega1, omega2 = noise_weights(f)
    h2, dtype, D = h * h, lam.dtype, kappa.shape[0]
    dr = solution_tangent(f, s, r, d)
    da = f.basis.rotate(dr)
    m_diag = _diag_or_zero(d.m_rot, lam.shape[0], dtype)
    k_diag, s_diag = _diag_or_zero(d.k, D, dtype), _diag_or_zero(d.s, D, dtype)
    tr_perp = jnp.zeros((), dtype) if d.m_trace_perp is None else d.m_trace_perp
    n_perp = f.num_complement()
    inv_nu = 1.0 / nu

    # Each of dŜ, dK̂ is H + Hᵀ for the half H built here (dRᵀR + RᵀdR from ½ dRᵀR, ...).
    s_half = 0.5 * (dr.T @ r) + 0.25 * jnp.diag(kappa * (m_diag @ h2 + tr_perp * inv_nu * inv_nu))
    k_diag_terms = kappa * ((lam * m_diag) @ h2) - m_diag @ h - (tr_perp * inv_nu if n_perp else 0.0)
    k_half = 0.5 * (da.T @ (lam[:, None] * s.a)) + 0.25 * jnp.diag(k_diag_terms)
    if d.m_r is not None:
        k_half = k_half + 0.25 * (r.T @ d.m_r)
    if d.k is not None:
        s_half, k_half = s_half + 0.25 * d.k * omega1, k_half + 0.25 * d.k * omega2
    if d.s is not None:
        s_half, k_half = s_half + 0.25 * d.s * omega0, k_half + 0.25 * d.s * omega1

    # ∂L/∂M: the parts of ½ Σ_j (κ_j f_j dU_jj f_j - K̃_jj f_j) on span(V), on Π, and between them.
    hk = h * kappa[None, :]
    x_diag = 0.5 * (lam * (h2 @ (kappa * k_diag)) + h2 @ (kappa * s_diag) - h @ k_diag)
    if f.basis.vectors is None:
        x = x_diag + (0.0 if d.m_rot is None else 0.5 * d.m_rot * jnp.sum(hk * hk, axis=1))
    else:
        x = jnp.diag(x_diag) + (0.0 if d.m_rot is None else 0.5 * d.m_rot * (hk @ hk.T))
    c = cross = None
    if n_perp:
        c = 0.5 * (jnp.sum(kappa * s_diag * inv_nu * inv_nu) - jnp.sum(k_diag * inv_nu))
        if d.m_cross is not None:
            cross = d.m_cross * (h @ (kappa * kappa * inv_nu))[None, :]
    left = dr * kappa[None, :] + (0.0 if d.k is None else 0.5 * r @ d.k)
    return SecondOrder(dr, s_half + s_half.T, k_half + k_half.T, MPairing(left, r, x, c, cross))
