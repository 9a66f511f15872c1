r"""The noise models (Σ a full (D, D) matrix, or log-variances) and the stable pencil of (K, Σ).

K and Σ are diagonalised together through their balanced *sum* S = αK + Σ (α the mean
eigenvalue of M), never through Σ alone. With K = F_K F_Kᵀ and Σ = F_Σ F_Σᵀ (PSD factors: an
``eigh`` of K, and of Σ or diag(e^{s/2})), Jacobi scaling D = diag(S)^{1/2}, and
F̂_K = √α D⁻¹ F_K, F̂_Σ = D⁻¹ F_Σ:

    S̃ = F̂_K F̂_Kᵀ + F̂_Σ F̂_Σᵀ = C Cᵀ          (unit diagonal)
    C⁻¹ F̂_K F̂_Kᵀ C⁻ᵀ = Q diag(·) Qᵀ,   P̃ = C⁻ᵀ Q   (then Jacobi-refined, :mod:`kronlik._jacobi`)
    ρ_j = ‖F̂_Kᵀ p̃_j‖²,   ν_j = ‖F̂_Σᵀ p̃_j‖²,   P = D⁻¹ P̃

so Pᵀ S P = I, Pᵀ K P = diag(κ) with κ = ρ/α, Pᵀ Σ P = diag(ν), and ρ + ν = 1. Whitening by Σ
alone (eigh of Σ^{-1/2} K Σ^{-1/2}) spreads the eigenvalues over the ratio of the noise
variances and keeps the small ones only to eps times the largest. Here every matrix that is
factorised has norm ≤ 1 and is as well conditioned as U allows (κ(S) ≤ κ(U): xᵀSx is a value
of U's quadratic form), ρ and ν are squared norms (no cancellation, never negative), and the
Jacobi refinement makes the tiny ones accurate relative to themselves. D is formed in logs, so
log-variances of ±800 (e^800 overflows) and M and K near the overflow threshold are usable.

log det S = log det S̃ + Σ_d log S_dd, and log det U = T log det S + Σ_tj log E_tj.

PSD checks: K and Σ must be positive semi-definite up to ``psd_tolerance(D)`` relative to their
own largest eigenvalue: a Cholesky factor when they are positive definite, else the ``eigh`` that
gives their factor says so; round-off negatives of the Jacobi-scaled matrix are dropped from the
factor, a backward perturbation of A_ij of size eps·sqrt(A_ii A_jj) (as a Cholesky of U commits).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from ._jacobi import refine
from .forms import psd_tolerance, resolution

Array = jax.Array


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


class PSDFactor(NamedTuple):
    """A = F Fᵀ for a symmetric PSD A, and whether A is PSD to round-off."""

    factor: Array  # (D, D)
    ok: Array  # () finite and PSD to psd_tolerance


def psd_factor(a: Array) -> PSDFactor:
    """Cholesky when A is positive definite (the usual case, D³/3); else from ``eigh``.

    The ``eigh`` branch says whether A has eigenvalues below -psd_tolerance(D) times the largest
    magnitude, and factors the Jacobi-scaled A / (d dᵀ) (d = sqrt(diag A)) with its round-off
    negatives dropped: a backward perturbation of A_ij of size eps·d_i d_j.
    """
    a = _sym(a)
    chol = jnp.linalg.cholesky(a)

    def from_eigh(_):
        w = jnp.linalg.eigvalsh(a)
        scale = jnp.max(jnp.abs(w))
        ok = (w[0] >= -psd_tolerance(a.shape[0], a.dtype) * scale) & jnp.isfinite(scale)
        # The factor from the eigh of the Jacobi-scaled A / (d dᵀ), d = sqrt(diag A): dropping
        # its negatives moves A_ij by eps·d_i d_j, as a Cholesky of U perturbs U, not by
        # eps·max|λ| (which, times α, can swamp a tiny noise variance on an output with small K_dd).
        diag = jnp.diagonal(a)
        d = jnp.where(diag > 0, jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
        w_hat, v_hat = jnp.linalg.eigh(a / (d[:, None] * d[None, :]))
        return d[:, None] * v_hat * jnp.sqrt(jnp.maximum(w_hat, 0.0))[None, :], ok

    def from_cholesky(_):
        return chol, positive_definite

    positive_definite = jnp.all(jnp.isfinite(chol))
    return PSDFactor(*jax.lax.cond(positive_definite, from_cholesky, from_eigh, None))


class Pencil(NamedTuple):
    """K and Σ diagonalised together: Pᵀ K P = diag(kappa), Pᵀ Σ P = diag(nu), Pᵀ (αK + Σ) P = I."""

    p: Array  # (D, D)
    p_scaled: Array  # (D, D) P̃ = diag(S)^{1/2} P
    rho: Array  # (D,) α κ, in [0, 1]
    kappa: Array  # (D,) ρ / α
    nu: Array  # (D,) in [0, 1]
    noise_weight: Array  # (D,) Σ_dd / S_dd for diagonal noise: ∂L/∂s = weight ⊙ diag(P̃ Ŝ P̃ᵀ)
    logdet_s: Array  # () log det(αK + Σ)
    ok_k: Array  # () K PSD to round-off
    ok_noise: Array  # () Σ PSD to round-off
    ok_s: Array  # () αK + Σ positive definite and finite
    rho_resolved: Array  # (D,) ρ_j told apart from 0 (resolution · ‖K̂‖ ‖p̃_j‖²)
    nu_resolved: Array  # (D,) ν_j told apart from 0
    k_trace: Array  # () trace K̂ = ‖F̂_K‖_F² ≥ ‖K̂‖: the scale of a round-off perturbation of K
    noise_trace: Array  # () trace Σ̂ for a full Σ; 0 for diagonal noise, which enters exactly


def _pencil(
    k: PSDFactor, log_s_noise: Array, scaled_noise_factor, alpha: Array, exact_nu: bool, ok_noise: Array
) -> Pencil:
    """The pencil from K's factor, log diag Σ, and D ↦ D⁻¹ F_Σ (the noise's scaled factor)."""
    D = log_s_noise.shape[0]
    log_alpha = jnp.log(alpha)
    # log S_dd = log(α K_dd + Σ_dd), in logs so that neither term needs to be representable.
    log_k_diag = jnp.log(jnp.sum(k.factor * k.factor, axis=1))
    log_diag_s = jnp.logaddexp(log_alpha + log_k_diag, log_s_noise)
    fk = k.factor * jnp.exp(0.5 * (log_alpha - log_diag_s))[:, None]
    fs = scaled_noise_factor(log_diag_s)
    chol = jnp.linalg.cholesky(fk @ fk.T + fs @ fs.T)  # NaN unless S is positive definite
    ck = solve_triangular(chol, fk, lower=True)  # C⁻¹ F̂_K
    _, q = jnp.linalg.eigh(ck @ ck.T)
    p_scaled = solve_triangular(chol, q, lower=True, trans="T")
    p_scaled, bk, bs = refine(p_scaled, fk.T @ p_scaled, fs.T @ p_scaled)
    rho, nu = jnp.sum(bk * bk, axis=0), jnp.sum(bs * bs, axis=0)
    norms = jnp.sum(p_scaled * p_scaled, axis=0)
    res = resolution(D, fk.dtype)
    k_trace = jnp.sum(fk * fk)
    noise_trace = jnp.zeros((), fk.dtype) if exact_nu else jnp.sum(fs * fs)
    rho_resolved = rho > res * k_trace * norms
    nu_resolved = nu > 0 if exact_nu else nu > res * noise_trace * norms
    ok_s = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(log_diag_s))
    logdet_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) + jnp.sum(log_diag_s)
    p = p_scaled * jnp.exp(-0.5 * log_diag_s)[:, None]
    weight = jnp.exp(log_s_noise - log_diag_s)
    return Pencil(
        p=p,
        p_scaled=p_scaled,
        rho=rho,
        kappa=rho / alpha,
        nu=nu,
        noise_weight=weight,
        logdet_s=logdet_s,
        ok_k=k.ok,
        ok_noise=ok_noise,
        ok_s=ok_s,
        rho_resolved=rho_resolved,
        nu_resolved=nu_resolved,
        k_trace=k_trace,
        noise_trace=noise_trace,
    )


class FullNoise(NamedTuple):
    """Σ as a (D, D) positive semi-definite matrix (symmetrised)."""

    sigma: Array

    name = "Sigma"

    @staticmethod
    def shape(D: int) -> tuple[int, ...]:
        return (D, D)

    def pencil(self, K: Array, alpha: Array) -> Pencil:
        k, s = psd_factor(K), psd_factor(self.sigma)
        log_s_noise = jnp.log(jnp.sum(s.factor * s.factor, axis=1))

        def scaled(log_diag_s):
            return s.factor * jnp.exp(-0.5 * log_diag_s)[:, None]

        return _pencil(k, log_s_noise, scaled, alpha, False, s.ok)

    def diagonal(self) -> Array:
        return jnp.diagonal(self.sigma)

    def apply(self, W: Array) -> Array:
        """W Σ for W of shape (T, D): the noise part of U applied to unvec'd vectors."""
        return W @ _sym(self.sigma)

    def with_outputs_replaced(self, outputs, variance: Array) -> FullNoise:
        """Σ with the rows and columns of ``outputs`` (a concrete bool (D,)) set to ``variance``·e_d e_dᵀ."""
        D = self.sigma.shape[0]
        cut = outputs[:, None] | outputs[None, :]
        benign = jnp.where(jnp.eye(D, dtype=bool), variance, jnp.zeros((), self.sigma.dtype))
        return FullNoise(jnp.where(cut, benign, self.sigma))

    def cotangent(self, pencil: Pencil, s_hat: Array) -> FullNoise:
        """g·∂L/∂Σ = P Ŝ Pᵀ for Ŝ the cotangent in the pencil basis."""
        return FullNoise(_sym(pencil.p @ s_hat @ pencil.p.T))

    @staticmethod
    def rotated_tangent(pencil: Pencil, tangent: FullNoise) -> Array:
        """S̃ = Pᵀ dΣ P, (D, D): a direction of Σ in the pencil basis."""
        return pencil.p.T @ _sym(tangent.sigma) @ pencil.p

    @staticmethod
    def curvature(tangent: FullNoise, cotangent: FullNoise) -> None:
        """Σ is linear in its array: no second-derivative term."""
        return None


