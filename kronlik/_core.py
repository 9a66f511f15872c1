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
derivatives with a clear error (the derivatives that would need them are second order).

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
    "gaps: NaN or wrong where eigenvalues repeat). This derivative needs one: a derivative of "
    "kronlik.solve, grad_sigma, grad_log_var, predict or factorize with respect to M, K or the noise, "
    "or a second derivative (jax.hessian, grad of grad, jvp) of the likelihood. Exact second order "
    "is not available yet; first derivatives of loglik and loglik_diag are, in every argument."
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


def not_differentiable(fn, nondiff_argnums: tuple[int, ...] = ()):
    """``fn`` with every derivative (forward or reverse) refused by a ``TypeError`` that says why.

    Where no input carries a tangent (e.g. a derivative with respect to Y only), JAX does not
    ask for the rule and ``fn`` is simply evaluated.
    """
    guarded = jax.custom_jvp(fn, nondiff_argnums=nondiff_argnums)

    def refuse(*args):
        raise TypeError(_NOT_DIFFERENTIABLE)

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


def forward(Y: Array, f: Factors) -> Solved:
    """L = -½ (log det U + vᵀU⁻¹v + TD log 2π) from the factors: O(TD(r + D)) after rotation."""
    T, D = Y.shape
    p, nu = f.pencil.p, f.pencil.nu
    y_rot = f.basis.rotate(Y)
    z = y_rot @ p
    a = z * f.inv_e
    logdet = T * f.pencil.logdet_s + jnp.sum(jnp.log(f.e))
    quad = jnp.sum(z * a)
    a_perp = None
    if f.num_complement():
        z_perp = (Y - f.basis.unrotate(y_rot)) @ p  # the part of Y on which M vanishes
        a_perp = z_perp / nu[None, :]
        logdet = logdet + f.num_complement() * jnp.sum(jnp.log(nu))
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


def backward(f: Factors, s: Solved, g: Array) -> Cotangents:
    """The hand-derived cotangents of L (module docstring); NaN everywhere unless ``s.ok``."""
    g = jnp.where(s.ok, g, jnp.nan)  # never a finite gradient of a NaN value
    p, lam, kappa, nu = f.pencil.p, f.basis.lam, f.pencil.kappa, f.pencil.nu
    r = solve_in_pencil_basis(f, s)
    b = jnp.sum(f.inv_e, axis=0)
    rtr = s.a.T @ s.a
    c0 = jnp.zeros((), lam.dtype)
    if f.num_complement():
        b = b + f.num_complement() / nu
        rtr = rtr + s.a_perp.T @ s.a_perp
        c0 = jnp.sum(kappa / nu)
    c = lam @ f.inv_e
    k_hat = 0.5 * (s.a.T @ (lam[:, None] * s.a) - jnp.diag(c))
    s_hat = 0.5 * (rtr - jnp.diag(b))
    k_cot = p @ (0.5 * (k_hat + k_hat.T)) @ p.T
    w = r @ p.T
    m = MCotangent(r, s.a, kappa, f.inv_e @ kappa, c0, 0.5 * g)
    return Cotangents(-g * w, m, g * 0.5 * (k_cot + k_cot.T), g * 0.5 * (s_hat + s_hat.T), w)


def nan_unless(ok: Array, x: Array) -> Array:
    """x where ok, NaN elsewhere: the helpers' way to never return a finite number for bad input."""
    return jnp.where(ok, x, jnp.nan)
