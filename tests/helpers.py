"""Shared test helpers: problem generators, error measures and jaxpr walking."""

import jax.numpy as jnp
import numpy as np


def spd(rng: np.random.Generator, n: int, floor: float) -> np.ndarray:
    x = rng.standard_normal((n, n))
    return x @ x.T / n + floor * np.eye(n)


def random_problem(rng: np.random.Generator, T: int, D: int, dtype=jnp.float64, diag_noise=False):
    """A well-conditioned random (Y, M, K, Sigma): PSD M, K and SPD Sigma with eigenvalues ≳ 0.1."""
    Y = rng.standard_normal((T, D))
    M, K = spd(rng, T, 0.1), spd(rng, D, 0.1)
    Sigma = np.diag(rng.uniform(0.3, 2.0, D)) if diag_noise else spd(rng, D, 0.3)
    return tuple(jnp.asarray(a, dtype) for a in (Y, M, K, Sigma))


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def with_spectrum(rng: np.random.Generator, eigenvalues) -> np.ndarray:
    q = orthogonal(rng, len(eigenvalues))
    return (q * np.asarray(eigenvalues)) @ q.T


def max_rel(a, b) -> float:
    """max |a - b| / max |b| in float64 (the error measure used throughout the tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


def eqns(jaxpr):
    """Every equation of a jaxpr, recursing into every sub-jaxpr (pjit, custom_vjp/jvp, while, cond, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner)