class LogVarNoise(NamedTuple):
    """Σ = diag(exp(log_var)); every quantity is formed from log_var, so any finite value is usable."""

    log_var: Array

    name = "log_var"

    @staticmethod
    def shape(D: int) -> tuple[int, ...]:
        return (D,)

    def pencil(self, K: Array, alpha: Array) -> Pencil:
        k = psd_factor(K)

        # F_Σ = diag(e^{s/2}) is never formed: only its scaled form, diag(e^{(s - log S_dd)/2}).
        def scaled(log_diag_s):
            return jnp.diag(jnp.exp(0.5 * (self.log_var - log_diag_s)))

        return _pencil(k, self.log_var, scaled, alpha, True, jnp.array(True))

    def diagonal(self) -> Array:
        return jnp.exp(self.log_var)

    def apply(self, W: Array) -> Array:
        """W Σ for W of shape (T, D) (inf where eˢ overflows: callers guard)."""
        return W * jnp.exp(self.log_var)[None, :]

    def with_outputs_replaced(self, outputs, variance: Array) -> LogVarNoise:
        """log_var with the entries of ``outputs`` (a concrete bool (D,)) set to log(``variance``)."""
        return LogVarNoise(jnp.where(outputs, jnp.log(variance), self.log_var))

    def cotangent(self, pencil: Pencil, s_hat: Array) -> LogVarNoise:
        """g·∂L/∂s = eˢ ⊙ diag(P Ŝ Pᵀ) = (Σ_dd/S_dd) ⊙ diag(P̃ Ŝ P̃ᵀ): no eˢ, finite for any finite s."""
        ps = pencil.p_scaled
        return LogVarNoise(pencil.noise_weight * jnp.sum((ps @ s_hat) * ps, axis=1))

    @staticmethod
    def rotated_tangent(pencil: Pencil, tangent: LogVarNoise) -> Array:
        """S̃ = Pᵀ diag(eˢ ⊙ ds) P = P̃ᵀ diag((Σ_dd/S_dd) ⊙ ds) P̃, (D, D): no eˢ is formed."""
        ps = pencil.p_scaled
        return ps.T @ ((pencil.noise_weight * tangent.log_var)[:, None] * ps)

    @staticmethod
    def curvature(tangent: LogVarNoise, cotangent: LogVarNoise) -> LogVarNoise:
        """The term of Σ = diag(eˢ) being curved: d(eˢ ⊙ g_Σ) ∋ ds ⊙ eˢ ⊙ g_Σ = ds ⊙ ∂L/∂s."""
        return LogVarNoise(tangent.log_var * cotangent.log_var)
