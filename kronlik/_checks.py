"""Trace-time input checks: dtypes and shapes, before any computation is staged.

Everything here looks only at shapes and dtypes, so it runs while tracing under
``jax.jit``/``jax.vmap`` and raises before anything is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._noise import FullNoise
from .forms import as_form

Array = jax.Array


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


def prepare(Y, M, K, noise, noise_model: type = FullNoise, y_name: str = "Y") -> tuple:
    """(Y, form of M, K, noise model) with one floating dtype and fitting shapes, or an exception.

    ``noise_model`` is :class:`FullNoise` (Σ of shape (D, D)) or :class:`LogVarNoise` (log_var
    of shape (D,)). M may be an array or any form in :mod:`kronlik.forms`.
    """
    form = as_form(M)
    m_arrays = form.arrays()
    names = (y_name, *m_arrays, "K", noise_model.name)
    Y, *rest = as_float_arrays(names, (Y, *m_arrays.values(), K, noise))
    *m_leaves, K, noise = rest
    form = form.rebuild(m_leaves) if hasattr(form, "rebuild") else type(form)(*m_leaves)
    if Y.ndim != 2:
        raise ValueError(f"{y_name} must be a 2-D array of shape (T, D); got shape {Y.shape}")
    T, D = Y.shape
    if T == 0 or D == 0:
        raise ValueError(f"{y_name} must have T >= 1 rows and D >= 1 columns; got shape {Y.shape}")
    form.check_shape(Y.shape)
    if K.shape != (D, D):
        raise ValueError(f"K must have shape (D, D) = {(D, D)} to match Y of shape {Y.shape}; got {K.shape}")
    want = noise_model.shape(D)
    if noise.shape != want:
        raise ValueError(f"{noise_model.name} must have shape {want} to match Y of shape {Y.shape}; got {noise.shape}")
    return Y, form, K, noise_model(noise)


def same_dtype(name: str, x, like: Array) -> Array:
    """x as an array of ``like``'s dtype, or ``TypeError`` (no promotion, as for the main inputs)."""
    (x,) = as_float_arrays((name,), (x,))
    if x.dtype != like.dtype:
        raise TypeError(f"{name} must be {like.dtype} like the other inputs; got {x.dtype}")
    return x


def check_eigh_dtype(eigh_dtype) -> str | None:
    """``eigh_dtype`` as a dtype name (hashable, static), or ``ValueError`` if it is not available."""
    if eigh_dtype is None:
        return None
    name = np.dtype(eigh_dtype).name
    if name not in ("float32", "float64"):
        raise ValueError(f"eigh_dtype must be None, 'float32' or 'float64'; got {eigh_dtype!r}")
    if np.dtype(jax.dtypes.canonicalize_dtype(name)).name != name:
        raise ValueError(
            f"eigh_dtype={name!r} needs jax.config.update('jax_enable_x64', True); kronlik never turns it on itself"
        )
    return name
