r"""The noise models: Σ as a full (D, D) matrix or as log-variances, and the stable pencil of (K, Σ).

Both diagonalise K and Σ simultaneously through their balanced *sum* S = αK + Σ (α the mean
eigenvalue of M), never through Σ alone:

    S̃ = D⁻¹ S D⁻¹ = C Cᵀ   (D = diag(S)^{1/2}, Jacobi scaling: S̃ has unit diagonal)
    K̂ = α D⁻¹ K D⁻¹,   Σ̂ = D⁻¹ Σ D⁻¹,   K̂ + Σ̂ = S̃
    C⁻¹ K̂ C⁻ᵀ = Q diag(·) Qᵀ,   P̃ = C⁻ᵀ Q,   P = D⁻¹ P̃
    ρ_j = p̃_jᵀ K̂ p̃_j,   ν_j = p̃_jᵀ Σ̂ p̃_j        (Rayleigh quotients, 0 ≤ ρ, ν, ρ + ν = 1)

so Pᵀ S P = I, Pᵀ K P = diag(κ) with κ = ρ/α and Pᵀ Σ P = diag(ν). Whitening by Σ alone
(eigh of Σ^{-1/2} K Σ^{-1/2}) spreads the eigenvalues over the ratio of the noise variances and
keeps the small ones only to eps times the largest; here every matrix that is eigendecomposed or
factorised has norm ≤ 1 and is as well conditioned as U allows (κ(S) ≤ κ(U): xᵀSx is a value of
the quadratic form of U). The eigenvalues of C⁻¹K̂C⁻ᵀ are only used for the basis: ρ and ν are
recomputed as Rayleigh quotients, whose error is quadratic in that of the eigenvector, so a
noise variance 1e-30 of the others still comes out with its leading digits (1 - ρ would lose all).

log det S = log det S̃ + Σ log diag(S), and log det U = T log det S + Σ_tj log E_tj.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from .forms import psd_tolerance

Array = jax.Array


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


class Pencil(NamedTuple):
    """K and Σ diagonalised together: Pᵀ K P = diag(kappa), Pᵀ Σ P = diag(nu), Pᵀ (αK + Σ) P = I."""

    p: Array  # (D, D)
    p_scaled: Array  # (D, D) P̃ = diag(S)^{1/2} P
    rho: Array  # (D,) α κ, in [0, 1]
    kappa: Array  # (D,) ρ / α
    nu: Array  # (D,) in [0, 1]
    noise_weight: Array  # (D,) diag(Σ̂) = Σ_dd / S_dd: ∂L/∂s = weight ⊙ diag(P̃ Ŝ P̃ᵀ)
    logdet_s: Array  # () log det(αK + Σ)
    ok_k: Array  # () K PSD to round-off
    ok_noise: Array  # () Σ PSD to round-off
    ok_s: Array  # () αK + Σ positive definite and finite
    k_margin: Array  # () min_j ρ_j / (‖K̂‖ ‖p̃_j‖²): a negative K direction, relative to K's scale
    noise_margin: Array  # () the same for Σ


def _pencil(
    k_hat: Array, sigma_hat: Array, log_diag_s: Array, noise_weight: Array, alpha: Array, exact_nu: bool
) -> Pencil:
    """The pencil from the Jacobi-scaled K̂ = αD⁻¹KD⁻¹ and Σ̂ = D⁻¹ΣD⁻¹ (log_diag_s = log diag S)."""
    D = k_hat.shape[0]
    chol = jnp.linalg.cholesky(k_hat + sigma_hat)  # NaN unless S is positive definite
    half = solve_triangular(chol, k_hat, lower=True)
    _, q = jnp.linalg.eigh(solve_triangular(chol, half.T, lower=True))
    p_scaled = solve_triangular(chol, q, lower=True, trans="T")
    rho_raw = jnp.sum(p_scaled * (k_hat @ p_scaled), axis=0)
    nu_raw = jnp.sum(p_scaled * (sigma_hat @ p_scaled), axis=0)
    # A Rayleigh quotient is round-off when a perturbation of K̂ (Σ̂) within psd_tolerance of
    # its norm explains it (|Δρ_j| ≤ ‖ΔK̂‖ ‖p̃_j‖²): negative, it is an error only beyond that;
    # either sign, it is zero to the accuracy K (Σ) is known to, as for M's eigenvalues.
    norms = jnp.sum(p_scaled * p_scaled, axis=0)
    k_rel = rho_raw / (jnp.linalg.norm(k_hat) * norms)
    noise_rel = nu_raw / (jnp.linalg.norm(sigma_hat) * norms)
    k_margin, noise_margin = jnp.min(k_rel), jnp.min(noise_rel)
    tol = psd_tolerance(D, k_hat.dtype)
    ok_s = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(log_diag_s))
    logdet_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) + jnp.sum(log_diag_s)
    p = p_scaled * jnp.exp(-0.5 * log_diag_s)[:, None]
    rho = jnp.where(k_rel > tol, rho_raw, 0.0)
    # ν of diagonal noise is a sum of non-negative terms, exact to rounding however small: kept.
    nu = jnp.maximum(nu_raw, 0.0) if exact_nu else jnp.where(noise_rel > tol, nu_raw, 0.0)
    return Pencil(
        p,
        p_scaled,
        rho,
        rho / alpha,
        nu,
        noise_weight,
        logdet_s,
        ~(k_margin < -tol),  # NaN margins (S not PD) are reported by ok_s
        ~(noise_margin < -tol),
        ok_s,
        k_margin,
        noise_margin,
    )


class FullNoise(NamedTuple):
    """Σ as a (D, D) positive semi-definite matrix (symmetrised)."""

    sigma: Array

    name = "Sigma"

    @staticmethod
    def shape(D: int) -> tuple[int, ...]:
        return (D, D)

    def pencil(self, K: Array, alpha: Array) -> Pencil:
        k, sigma = _sym(K), _sym(self.sigma)
        diag_s = alpha * jnp.diagonal(k) + jnp.diagonal(sigma)
        inv_d = jnp.where(diag_s > 0, 1.0 / jnp.sqrt(jnp.abs(diag_s)), jnp.nan)
        scale = inv_d[:, None] * inv_d[None, :]
        sigma_hat = sigma * scale
        return _pencil(alpha * k * scale, sigma_hat, jnp.log(diag_s), jnp.diagonal(sigma_hat), alpha, False)

    def diagonal(self) -> Array:
        return jnp.diagonal(self.sigma)

    def cotangent(self, pencil: Pencil, s_hat: Array) -> FullNoise:
        """g·∂L/∂Σ = P Ŝ Pᵀ for Ŝ the cotangent in the pencil basis."""
        return FullNoise(_sym(pencil.p @ s_hat @ pencil.p.T))


class LogVarNoise(NamedTuple):
    """Σ = diag(exp(log_var)); every quantity is formed from log_var, so any finite value is usable."""

    log_var: Array

    name = "log_var"

    @staticmethod
    def shape(D: int) -> tuple[int, ...]:
        return (D,)

    def pencil(self, K: Array, alpha: Array) -> Pencil:
        k = _sym(K)
        # log S_dd = log(α K_dd + e^{s_d}) without forming e^{s_d} (it may overflow); a
        # negative K_dd only changes the scaling, the K check below catches it.
        log_diag_s = jnp.logaddexp(jnp.log(jnp.maximum(alpha * jnp.diagonal(k), 0.0)), self.log_var)
        inv_d = jnp.exp(-0.5 * log_diag_s)
        weight = jnp.exp(self.log_var - log_diag_s)  # Σ_dd / S_dd ≤ 1
        return _pencil(alpha * k * inv_d[:, None] * inv_d[None, :], jnp.diag(weight), log_diag_s, weight, alpha, True)

    def diagonal(self) -> Array:
        return jnp.exp(self.log_var)

    def cotangent(self, pencil: Pencil, s_hat: Array) -> LogVarNoise:
        """g·∂L/∂s = eˢ ⊙ diag(P Ŝ Pᵀ) = (Σ_dd/S_dd) ⊙ diag(P̃ Ŝ P̃ᵀ): no eˢ, finite for any finite s."""
        ps = pencil.p_scaled
        return LogVarNoise(pencil.noise_weight * jnp.sum((ps @ s_hat) * ps, axis=1))
