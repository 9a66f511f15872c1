r"""State-space kernels over time, and the form of M they give: exact likelihoods in O(T).

A stationary kernel k(τ) with a finite state-space representation is the covariance of
f(t) = hᵀ x(t) for a linear SDE dx = F x dt + L dβ started in its stationary law N(0, P∞):

    k(t - t') = hᵀ A(t - t') P∞ h  (t ≥ t'),   A(τ) = exp(F τ),

so over sorted times t_1 ≤ … ≤ t_T, x_i = A_i x_{i-1} + q_i with A_i = A(t_i - t_{i-1}) and
q_i ~ N(0, Q_i), Q_i = P∞ - A_i P∞ A_iᵀ. Each term below is a small NamedTuple of its
parameters (a pytree: ``jax.grad`` returns a term of the same type), with

* ``state_size`` J, ``observation()`` h (J,), ``stationary()`` P∞ (J, J);
* ``transition(dt)`` A(τ) for an array of gaps τ ≥ 0, shape (..., J, J);
* ``covariance(tau)`` k(τ) in closed form, for the dense reference and the tests.

Matérn states are kept in derivative units scaled by λ (x̃_k = f⁽ᵏ⁾/λᵏ), so A depends on λτ only
and P∞ has entries of order σ² whatever the lengthscale. ``a + b`` is the sum of two kernels
(block-diagonal state), ``a * b`` the product (Kronecker state, J = J_a J_b).

:class:`StateSpace` (times, kernel) is a form of M (:mod:`kronlik.forms`) with
M_ik = k(t_i - t_k): wherever kronlik takes M it takes this, and the likelihood, its gradients
(in Y, K, Σ, log-variances, every kernel parameter and the times) and solves run through Kalman
recursions on the D scalar problems κ_j M + ν_j I of the pencil (``kronlik._kalman``): O(T J² D)
time and O(T J² D) memory, no T×T matrix. The recursions run as sequential scans on a CPU and
as associative scans of O(log T) depth on accelerators (``StateSpace(..., scan=...)``,
:func:`scan_method`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._kalman import checked_scan, scan_method

Array = jax.Array

__all__ = ["Matern12", "Matern32", "Matern52", "SHO", "Sum", "Product", "StateSpace", "scan_method"]


def _add(self, other):
    """``k1 + k2``: the sum of two kernels (a NamedTuple's + would concatenate tuples)."""
    return Sum((*_terms(self, Sum), *_terms(other, Sum)))


def _mul(self, other):
    """``k1 * k2``: the product of two kernels."""
    return Product(self, other)


def _terms(kernel, kind) -> tuple:
    return kernel.terms if isinstance(kernel, kind) else (kernel,)


def _positive(x: Array) -> Array:
    """Whether a parameter is finite and > 0 (the kernel is NaN otherwise)."""
    return jnp.isfinite(x) & (x > 0)


def _matern_transition(x: Array, n: np.ndarray) -> Array:
    """e^{-x} Σ_k xᵏ Ñᵏ / k! for the nilpotent Ñ of a Matérn state (x = λτ ≥ 0), shape (..., J, J)."""
    J = n.shape[0]
    lead = (1,) * x.ndim
    xx = x[..., None, None]
    out = jnp.broadcast_to(jnp.eye(J, dtype=x.dtype).reshape(lead + (J, J)), x.shape + (J, J))
    power, fact = np.eye(J), 1.0
    for k in range(1, J):
        power, fact = power @ n, fact * k
        out = out + (xx**k / fact) * jnp.asarray(power, x.dtype).reshape(lead + (J, J))
    return jnp.exp(-x)[..., None, None] * out


# Ñ = D⁻¹ (F + λI) D / λ in the scaled state, D = diag(1, λ, λ², ...): F + λI is nilpotent
# because the Matérn-(J-½) generator has the single eigenvalue -λ of multiplicity J.
_N32 = np.array([[1.0, 1.0], [-1.0, -1.0]])
_N52 = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [-1.0, -3.0, -2.0]])
_P52 = np.array([[1.0, 0.0, -1.0 / 3.0], [0.0, 1.0 / 3.0, 0.0], [-1.0 / 3.0, 0.0, 1.0]])


class _Matern(NamedTuple):
    """The fields and checks the Matérn kernels share (each subclass adds its state-space form)."""

    __add__ = _add
    __mul__ = _mul

    amplitude: Array
    lengthscale: Array

    def valid(self) -> Array:
        return _positive(self.lengthscale) & jnp.isfinite(self.amplitude) & (self.amplitude >= 0)


