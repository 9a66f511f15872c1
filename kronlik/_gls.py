r"""Covariates in M's eigenbasis: generalised least squares, ML and REML, and the REML information.

The mean of vec(Y) is X vec(B) with X = [F₁ ⊗ A₁, F₂ ⊗ A₂, ...] (Fᵢ: T×cᵢ covariates, Aᵢ: D×aᵢ
trait designs; row-major vec, so vec(Fᵢ Bᵢ Aᵢᵀ) = (Fᵢ ⊗ Aᵢ) vec(Bᵢ)). In the core's basis,
(V ⊗ P)ᵀ U (V ⊗ P) = diag(E), so U^{-1/2}-whitened columns are cheap:

    X̃ = diag(E)^{-1/2} (V ⊗ P)ᵀ X,   block i = (Vᵀ Fᵢ) ⊗ (Pᵀ Aᵢ) scaled row (t, j) by E_tj^{-1/2}

(rows of the complement of span(V) have E = ν and use Fᵢ - V VᵀFᵢ), and with ỹ the same whitening
of y, XᵀU⁻¹X = X̃ᵀX̃ and XᵀU⁻¹y = X̃ᵀỹ. A thin QR X̃ = Q R (TD × q, never TD × TD) gives

    B̂ = R⁻¹ Qᵀ ỹ,  Cov(B̂) = (XᵀU⁻¹X)⁻¹ = R⁻¹R⁻ᵀ,  log det XᵀU⁻¹X = 2 Σ log |R_kk|,
    r̂ᵀU⁻¹r̂ = ‖(I - QQᵀ) ỹ‖²  (the whitened residual, an orthogonal projection: no cancellation).

Values (q = Σ cᵢaᵢ, n = TD):
    ML    L = -½ (n log 2π + log det U + r̂ᵀU⁻¹r̂)
    REML  L = -½ ((n - q) log 2π + log det U + log det XᵀU⁻¹X + r̂ᵀU⁻¹r̂)   (Harville)
          + ½ log det XᵀX                                                 (LaMotte's convention)

Gradients. B̂ maximises the ML value, so (envelope) ∂L/∂U = ½ (w wᵀ - U⁻¹) with w = U⁻¹r̂; REML
adds -½ ∂ log det XᵀU⁻¹X / ∂U = ½ U⁻¹X (XᵀU⁻¹X)⁻¹ XᵀU⁻¹ = ½ Σ_k q_k q_kᵀ, q_k = U⁻¹ X R⁻¹ e_k,
exactly the core's data-like terms (``DataTerms``): in the basis, the k-th is column k of Q
scaled by E^{-1/2}. So the core's one backward kernel gives ∂L/∂M, ∂L/∂K, ∂L/∂Σ and
∂L/∂Y = -w, with E the only denominator (exact at ties, no eigendecomposition differentiated).

REML information. With N the q columns n_k = E^{-1/2} Q_k in the basis and a direction rotating to
G(t) = λ_t K̃ + S̃ on row t (K̃ = PᵀdKP, S̃ = PᵀdΣP), ½ tr(P dᵢU P dⱼU) for P = U⁻¹ - U⁻¹X C XᵀU⁻¹ is

    ½ tr(U⁻¹dᵢU U⁻¹dⱼU) - tr(Nᵀ Gᵢ E⁻¹ Gⱼ N) + ½ tr((Nᵀ Gᵢ N)(Nᵀ Gⱼ N)),

and both correction terms are sums over t of products of K̃, S̃ with D×D×D or q×q×D×D moments of
N (:func:`reml_information_correction`): O(T q² D² + P² (D³ + q² D²)) for P directions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from ._core import DataTerms, Factors, Solved, log_det

Array = jax.Array

ML, REML, LAMOTTE = "ml", "reml", "reml-lamotte"
METHODS = (ML, REML, LAMOTTE)


class Profiled(NamedTuple):
    """B profiled out: the value, the solve of the residual, and what REML's gradient adds."""

    value: Array  # () L (ML or REML)
    solved: Solved  # the core's forward pass for r̂ = y - X B̂
    b: Array  # (q,) B̂, the blocks vec(Bᵢ) side by side
    r: Array  # (q, q) upper-triangular, XᵀU⁻¹X = RᵀR
    extra: DataTerms | None  # REML's q_k; None for ML
    q: Array  # (rows, q) Q of the whitened design X̃ = QR
    residual: Array  # (rows,) (I - QQᵀ) ỹ, the whitened residual


def _whiten(f: Factors, Y: Array) -> tuple[Array, Array | None]:
    """E^{-1/2} Vᵀ Y P (r·D,) and, with a complement, (Y - VVᵀY) P / √ν (T·D,)."""
    p = f.pencil.p
    y_rot = f.basis.rotate(Y)
    main = (y_rot @ p) * jnp.sqrt(f.inv_e)
    perp = None
    if f.num_complement():
        perp = ((Y - f.basis.unrotate(y_rot)) @ p) / jnp.sqrt(f.pencil.nu)[None, :]
    return main, perp


