"""Trace-time input checks shared by the structured and the dense code.

Everything here looks only at shapes and dtypes, so it runs while tracing under
``jax.jit``/``jax.vmap`` and raises before any computation is staged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class EighFactor(NamedTuple):
    """M = vectors @ diag(values) @ vectors.T, as :func:`kronlik.factorize` returns it.

    A pytree: pass it wherever an M is accepted to skip the O(T³) eigendecomposition
    of a fixed M (in a fitting loop, or for many Y), and differentiate with respect to
    its two arrays if you parametrise M by them.
    """

    vectors: Array  # (T, T), orthonormal columns
    values: Array  # (T,), non-negative; NaN if the M it came from was not PSD


def default_floating_dtype() -> np.dtype:
    """float64 when ``jax_enable_x64`` is on, float32 otherwise."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def as_float_arrays(names: tuple[str, ...], values: tuple) -> tuple[Array, ...]:
    """Convert to JAX arrays that share one real floating dtype, or raise ``TypeError``.

    kronlik does not promote: integer, boolean or complex inputs and a mix of float32
    and float64 are refused with the dtypes named, because a silent cast is the kind of
    thing that makes a float64 gradient check quietly run in float32.
    """
    arrays = tuple(jnp.asarray(v) for v in values)
    bad = [f"{n} {a.dtype}" for n, a in zip(names, arrays) if not jnp.issubdtype(a.dtype, jnp.floating)]
    if bad:
        raise TypeError(
            "kronlik needs real floating-point inputs; got "
            + ", ".join(bad)
            + " (cast with .astype(jnp.float32) or .astype(jnp.float64) first)"
        )
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise TypeError(
            "kronlik needs all inputs in one floating dtype; got "
            + ", ".join(f"{n} {a.dtype}" for n, a in zip(names, arrays))
        )
    return arrays


class LowRank(NamedTuple):
    """M = G Gᵀ given by its (T, r) factor G, typically r ≪ T (markers, inducing features).

    Pass it wherever an M is accepted by :func:`kronlik.loglik` and
    :func:`kronlik.loglik_diag` (and the gradient helpers): the likelihood then costs
    O(T r² + r³ + D³ + T D (r + D)) time and O(T (r + D)) memory, and its gradient with
    respect to the LowRank is LowRank(∂L/∂G).
    """

    factor: Array  # (T, r)


def check_shapes(Y: Array, M, K: Array, noise: Array, noise_name: str) -> None:
    """Raise ``ValueError`` unless Y is (T, D), M (T, T), K (D, D) and the noise fits D.

    ``noise_name`` is ``"Sigma"`` (shape (D, D)) or ``"log_var"`` (shape (D,)).
    """
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D array of shape (T, D); got shape {Y.shape}")
    T, D = Y.shape
    if T == 0 or D == 0:
        raise ValueError(f"Y must have T >= 1 rows and D >= 1 columns; got shape {Y.shape}")
    if isinstance(M, LowRank):
        if M.factor.ndim != 2 or M.factor.shape[0] != T or M.factor.shape[1] == 0:
            raise ValueError(
                f"a LowRank M needs a factor G of shape (T, r) = ({T}, r >= 1) to match Y of shape "
                f"{Y.shape}; got {M.factor.shape}"
            )
    elif isinstance(M, EighFactor):
        if M.vectors.shape != (T, T) or M.values.shape != (T,):
            raise ValueError(
                f"an EighFactor for M must have vectors {(T, T)} and values {(T,)} to match Y of "
                f"shape {Y.shape}; got {M.vectors.shape} and {M.values.shape}"
            )
    elif M.shape != (T, T):
        raise ValueError(f"M must have shape (T, T) = {(T, T)} to match Y of shape {Y.shape}; got {M.shape}")
    if K.shape != (D, D):
        raise ValueError(f"K must have shape (D, D) = {(D, D)} to match Y of shape {Y.shape}; got {K.shape}")
    want = (D, D) if noise_name == "Sigma" else (D,)
    if noise.shape != want:
        raise ValueError(f"{noise_name} must have shape {want} to match Y of shape {Y.shape}; got {noise.shape}")


def prepare(Y, M, K, noise, noise_name: str = "Sigma") -> tuple:
    """Dtype conversion and shape checks in one call; M may be an EighFactor or a LowRank."""
    if isinstance(M, LowRank):
        Y, G, K, noise = as_float_arrays(("Y", "M.factor", "K", noise_name), (Y, M.factor, K, noise))
        M = LowRank(G)
    elif isinstance(M, EighFactor):
        Y, vectors, values, K, noise = as_float_arrays(
            ("Y", "M.vectors", "M.values", "K", noise_name), (Y, M.vectors, M.values, K, noise)
        )
        M = EighFactor(vectors, values)
    else:
        Y, M, K, noise = as_float_arrays(("Y", "M", "K", noise_name), (Y, M, K, noise))
    check_shapes(Y, M, K, noise, noise_name=noise_name)
    return Y, M, K, noise


def psd_rtol(n: int, dtype) -> float:
    """Relative size below which a negative eigenvalue of an n×n factor counts as round-off.

    A backward-stable symmetric eigensolver returns eigenvalues within about n·eps·‖A‖
    of the exact ones, and the matrix itself (a kernel matrix, a kinship estimate GGᵀ,
    a whitened K̃) carries rounding from how it was assembled. 100·max(n, 50)·eps is
    about 1e-12 in float64 for n ≤ 50 (growing with n) and 6e-4 in float32: PSD
    matrices built in floating point pass; a genuinely indefinite one (an eigenvalue of
    -1e-3·λ_max in float64, say) does not.
    """
    return 100.0 * max(n, 50) * float(jnp.finfo(dtype).eps)