class Matern12(_Matern):
    """k(τ) = σ² exp(-τ/ℓ) (Ornstein-Uhlenbeck), J = 1; ``amplitude`` σ², ``lengthscale`` ℓ."""

    state_size = 1

    def observation(self) -> np.ndarray:
        return np.ones(1)

    def stationary(self) -> Array:
        return jnp.reshape(self.amplitude, (1, 1))

    def transition(self, dt: Array) -> Array:
        return jnp.exp(-dt / self.lengthscale)[..., None, None]

    def covariance(self, tau: Array) -> Array:
        return self.amplitude * jnp.exp(-jnp.abs(tau) / self.lengthscale)


class Matern32(_Matern):
    """k(τ) = σ² (1 + √3 τ/ℓ) exp(-√3 τ/ℓ), J = 2; ``amplitude`` σ², ``lengthscale`` ℓ."""

    state_size = 2

    def observation(self) -> np.ndarray:
        return np.array([1.0, 0.0])

    def stationary(self) -> Array:
        return self.amplitude * jnp.eye(2, dtype=jnp.result_type(self.amplitude))

    def transition(self, dt: Array) -> Array:
        return _matern_transition(math.sqrt(3.0) * dt / self.lengthscale, _N32)

    def covariance(self, tau: Array) -> Array:
        r = math.sqrt(3.0) * jnp.abs(tau) / self.lengthscale
        return self.amplitude * (1.0 + r) * jnp.exp(-r)


class Matern52(_Matern):
    """k(τ) = σ² (1 + √5 τ/ℓ + 5τ²/(3ℓ²)) exp(-√5 τ/ℓ), J = 3; ``amplitude`` σ², ``lengthscale`` ℓ."""

    state_size = 3

    def observation(self) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0])

    def stationary(self) -> Array:
        return self.amplitude * jnp.asarray(_P52, jnp.result_type(self.amplitude))

    def transition(self, dt: Array) -> Array:
        return _matern_transition(math.sqrt(5.0) * dt / self.lengthscale, _N52)

    def covariance(self, tau: Array) -> Array:
        r = math.sqrt(5.0) * jnp.abs(tau) / self.lengthscale
        return self.amplitude * (1.0 + r + r * r / 3.0) * jnp.exp(-r)


def _sho_parts(tau: Array, omega: Array, quality: Array) -> tuple[Array, Array]:
    r"""(e^{-fτ} C, e^{-fτ} S) with f = ω/(2Q), d = ω² - f², z = dτ²:
    C = cos √z, S = τ sin(√z)/√z (cosh and sinh for z < 0), so exp(F̃τ) = e^{-fτ}(C I + S (F̃ + f I)).

    Every branch is evaluated on a safe argument (``where`` on both sides), so no branch that is
    not taken puts a NaN into a gradient; near z = 0 a Taylor series avoids 0/0.
    """
    f = omega / (2.0 * quality)
    d = (omega - f) * (omega + f)
    z = d * tau * tau
    decay = jnp.exp(-f * tau)
    small = jnp.abs(z) < 1e-2
    zs = jnp.where(small, z, 0.0)
    c_small = 1.0 - zs / 2.0 + zs * zs / 24.0 - zs**3 / 720.0 + zs**4 / 40320.0
    s_small = 1.0 - zs / 6.0 + zs * zs / 120.0 - zs**3 / 5040.0 + zs**4 / 362880.0
    zp = jnp.where(~small & (z > 0), z, 1.0)
    rp = jnp.sqrt(zp)
    c_pos, s_pos = jnp.cos(rp), jnp.sin(rp) / rp
    # z < 0 (overdamped): with q = √(-d), e^{-fτ} cosh(qτ) = (e^{-(f-q)τ} + e^{-(f+q)τ})/2, and
    # f - q = ω²/(f + q) without cancellation; qτ ≥ 0.1 here, so sinh needs no series.
    # q from d directly (not √(-z)/τ, whose τ-derivative cancels: the hostile check's ∂t at Q ≪ ½).
    q = jnp.sqrt(jnp.where(d < 0, -d, 1.0))
    slow = jnp.exp(-(omega * omega / (f + q)) * tau)
    fast = jnp.exp(-(f + q) * tau)
    c_neg = 0.5 * (slow + fast)
    s_neg = 0.5 * (slow - fast) / q
    ec = jnp.where(small, decay * c_small, jnp.where(z > 0, decay * c_pos, c_neg))
    es = jnp.where(small, decay * tau * s_small, jnp.where(z > 0, decay * tau * s_pos, s_neg))
    return ec, es


