r"""Association scans: one test per genetic variant, reusing the null model's factorisation.

For variant g (a column of G, T entries) with trait design A_g (D × a: I_D for an effect on any
trait, 1_D for a common effect), the alternative mean adds g ⊗ A_g to the covariates' X. With K
and Σ fixed at the null fit, in the null's whitened basis (``kronlik._gls``: X̃ = QR, residual
r̃ = (I - QQᵀ) ỹ) and X̃_g the whitened g ⊗ A_g,

    u = X̃_gᵀ r̃,   V = X̃_gᵀ (I - QQᵀ) X̃_g = X_gᵀ P X_g  (as x_pᵀx_p, x_p = (I - QQᵀ) X̃_g),   β̂ = V⁻¹ u,   Cov(β̂) = V⁻¹,
    χ² = uᵀ V⁻¹ u   on a degrees of freedom,

the score statistic, and algebraically also the Wald statistic β̂ᵀ Cov(β̂)⁻¹ β̂ (the covariances
being those of the null), and the GLS effect of g with the covariates (P = U⁻¹ - U⁻¹X(XᵀU⁻¹X)⁻¹XᵀU⁻¹).
Rotating G by M's eigenvectors is the only O(T² m) step; the rest is O(T D q a m) and runs in
batches of variants so memory stays bounded. ``test="lrt"`` instead refits K and Σ by maximum
likelihood with and without each variant (the exact likelihood-ratio test; REML values with
different X are not comparable, so it is ML whatever the null's method): for follow-up of a few
variants, not genome-wide.
"""

from __future__ import annotations

import sys
import time
import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._core import factor
from ._gls import ML, profile, whitened_design
from ._noise import FullNoise
from .mixed import _ML_UNBOUNDED, MixedFit, _build_free, _cholesky_params, _maximise, chi2_sf, ml_unbounded

Array = jax.Array

__all__ = ["ScanResult", "scan"]


class ScanResult(NamedTuple):
    """Per variant (m of them): χ², its degrees of freedom, p-value, effects and standard errors (m, a)."""

    chi2: Array
    df: int
    p_value: Array
    effect: Array
    se: Array
    test: str


def _trait_design(design, D: int, dtype) -> Array:
    if isinstance(design, str):
        if design == "any":
            return jnp.eye(D, dtype=dtype)
        if design == "common":
            return jnp.ones((D, 1), dtype)
        raise ValueError(f"design must be 'any', 'common' or a (D, a) array; got {design!r}")
    A = jnp.asarray(design)
    if A.ndim != 2 or A.shape[0] != D or A.shape[1] == 0 or not jnp.issubdtype(A.dtype, jnp.floating):
        raise ValueError(f"a trait design must be a floating (D, a) = ({D}, a >= 1) array; got {A.dtype} {A.shape}")
    if np.linalg.matrix_rank(np.asarray(A, dtype=float)) < A.shape[1]:
        raise ValueError("a trait design must have full column rank")
    return A.astype(dtype)


def _score_batch(f, prof, Y, A_g, G_rot):
    """χ², β̂ and SEs for the (T, b) rotated variants of one batch."""

    def one(g):
        x = whitened_design(f, ((g[:, None], A_g),))  # (rows, a)
        # (I - QQᵀ) X̃_g projected twice (classical Gram-Schmidt, reorthogonalised), then V = x_pᵀx_p:
        # V = X̃_gᵀX̃_g - (QᵀX̃_g)ᵀ(QᵀX̃_g) would cancel for a variant close to a covariate.
        for _ in range(2):
            x = x - prof.q @ (prof.q.T @ x)
        v = x.T @ x
        u = x.T @ prof.residual
        chol = jnp.linalg.cholesky(0.5 * (v + v.T))
        z = jax.scipy.linalg.solve_triangular(chol, u, lower=True)
        v_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(v.shape[0], dtype=v.dtype))
        return z @ z, v_inv @ u, jnp.sqrt(jnp.diagonal(v_inv))

    return jax.vmap(one, in_axes=1)(G_rot)


_score_batch_jit = jax.jit(_score_batch)


@partial(jax.jit, static_argnames=("method",))
def _null(prob, K, Sigma, *, method):
    """The null model's factors and whitened GLS, compiled once per shape."""
    f = factor(prob.form, K, FullNoise(Sigma), None)
    return f, profile(f, prob.Y, prob.terms, method, False, prob.cells)