def whitened_design(f: Factors, terms: tuple[tuple[Array, Array], ...]) -> Array:
    """X̃ = diag(E)^{-1/2} (V ⊗ P)ᵀ X, shape (r·D [+ T·D], q): column (i, c, a) is block i's F[:, c] ⊗ A[:, a]."""
    p, sq = f.pencil.p, jnp.sqrt(f.inv_e)
    blocks = []
    for F, A in terms:
        a_rot = p.T @ A  # (D, a)
        f_rot = f.basis.rotate(F)  # (r, c)
        main = f_rot[:, None, :, None] * a_rot[None, :, None, :] * sq[:, :, None, None]
        cols = main.reshape(main.shape[0] * main.shape[1], -1)
        if f.num_complement():
            f_perp = F - f.basis.unrotate(f_rot)
            perp = f_perp[:, None, :, None] * (a_rot / jnp.sqrt(f.pencil.nu)[:, None])[None, :, None, :]
            cols = jnp.concatenate([cols, perp.reshape(perp.shape[0] * perp.shape[1], -1)], axis=0)
        blocks.append(cols)
    return jnp.concatenate(blocks, axis=1)


def profile(f: Factors, Y: Array, terms: tuple[tuple[Array, Array], ...], method: str) -> Profiled:
    """GLS and the ML/REML value from the core's factors (module docstring)."""
    T, D = Y.shape
    rd = f.e.shape[0] * D
    x_w = whitened_design(f, terms)
    q = x_w.shape[1]
    y_main, y_perp = _whiten(f, Y)
    y_w = y_main.reshape(-1) if y_perp is None else jnp.concatenate([y_main.reshape(-1), y_perp.reshape(-1)])
    qmat, r = jnp.linalg.qr(x_w)
    qty = qmat.T @ y_w
    b = jax.scipy.linalg.solve_triangular(r, qty, lower=False)
    res_w = y_w - qmat @ qty  # (I - QQᵀ) ỹ
    sq = jnp.sqrt(f.inv_e)
    a = res_w[:rd].reshape(-1, D) * sq
    a_perp = None
    if y_perp is not None:
        a_perp = res_w[rd:].reshape(T, D) / jnp.sqrt(f.pencil.nu)[None, :]
    quad = jnp.sum(res_w * res_w)
    n = T * D
    value = -0.5 * (log_det(f, T) + quad + n * math.log(2.0 * math.pi))
    extra = None
    if method != ML:
        value = value - jnp.sum(jnp.log(jnp.abs(jnp.diagonal(r)))) + 0.5 * q * math.log(2.0 * math.pi)
        qa = jnp.transpose(qmat[:rd].reshape(-1, D, q) * sq[:, :, None], (2, 0, 1))  # (q, r, D)
        qa_perp, qr_ = None, jax.vmap(f.basis.unrotate)(qa)
        if y_perp is not None:
            qa_perp = jnp.transpose(qmat[rd:].reshape(T, D, q) / jnp.sqrt(f.pencil.nu)[None, :, None], (2, 0, 1))
            qr_ = qr_ + qa_perp
        extra = DataTerms(qa, qa_perp, qr_)
    # X of full column rank: each |R_kk| resolved against its column's norm (numpy's rank rule)
    resolution = max(x_w.shape) * jnp.finfo(x_w.dtype).eps
    full_rank = jnp.all(jnp.abs(jnp.diagonal(r)) > resolution * jnp.linalg.norm(x_w, axis=0))
    ok = f.flags.all() & full_rank & jnp.all(jnp.isfinite(Y)) & jnp.isfinite(value)
    solved = Solved(jnp.where(ok, value, jnp.nan), a, a_perp, ok)
    return Profiled(solved.value, solved, b, r, extra, qmat, res_w)


def reml_information_correction(f: Factors, extra: DataTerms, k_rot: Array, s_rot: Array) -> Array:
    """-tr(Nᵀ Gᵢ E⁻¹ Gⱼ N) + ½ tr((NᵀGᵢN)(NᵀGⱼN)) for P directions K̃ᵢ, S̃ᵢ (P, D, D) (module docstring)."""
    lam, h = f.basis.lam, f.inv_e
    a = extra.a  # (q, r, D): n_k on the rows of span(V)
    nn = jnp.einsum("krd,kre->rde", a, a)
    psi = [jnp.einsum("r,rd,ref->def", lam**pw, h, nn) for pw in (0, 1, 2)]
    phi0 = jnp.einsum("krd,lre->klde", a, a)
    phi1 = jnp.einsum("krd,r,lre->klde", a, lam, a)
    if extra.a_perp is not None:  # the complement: λ = 0, E = ν
        ap = extra.a_perp
        psi[0] = psi[0] + jnp.einsum("d,tef->def", 1.0 / f.pencil.nu, jnp.einsum("kte,ktf->tef", ap, ap))
        phi0 = phi0 + jnp.einsum("ktd,lte->klde", ap, ap)
    t2 = (
        jnp.einsum("ide,jdf,def->ij", k_rot, k_rot, psi[2])
        + jnp.einsum("ide,jdf,def->ij", k_rot, s_rot, psi[1])
        + jnp.einsum("ide,jdf,def->ij", s_rot, k_rot, psi[1])
        + jnp.einsum("ide,jdf,def->ij", s_rot, s_rot, psi[0])
    )
    sandwich = jnp.einsum("ide,klde->ikl", k_rot, phi1) + jnp.einsum("ide,klde->ikl", s_rot, phi0)
    t3 = jnp.einsum("ikl,jlk->ij", sandwich, sandwich)
    corr = -t2 + 0.5 * t3
    return 0.5 * (corr + corr.T)