class SHO(NamedTuple):
    r"""A stochastically driven damped harmonic oscillator (celerite's SHOTerm), J = 2.

    k(τ) = σ² e^{-fτ} (C(τ) + f S(τ)) with f = ω₀/(2Q), C, S as in :func:`_sho_parts`
    (cos/sin for Q > ½, cosh/sinh for Q < ½, and the critically damped limit in between);
    ``amplitude`` σ² = k(0) (celerite's S₀ω₀Q), ``frequency`` ω₀, ``quality`` Q. The state is
    (f, f'/ω₀), with P∞ = σ² I.
    """

    __add__ = _add
    __mul__ = _mul

    amplitude: Array
    frequency: Array
    quality: Array

    state_size = 2

    def observation(self) -> np.ndarray:
        return np.array([1.0, 0.0])

    def stationary(self) -> Array:
        return self.amplitude * jnp.eye(2, dtype=jnp.result_type(self.amplitude))

    def transition(self, dt: Array) -> Array:
        w, f = self.frequency, self.frequency / (2.0 * self.quality)
        ec, es = _sho_parts(dt, w, self.quality)
        # exp(F̃τ) for F̃ = [[0, ω], [-ω, -2f]] (scaled state): e^{-fτ}(C I + S (F̃ + f I)).
        row0 = jnp.stack([ec + f * es, w * es], axis=-1)
        row1 = jnp.stack([-w * es, ec - f * es], axis=-1)
        return jnp.stack([row0, row1], axis=-2)

    def covariance(self, tau: Array) -> Array:
        ec, es = _sho_parts(jnp.abs(tau), self.frequency, self.quality)
        return self.amplitude * (ec + self.frequency / (2.0 * self.quality) * es)

    def valid(self) -> Array:
        return (
            _positive(self.frequency) & _positive(self.quality) & jnp.isfinite(self.amplitude) & (self.amplitude >= 0)
        )


def _block_diag(blocks: list[Array]) -> Array:
    """Block-diagonal of (..., J_i, J_i) arrays with a common batch shape."""
    batch = jnp.broadcast_shapes(*(b.shape[:-2] for b in blocks))
    n = sum(b.shape[-1] for b in blocks)
    out = jnp.zeros((*batch, n, n), blocks[0].dtype)
    i = 0
    for b in blocks:
        j = b.shape[-1]
        out = out.at[..., i : i + j, i : i + j].set(jnp.broadcast_to(b, (*batch, j, j)))
        i += j
    return out


def _kron(a: Array, b: Array) -> Array:
    """Kronecker product of the last two axes, batched."""
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    s = out.shape
    return out.reshape(*s[:-4], s[-4] * s[-3], s[-2] * s[-1])


class Sum(NamedTuple):
    """k = Σ_i k_i (write ``k1 + k2``): the state is the k_i's states side by side."""

    __add__ = _add
    __mul__ = _mul

    terms: tuple

    @property
    def state_size(self) -> int:
        return sum(t.state_size for t in self.terms)

    def observation(self) -> np.ndarray:
        return np.concatenate([t.observation() for t in self.terms])

    def stationary(self) -> Array:
        return _block_diag([t.stationary() for t in self.terms])

    def transition(self, dt: Array) -> Array:
        return _block_diag([t.transition(dt) for t in self.terms])

    def covariance(self, tau: Array) -> Array:
        return sum(t.covariance(tau) for t in self.terms)

    def valid(self) -> Array:
        return jnp.all(jnp.stack([t.valid() for t in self.terms]))


class Product(NamedTuple):
    """k = k_a k_b (write ``k1 * k2``): the state is the Kronecker product, J = J_a J_b."""

    __add__ = _add
    __mul__ = _mul

    left: object
    right: object

    @property
    def state_size(self) -> int:
        return self.left.state_size * self.right.state_size

    def observation(self) -> np.ndarray:
        return np.kron(self.left.observation(), self.right.observation())

    def stationary(self) -> Array:
        return _kron(self.left.stationary(), self.right.stationary())

    def transition(self, dt: Array) -> Array:
        return _kron(self.left.transition(dt), self.right.transition(dt))

    def covariance(self, tau: Array) -> Array:
        return self.left.covariance(tau) * self.right.covariance(tau)

    def valid(self) -> Array:
        return self.left.valid() & self.right.valid()


KERNELS = (Matern12, Matern32, Matern52, SHO, Sum, Product)
# P∞ / amplitude for each single term (the amplitude is multiplied in last: see _process_noise)
_UNIT_STATIONARY = {Matern12: np.eye(1), Matern32: np.eye(2), Matern52: _P52, SHO: np.eye(2)}