def scan(
    fit: MixedFit,
    G: Array,
    *,
    design: str | Array = "any",
    test: str = "score",
    batch_size: int = 2048,
    progress: bool = False,
) -> ScanResult:
    """Test each column of the genotype matrix G (T × m) for association, given the null fit.

    Args:
      fit: :func:`kronlik.fit_mixed`'s result for the null model (the same Y, M, covariates).
      G: (T, m) genotypes (allele counts or standardised; the effects are per unit of G).
      design: ``"any"`` (an effect on each trait: a = D degrees of freedom), ``"common"`` (one
        effect shared by all traits: 1 df), or a (D, a) trait design of full column rank.
      test: ``"score"`` or ``"wald"`` (the same χ² with the null's K and Σ: module docstring), or
        ``"lrt"``: ML refits with and without each variant (slow: one fit per variant).
      batch_size: variants per compiled batch (memory O(batch · T · D · a)).
      progress: print a line to stderr about every 5 s.

    Returns:
      :class:`ScanResult`; p-values from χ²_df.
    """
    if test not in ("score", "wald", "lrt"):
        raise ValueError(f"test must be 'score', 'wald' or 'lrt'; got {test!r}")
    prob = fit.problem
    Y = prob.Y
    D = Y.shape[1]
    T = prob.num_individuals()  # the caller's rows (the fit may have dropped never-observed ones)
    G = jnp.asarray(G)
    if G.ndim != 2 or G.shape[0] != T:
        raise ValueError(f"G must have shape (T, m) = ({T}, m) to match the fit's {T} rows; got {G.shape}")
    if not jnp.issubdtype(G.dtype, jnp.floating):
        G = G.astype(Y.dtype)
    if G.dtype != Y.dtype:
        raise TypeError(f"G must be {Y.dtype} like the fitted data; got {G.dtype}")
    if not bool(jnp.all(jnp.isfinite(G))):
        raise ValueError("G has non-finite entries (impute missing genotypes first)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    A_g = _trait_design(design, D, Y.dtype)
    if test == "lrt":
        return _lrt(fit, G, A_g, progress)
    f, prof = _null(prob, fit.K, fit.Sigma, method=fit.method)
    m = G.shape[1]
    out, last = [], time.perf_counter()
    for start in range(0, m, batch_size):
        block = G[:, start : start + batch_size]
        if block.shape[1] < batch_size and m > batch_size:  # pad: one compiled shape
            block = jnp.concatenate([block, jnp.ones((T, batch_size - block.shape[1]), G.dtype)], axis=1)
        res = _score_batch_jit(f, prof, Y, A_g, prob.rotate(block))
        keep = min(batch_size, m - start)
        out.append(jax.tree_util.tree_map(lambda x, keep=keep: np.asarray(x)[:keep], res))
        if progress and time.perf_counter() - last > 5.0:
            print(f"kronlik scan: {start + block.shape[1]}/{m} variants", file=sys.stderr, flush=True)
            last = time.perf_counter()
    chi2, effect, se = (jnp.asarray(np.concatenate(parts)) for parts in zip(*out))
    a = A_g.shape[1]
    return ScanResult(chi2, a, chi2_sf(chi2, a), effect, se, test)


def _lrt(fit: MixedFit, G: Array, A_g: Array, progress: bool) -> ScanResult:
    prob = fit.problem
    if ml_unbounded(prob):
        warnings.warn(_ML_UNBOUNDED, stacklevel=3)
    start = {"k": _cholesky_params(fit.K), "s": _cholesky_params(fit.Sigma)}
    null = _maximise(prob, start, {}, 1e-8, method=ML, build=_build_free, num_steps=500)
    chi2, effect, se, last = [], [], [], time.perf_counter()
    G_rot = prob.rotate(G)
    a = A_g.shape[1]
    for k in range(G.shape[1]):
        alt_prob = prob._replace(terms=(*prob.terms, (G_rot[:, k : k + 1], A_g)))
        alt = _maximise(alt_prob, null.params, {}, 1e-8, method=ML, build=_build_free, num_steps=500)
        K, S = _build_free(alt.params, {})
        f = factor(alt_prob.form, K, FullNoise(S), None)
        prof = profile(f, alt_prob.Y, alt_prob.terms, ML, False, alt_prob.cells)
        chi2.append(jnp.maximum(2.0 * (alt.loglik - null.loglik), 0.0))
        effect.append(prof.b[-a:])
        se.append(jnp.sqrt(jnp.diagonal(prof.b_cov)[-a:]))
        if progress and time.perf_counter() - last > 5.0:
            print(f"kronlik scan (lrt): {k + 1}/{G.shape[1]} variants", file=sys.stderr, flush=True)
            last = time.perf_counter()
    chi2 = jnp.stack(chi2)
    return ScanResult(chi2, a, chi2_sf(chi2, a), jnp.stack(effect), jnp.stack(se), "lrt")
