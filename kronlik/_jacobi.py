r"""One-sided Jacobi refinement of a pencil basis: relative accuracy for tiny ρ_j and ν_j.

Given P̃ with P̃ᵀ S̃ P̃ = I for S̃ = F_K F_Kᵀ + F_Σ F_Σᵀ, the columns of B_K = F_Kᵀ P̃ and
B_Σ = F_Σᵀ P̃ have Grams B_Kᵀ B_K + B_Σᵀ B_Σ = I, and P̃ diagonalises K̂ and Σ̂ exactly when both
Grams are diagonal. ``eigh`` gets P̃ right to eps in norm, which is not enough where several ν_j
(or ρ_j) are tiny: there ρ_j ≈ 1 (ν_j ≈ 1) for all of them, ``eigh`` sees a cluster and mixes its
columns, and ν_j = ‖B_Σ e_j‖² picks up the neighbours' much larger noise. A Gram of B is known
to *relative* accuracy entrywise (|ΔG_ij| ≲ eps ‖b_i‖ ‖b_j‖), so Jacobi rotations computed from
it, with each pair of columns rotated by the Gram whose smaller diagonal entry is smaller (the
one that resolves that pair), restore the tiny ν_j (ρ_j) to relative accuracy (Demmel and
Veselić's argument for one-sided Jacobi). Rotations are orthogonal: P̃ᵀ S̃ P̃ = I is kept.

Pairs are visited in round-robin order (n/2 disjoint pairs per round, n - 1 rounds a sweep), so
each round is one vectorised update. When the basis is already diagonal to tolerance (the usual
case: well-separated spectra) no sweep runs and the cost is the two Grams.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_SWEEPS = 12


def _round_robin(n: int) -> np.ndarray:
    """(n - 1, n/2, 2) index pairs: every pair of 0..n-1 exactly once, disjoint within a round (n even)."""
    ring = list(range(n))
    rounds = []
    for _ in range(n - 1):
        rounds.append([(ring[i], ring[n - 1 - i]) for i in range(n // 2)])
        ring = [ring[0], ring[-1], *ring[1:-1]]
    return np.asarray(rounds, dtype=np.int32)


def _off_diagonal(bk: Array, bs: Array) -> Array:
    """max over pairs of |G_ij| / sqrt(G_ii G_jj) for the Gram that resolves the pair."""
    gk, gs = bk.T @ bk, bs.T @ bs
    dk, ds = jnp.diagonal(gk), jnp.diagonal(gs)
    use_s = jnp.minimum(ds[:, None], ds[None, :]) <= jnp.minimum(dk[:, None], dk[None, :])
    g = jnp.where(use_s, gs, gk)
    # √G_ii·√G_jj, not √(G_ii G_jj): the product of two Gram entries of 1e-180 (ν_j that small:
    # K 1e180 times Σ) underflows to 0, which read as "converged" and left ν unrefined.
    root_k, root_s = jnp.sqrt(dk), jnp.sqrt(ds)
    d = jnp.where(use_s, root_s[:, None] * root_s[None, :], root_k[:, None] * root_k[None, :])
    rel = jnp.abs(g) / jnp.where(d > 0, d, 1.0)
    rel = jnp.where(d > 0, rel, 0.0)
    return jnp.max(rel - jnp.diag(jnp.diagonal(rel)))


def _rotate_round(pairs: Array, p: Array, bk: Array, bs: Array) -> tuple[Array, Array, Array]:
    i, j = pairs[:, 0], pairs[:, 1]

    def gram(b):
        u, v = b[:, i], b[:, j]
        return jnp.sum(u * u, axis=0), jnp.sum(v * v, axis=0), jnp.sum(u * v, axis=0)

    ak, ck, gk = gram(bk)
    as_, cs_, gs = gram(bs)
    use_s = jnp.minimum(as_, cs_) <= jnp.minimum(ak, ck)
    a, c, g = (jnp.where(use_s, x, y) for x, y in ((as_, ak), (cs_, ck), (gs, gk)))
    # Hestenes: the rotation that makes columns i and j of B orthogonal (t = tan θ, |θ| ≤ π/4).
    # √a·√c and hypot: neither a·c nor ζ² may under- or overflow (Gram entries down to ~1e-300)
    tiny = jnp.abs(g) <= jnp.finfo(g.dtype).eps * (jnp.sqrt(a) * jnp.sqrt(c))
    zeta = (c - a) / (2.0 * jnp.where(tiny, 1.0, g))
    t = jnp.sign(zeta) / (jnp.abs(zeta) + jnp.hypot(1.0, zeta))
    t = jnp.where(tiny, 0.0, jnp.where(zeta == 0, 1.0, t))
    cos = 1.0 / jnp.sqrt(1.0 + t * t)
    sin = cos * t

    cos, sin = cos[None, :], sin[None, :]

    def apply(x):
        u, v = x[:, i], x[:, j]
        return x.at[:, i].set(cos * u - sin * v).at[:, j].set(sin * u + cos * v)

    return apply(p), apply(bk), apply(bs)


def refine(p: Array, bk: Array, bs: Array) -> tuple[Array, Array, Array]:
    """Jacobi-rotate the columns of (P̃, B_K, B_Σ) until the Grams of B_K and B_Σ are diagonal.

    Converged when every pair's relative off-diagonal entry is ≤ D·eps, or after MAX_SWEEPS sweeps.
    """
    D = p.shape[1]
    if D < 2:
        return p, bk, bs
    n = D + D % 2
    if n != D:  # an odd D gets a zero column, which no rotation touches (its Gram diagonal is 0)
        pad = [(0, 0), (0, 1)]
        p, bk, bs = (jnp.pad(x, pad) for x in (p, bk, bs))
    schedule = jnp.asarray(_round_robin(n))
    tol = D * float(jnp.finfo(p.dtype).eps)

    def sweep(state):
        k, p, bk, bs = state
        p, bk, bs = jax.lax.fori_loop(0, n - 1, lambda r, x: _rotate_round(schedule[r], *x), (p, bk, bs))
        return k + 1, p, bk, bs

    def not_done(state):
        k, _, bk, bs = state
        return (k < MAX_SWEEPS) & (_off_diagonal(bk, bs) > tol)

    _, p, bk, bs = jax.lax.while_loop(not_done, sweep, (jnp.zeros((), jnp.int32), p, bk, bs))
    return p[:, :D], bk[:, :D], bs[:, :D]
