r"""Stationary kernels over one input (time) for M, and sums and products of them with amplitudes.

Each base kernel is a function of (x1 (N,), x2 (P,), parameters) returning the (N, P) matrix
k(x1_i, x2_j) with k(x, x) = 1; r = |x1 - x2| / ℓ:

* ``rbf``: exp(-r²/2)
* ``matern12``: exp(-r)
* ``matern32``: (1 + √3 r) exp(-√3 r)
* ``matern52``: (1 + √5 r + 5r²/3) exp(-√5 r)
* ``periodic``: exp(-2 sin²(π |x1 - x2| / p) / ℓ²), period p

:func:`parse` reads an expression such as ``"matern32 + periodic * rbf"`` (``*`` binds tighter
than ``+``; ``periodic(365.25)`` fixes the period instead of fitting it) into a :class:`Kernel`:
a sum of terms, each term a product of base kernels with one amplitude. All parameters are
logs (log lengthscales, log periods, log amplitudes), so any real value is valid, and every
kernel is a plain JAX function of them: differentiate with ``jax.grad`` as usual (no
eigendecomposition is involved).

>>> import jax.numpy as jnp
>>> from kronlik import kernels
>>> k = kernels.parse("matern32 + periodic")
>>> params = k.init_params(lengthscale=0.5, period=1.0)
>>> M = k(params, jnp.linspace(0.0, 3.0, 5))
>>> M.shape, float(M[0, 0])  # amplitudes start at 1/2 each: k(x, x) = 1
((5, 5), 1.0)
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._checks import default_floating_dtype

Array = jax.Array

__all__ = ["Kernel", "matern12", "matern32", "matern52", "parse", "periodic", "rbf", "BASE_KERNELS"]


def _scaled_distance(x1: Array, x2: Array, lengthscale) -> Array:
    return jnp.abs(x1[:, None] - x2[None, :]) / lengthscale


def rbf(x1: Array, x2: Array, lengthscale) -> Array:
    """exp(-r²/2), r = |x1 - x2| / ℓ: (N, P)."""
    r = _scaled_distance(x1, x2, lengthscale)
    return jnp.exp(-0.5 * r * r)


def matern12(x1: Array, x2: Array, lengthscale) -> Array:
    """exp(-r) (Ornstein-Uhlenbeck): (N, P)."""
    return jnp.exp(-_scaled_distance(x1, x2, lengthscale))


def matern32(x1: Array, x2: Array, lengthscale) -> Array:
    """(1 + √3 r) exp(-√3 r): (N, P)."""
    r = math.sqrt(3.0) * _scaled_distance(x1, x2, lengthscale)
    return (1.0 + r) * jnp.exp(-r)


def matern52(x1: Array, x2: Array, lengthscale) -> Array:
    """(1 + √5 r + 5r²/3) exp(-√5 r): (N, P)."""
    r = math.sqrt(5.0) * _scaled_distance(x1, x2, lengthscale)
    return (1.0 + r + r * r / 3.0) * jnp.exp(-r)


def periodic(x1: Array, x2: Array, lengthscale, period) -> Array:
    """exp(-2 sin²(π |x1 - x2| / p) / ℓ²): (N, P)."""
    s = jnp.sin(math.pi * jnp.abs(x1[:, None] - x2[None, :]) / period) / lengthscale
    return jnp.exp(-2.0 * s * s)


BASE_KERNELS: dict[str, Callable] = {
    "rbf": rbf,
    "matern12": matern12,
    "matern32": matern32,
    "matern52": matern52,
    "periodic": periodic,
}


class Component(NamedTuple):
    """One base kernel in an expression; ``period`` is a fixed period or None (fitted)."""

    name: str
    period: float | None = None


@dataclass(frozen=True)
class Kernel:
    """A sum of terms, each a product of base kernels times an amplitude exp(log_amplitude).

    Parameters (a dict of arrays, as :meth:`init_params` makes it):
    ``log_lengthscale`` (one per component, in reading order), ``log_period`` (one per
    periodic component without a fixed period), ``log_amplitude`` (one per term). Not a
    pytree: close over it (it is static), pass the parameters.
    """

    terms: tuple[tuple[Component, ...], ...]
    spec: str

    def components(self) -> list[Component]:
        return [c for term in self.terms for c in term]

    def fixed_periods(self) -> list[float]:
        """The fixed periods of the expression (``periodic(p)``), in reading order."""
        return [c.period for c in self.components() if c.period is not None]

    def num_free_periods(self) -> int:
        return sum(c.name == "periodic" and c.period is None for c in self.components())

    def init_params(self, lengthscale: float = 1.0, period: float = 1.0, dtype=None) -> dict[str, Array]:
        """Starting parameters: every lengthscale and free period as given, amplitudes 1/(terms)."""
        n_comp, n_terms = len(self.components()), len(self.terms)
        dtype = dtype or default_floating_dtype()
        return {
            "log_lengthscale": jnp.full(n_comp, math.log(lengthscale), dtype),
            "log_period": jnp.full(self.num_free_periods(), math.log(period), dtype),
            "log_amplitude": jnp.full(n_terms, -math.log(n_terms), dtype),
        }

    def __call__(self, params: dict[str, Array], x1: Array, x2: Array | None = None) -> Array:
        """k(x1_i, x2_j), shape (N, P) (x2 defaults to x1)."""
        x2 = x1 if x2 is None else x2
        ell = jnp.exp(params["log_lengthscale"])
        periods = jnp.exp(params["log_period"])
        total, c, f = None, 0, 0
        for t, term in enumerate(self.terms):
            product = jnp.exp(params["log_amplitude"][t])
            for comp in term:
                if comp.name == "periodic":
                    p = periods[f] if comp.period is None else comp.period
                    f += comp.period is None
                    product = product * periodic(x1, x2, ell[c], p)
                else:
                    product = product * BASE_KERNELS[comp.name](x1, x2, ell[c])
                c += 1
            total = product if total is None else total + product
        return total

    def describe(self, params: dict[str, Array]) -> list[str]:
        """One line per term: its amplitude and each component's lengthscale (and period)."""
        ell = [float(v) for v in jnp.exp(params["log_lengthscale"])]
        periods = [float(v) for v in jnp.exp(params["log_period"])]
        lines, c, f = [], 0, 0
        for t, term in enumerate(self.terms):
            parts = []
            for comp in term:
                text = f"{comp.name}(lengthscale {ell[c]:.4g}"
                if comp.name == "periodic":
                    p = periods[f] if comp.period is None else comp.period
                    f += comp.period is None
                    text += f", period {p:.4g}" + (" fixed" if comp.period is not None else "")
                parts.append(text + ")")
                c += 1
            lines.append(f"{float(jnp.exp(params['log_amplitude'][t])):.4g} × " + " * ".join(parts))
        return lines