def _process_noise(kernel, dt: Array) -> Array:
    """Q(τ) = P∞ - A(τ) P∞ A(τ)ᵀ, shape (..., J, J), with each term's amplitude multiplied last.

    Not P∞ - A P∞ Aᵀ of the whole kernel: its reverse mode would sum the amplitude's cotangent as
    Σ_i Q̄_i - Σ_i A_iᵀ Q̄_i A_i over all steps, two sums that cancel where A_i ≈ I (dense times,
    long lengthscales: 1e-8 relative at T = 2,000). A product uses
    Q_ab = Q_a ⊗ P_b + P_a ⊗ Q_b - Q_a ⊗ Q_b, the same identity on its factors.
    """
    if isinstance(kernel, Sum):
        return _block_diag([_process_noise(t, dt) for t in kernel.terms])
    if isinstance(kernel, Product):
        qa, qb = _process_noise(kernel.left, dt), _process_noise(kernel.right, dt)
        lead = (1,) * dt.ndim
        pa, pb = (k.stationary().reshape(lead + k.stationary().shape) for k in (kernel.left, kernel.right))
        return _kron(qa, pb) + _kron(pa, qb) - _kron(qa, qb)
    unit = jnp.asarray(_UNIT_STATIONARY[type(kernel)], dt.dtype)
    a = kernel.transition(dt)
    unit = unit.reshape((1,) * dt.ndim + unit.shape)
    return kernel.amplitude * (unit - a @ unit @ jnp.swapaxes(a, -1, -2))


def _kernel_leaves(kernel) -> list[Array]:
    return jax.tree_util.tree_leaves(kernel)


class Generators(NamedTuple):
    """The recursion's inputs over sorted times: A_i, Q_i/κ, h, and the sort."""

    order: Array  # (T,) int: the user's row of the i-th sorted time
    a: Array  # (T, J, J) A_i (A_1 = 0: the first state is drawn from P∞)
    q: Array  # (T, J, J) P∞ - A_i P∞ A_iᵀ (Q_1 = P∞)
    h: np.ndarray  # (J,)
    p_inf: Array  # (J, J)


def generators(times: Array, kernel) -> Generators:
    """A_i and Q_i = P∞ - A_i P∞ A_iᵀ over the sorted times, as plain (differentiable) functions.

    Q_i is formed as that difference (per term, :func:`_process_noise`): its absolute error is
    ε‖P∞‖, a perturbation of M of relative size ε (the same order as forming M in floating
    point), symmetrised.
    """
    # Sorted input (the common case) skips the O(T log T) sort, a quarter of the value's time.
    ascending = jnp.all(times[1:] >= times[:-1])
    order = jax.lax.cond(ascending, lambda t: jnp.arange(t.shape[0]), lambda t: jnp.argsort(t, stable=True), times)
    t = times[order]
    dt = jnp.concatenate([jnp.zeros((1,), t.dtype), t[1:] - t[:-1]])
    p_inf = kernel.stationary()
    a = kernel.transition(dt)
    first = jnp.arange(t.shape[0]) == 0
    a = jnp.where(first[:, None, None], jnp.zeros((), a.dtype), a)
    q = jnp.where(first[:, None, None], p_inf[None], _process_noise(kernel, dt))
    q = 0.5 * (q + jnp.swapaxes(q, -1, -2))
    return Generators(order, a, q, kernel.observation(), p_inf)


