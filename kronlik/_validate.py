"""Eager input validation: the exception that ``jax.jit`` cannot raise."""

from __future__ import annotations

import jax
import numpy as np

from ._checks import EighFactor, LowRank, prepare, psd_rtol

Array = jax.Array


def _concrete(name: str, a: Array) -> np.ndarray:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"kronlik.validate needs concrete arrays (it raises eagerly); {name} is traced. "
            "Call it outside jax.jit/vmap/grad; inside, loglik returns NaN for bad input."
        )
    return np.asarray(a)


def _eig_extremes(name: str, a: np.ndarray) -> tuple[float, float, float]:
    """(smallest eigenvalue, largest |eigenvalue|, round-off allowance) of a symmetric matrix."""
    w = np.linalg.eigvalsh(0.5 * (a + a.T))
    scale = float(np.max(np.abs(w)))
    return float(w[0]), scale, psd_rtol(a.shape[0], a.dtype) * scale


def validate(Y: Array, M: Array, K: Array, Sigma: Array | None = None, *, log_var: Array | None = None) -> None:
    """Raise ``ValueError`` naming the input that makes the likelihood undefined, and by how much.

    Pass the noise as ``Sigma`` (D, D) for :func:`kronlik.loglik`, or as ``log_var=`` (D,)
    for :func:`kronlik.loglik_diag`. M may be an array, a :class:`kronlik.LowRank` (its
    factor must be finite) or a :class:`kronlik.EighFactor` (orthonormal vectors,
    non-negative values). Checks, in order: shapes and dtypes (as the
    likelihood does at trace time), finite entries, symmetry of M, K, Σ to round-off,
    M and K positive semi-definite up to the round-off allowance that the likelihood
    clips (see :func:`kronlik._checks.psd_rtol`), and Σ positive definite. Together
    these make U = M ⊗ K + I_T ⊗ Σ positive definite. Returns None when all pass.

    Eager only: under ``jax.jit`` the likelihood signals the same failures with NaN.
    """
    if (Sigma is None) == (log_var is None):
        raise TypeError("validate needs exactly one of Sigma (D, D) or log_var= (D,)")
    name = "Sigma" if log_var is None else "log_var"
    Y, M, K, noise = prepare(Y, M, K, Sigma if log_var is None else log_var, name)
    if isinstance(M, LowRank):
        m_parts = {"M.factor": M.factor}
    elif isinstance(M, EighFactor):
        m_parts = {"M.vectors": M.vectors, "M.values": M.values}
    else:
        m_parts = {"M": M}
    named = {"Y": Y, **m_parts, "K": K, name: noise}
    named = {n: _concrete(n, a) for n, a in named.items()}
    Y, K, noise = named["Y"], named["K"], named[name]

    for n, a in named.items():
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{n} has {int(bad.sum())} non-finite entries (NaN or inf), the first at index {first}")

    if "M.vectors" in named:  # an EighFactor must be an eigendecomposition of a PSD matrix
        V, lam = named["M.vectors"], named["M.values"]
        off = float(np.max(np.abs(V.T @ V - np.eye(V.shape[0], dtype=V.dtype))))
        allowed = psd_rtol(V.shape[0], V.dtype)
        if off > allowed:
            raise ValueError(f"M.vectors is not orthonormal: max |VᵀV - I| = {off:.3g} (allowed {allowed:.3g})")
        scale = float(np.max(np.abs(lam)))
        if lam.min() < -allowed * scale:
            raise ValueError(f"M.values has a negative eigenvalue {lam.min():.6g} (largest magnitude {scale:.6g})")

    psd = ([("M", named["M"])] if "M" in named else []) + [("K", K)]
    for n, a in psd + ([("Sigma", noise)] if name == "Sigma" else []):
        asym = float(np.max(np.abs(a - a.T)))
        allowed = psd_rtol(a.shape[0], a.dtype) * float(np.max(np.abs(a)))
        if asym > allowed:
            raise ValueError(
                f"{n} is not symmetric: max |{n} - {n}ᵀ| = {asym:.3g} (allowed {allowed:.3g}); "
                "kronlik would use its symmetric part (A + Aᵀ)/2"
            )

    for n, a in psd:
        low, scale, allowed = _eig_extremes(n, a)
        if low < -allowed:
            raise ValueError(
                f"{n} is not positive semi-definite: smallest eigenvalue {low:.6g} "
                f"(largest magnitude {scale:.6g}; round-off allowance -{allowed:.3g})"
            )

    if name == "Sigma":
        low = float(np.linalg.eigvalsh(0.5 * (noise + noise.T))[0])
        if not low > 0.0 or not np.all(np.isfinite(_cholesky_or_nan(noise))):
            raise ValueError(f"Sigma is not positive definite: smallest eigenvalue {low:.6g}")
    else:
        # Large log_var is fine (the whitening only forms exp(-log_var / 2)); a variance
        # so small that exp(-log_var) overflows makes the whitened K̃ infinite.
        if np.any(-noise >= np.log(np.finfo(noise.dtype).max)):
            raise ValueError(
                f"log_var has entries down to {noise.min():.6g}: the noise variance "
                f"exp(log_var) underflows in {noise.dtype}"
            )


def _cholesky_or_nan(a: np.ndarray) -> np.ndarray:
    # np.linalg.cholesky raises LinAlgError; fold that into 'not finite' for one message.
    try:
        return np.linalg.cholesky(0.5 * (a + a.T))
    except np.linalg.LinAlgError:
        return np.full_like(a, np.nan)