MAX_COMPONENTS = 32  # an expression is compiled into one program: a bound keeps that fast

_TOKEN = re.compile(r"\s*([a-z0-9]+)(?:\(\s*([^)]*?)\s*\))?\s*$")


def parse(spec: str) -> Kernel:
    """A :class:`Kernel` from an expression like ``"matern32 + periodic(1.0) * rbf"``.

    Raises ``ValueError`` naming the part it cannot read and the kernels it knows.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a kernel expression is a non-empty string like 'matern32 + periodic'; got {spec!r}")
    if spec.count("+") + spec.count("*") >= MAX_COMPONENTS:
        raise ValueError(f"kernel {spec[:60]!r}...: more than {MAX_COMPONENTS} base kernels")
    terms = []
    for term_text in spec.split("+"):
        comps = []
        for factor in term_text.split("*"):
            m = _TOKEN.match(factor)
            name = m.group(1) if m else None
            if m is None or name not in BASE_KERNELS:
                raise ValueError(
                    f"kernel {spec!r}: cannot read {factor.strip()!r}; known kernels: {', '.join(BASE_KERNELS)} "
                    "(combined with + and *, e.g. 'matern32 + periodic(365.25)')"
                )
            period = None
            if m.group(2) is not None:
                if name != "periodic":
                    raise ValueError(f"kernel {spec!r}: only periodic takes an argument (its fixed period)")
                try:
                    period = float(m.group(2))
                except ValueError:
                    period = math.nan
                if not (math.isfinite(period) and period > 0):
                    raise ValueError(f"kernel {spec!r}: the period must be a positive number; got {m.group(2)!r}")
                if period < sys.float_info.min:  # subnormal: 1/p overflows, π|x|/p is inf and k NaN
                    raise ValueError(
                        f"kernel {spec!r}: {factor.strip()!r}: the period {period:g} is too small to compute with "
                        f"(below {sys.float_info.min:g}, the smallest normal float64)"
                    )
            comps.append(Component(name, period))
        terms.append(tuple(comps))
    return Kernel(tuple(terms), spec.strip())