@jax.tree_util.register_pytree_with_keys_class
class StateSpace:
    r"""M_ik = k(t_i - t_k) for a state-space kernel (:mod:`kronlik.statespace`) over 1-D times.

    Pass it wherever M is accepted. The complete-data likelihood, :func:`~kronlik.solve`, the
    gradient helpers and :func:`~kronlik.predict` then cost O(T J² D + D³) time and
    O(T J² D) memory (J the kernel's state size) instead of O(T³), exactly: the pencil of
    (K, Σ) splits U into D scalar problems κ_j M + ν_j I, each solved by a Kalman filter, and
    the gradients come from a hand-derived reverse recursion. ``times`` may be unsorted (they are
    sorted internally and every result is returned in the given order), irregular, and repeated.
    The gradient with respect to this form is a :class:`StateSpace` holding ∂L/∂times and the
    kernel's parameters' gradients.

    ``scan`` says how the recursions run: ``"sequential"`` (``lax.scan`` over the T steps, the
    fastest on a CPU), ``"parallel"`` (associative scans of O(log T) depth, for accelerators), or
    ``"auto"`` (the default: :func:`scan_method`, parallel unless JAX's default backend is the
    CPU). It is static (part of the pytree's structure, not a leaf), so a ``jax.jit``-compiled
    function traces each choice apart. Both give the same numbers up to rounding (on a CPU the
    parallel ones are slower; see the Scaling page).

    >>> import jax.numpy as jnp, kronlik
    >>> from kronlik.statespace import Matern32, StateSpace
    >>> t = jnp.array([0.0, 0.3, 1.1, 2.0])
    >>> M = StateSpace(t, Matern32(jnp.array(1.0), jnp.array(0.5)))
    >>> Y, K, s = jnp.ones((4, 2)), jnp.eye(2), jnp.zeros(2)
    >>> bool(jnp.isclose(kronlik.loglik_diag(Y, M, K, s), kronlik.loglik_diag(Y, M.dense(), K, s)))
    True
    >>> P = StateSpace(t, M.kernel, scan="parallel")
    >>> bool(jnp.isclose(kronlik.loglik_diag(Y, P, K, s), kronlik.loglik_diag(Y, M, K, s)))
    True
    """

    def __init__(self, times: Array, kernel, scan: str = "auto"):
        self.times = times  # (T,)
        self.kernel = kernel
        self.scan = checked_scan(scan, "StateSpace's scan")

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        return ((keys("times"), self.times), (keys("kernel"), self.kernel)), self.scan

    def tree_flatten(self):
        return (self.times, self.kernel), self.scan

    @classmethod
    def tree_unflatten(cls, scan, children):
        return cls(*children, scan)

    def __repr__(self) -> str:
        shape = getattr(self.times, "shape", "?")
        return f"StateSpace(times: {shape}, kernel={self.kernel!r}, scan={self.scan!r})"

    def recursions(self) -> str:
        """The recursions this form runs when traced now: ``"sequential"`` or ``"parallel"``."""
        return scan_method(self.scan)

    def _replace(self, **changes) -> StateSpace:
        """This form with ``times``, ``kernel`` or ``scan`` replaced (as when it was a NamedTuple)."""
        fields = {"times": self.times, "kernel": self.kernel, "scan": self.scan}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"StateSpace has no field {sorted(unknown)[0]!r} (times, kernel, scan)")
        return StateSpace(**{**fields, **changes})

    def like(self, times: Array, kernel) -> StateSpace:
        """A StateSpace of the same structure (``scan``) with these leaves (cotangents, subsets)."""
        return StateSpace(times, kernel, self.scan)

    def arrays(self) -> dict[str, Array]:
        leaves = _kernel_leaves(self.kernel)
        return {"M.times": self.times, **{f"M.kernel[{i}]": x for i, x in enumerate(leaves)}}

    def rebuild(self, arrays: list[Array]) -> StateSpace:
        """This form with its arrays replaced (in the order of :meth:`arrays`)."""
        treedef = jax.tree_util.tree_structure(self.kernel)
        return self.like(arrays[0], jax.tree_util.tree_unflatten(treedef, arrays[1:]))

    def check_shape(self, y_shape: tuple[int, int]) -> None:
        T = y_shape[0]
        if not isinstance(self.kernel, KERNELS):
            raise TypeError(
                f"StateSpace needs a state-space kernel ({', '.join(k.__name__ for k in KERNELS)}); "
                f"got {type(self.kernel).__name__}"
            )
        if self.times.shape != (T,):
            raise ValueError(
                f"a StateSpace M needs times of shape (T,) = ({T},) to match Y of shape {y_shape}; "
                f"got {self.times.shape}"
            )
        for x in _kernel_leaves(self.kernel):
            if x.shape != ():
                raise ValueError(f"kernel parameters must be scalars; got shape {x.shape}")

    def dense(self) -> Array:
        return self.kernel.covariance(self.times[:, None] - self.times[None, :])

    def variance(self) -> Array:
        """k(0), the diagonal of M (the balance α of the pencil)."""
        return self.kernel.covariance(jnp.zeros((), self.times.dtype))

    def valid(self) -> Array:
        return self.kernel.valid() & jnp.all(jnp.isfinite(self.times))

    def generators(self) -> Generators:
        return generators(self.times, self.kernel)

    # -- the eigenbasis protocol, for code that needs M's eigenbasis (O(T³): small T only) --
    def eigenbasis(self, eigh_dtype=None):
        from .forms import Dense

        return Dense(self.dense()).eigenbasis(eigh_dtype)

    def matmul(self, X: Array) -> Array:
        from ._kalman import matmul, recursions_of

        with recursions_of(self):
            return matmul(self.generators(), X)

    def trace(self) -> Array:
        return self.times.shape[0] * self.variance()

    def take(self, rows) -> StateSpace:
        return self.like(self.times[rows], self.kernel)

    linear = False
