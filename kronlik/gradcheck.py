"""Three witnesses for every gradient: hand-derived, autodiff of the dense reference, finite differences."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, reference
from ._checks import default_floating_dtype
from ._validate import validate
from .information import fisher_information, hessian_log_var
from .reference import as_dense_arrays
from .structured import grad_log_var, grad_sigma, loglik

Array = jax.Array

ARGUMENTS = ("Y", "M", "K", "Sigma")

# Tolerances on the relative errors defined in `check_gradients`, keyed by the dtype of
# the structured computation and of the references. float64 against float64: both
# sides are backward stable, so errors are κ·eps ≈ 1e-13 on well-conditioned problems;
# 1e-8 leaves room for κ up to ~1e5. Central differences in float64 with h ≈ eps^(1/3)
# err by O(h²) + O(eps/h) ≈ 1e-10 of the scale. float32 against a float64 reference
# errs by κ·eps32 ≈ 1e-6..1e-5; float32 finite differences by eps32^(2/3) ≈ 2e-5 times
# the curvature, hence the looser last row.
_TOLERANCES = {
    ("float64", "float64"): {"value": 1e-10, "autodiff": 1e-8, "finite differences": 1e-6},
    ("float32", "float64"): {"value": 1e-4, "autodiff": 1e-3, "finite differences": 1e-3},
    ("float32", "float32"): {"value": 1e-4, "autodiff": 1e-3, "finite differences": 3e-2},
}


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: the relative error of ``argument``'s gradient against ``witness``."""

    argument: str
    witness: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """The result of :func:`check_gradients`; ``str(report)`` is a table."""

    shape: tuple[int, int]
    dtype: str
    reference_dtype: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def max_error(self, argument: str, witness: str) -> float:
        return max(c.error for c in self.checks if c.argument == argument and c.witness == witness)

    def __iter__(self) -> Iterator[Check]:
        return iter(self.checks)

    def __str__(self) -> str:
        head = f"T={self.shape[0]} D={self.shape[1]}  kronlik in {self.dtype}, references in {self.reference_dtype}"
        lines = [head, f"{'argument':<10} {'witness':<20} {'rel. error':>11} {'tolerance':>10}  result"]
        for c in self.checks:
            mark = "ok" if c.passed else "FAIL"
            lines.append(f"{c.argument:<10} {c.witness:<20} {c.error:>11.2e} {c.tolerance:>10.0e}  {mark}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _max_rel(a: Array, b: Array) -> float:
    """max |a - b| / max |b|: relative to the largest entry, so zero entries do not divide."""
    b = np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b)))
    err = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
    return err / scale if scale > 0 else err


def _direction(key: Array, like: Array, symmetric: bool) -> Array:
    d = jax.random.normal(key, like.shape, like.dtype)
    if symmetric:
        d = 0.5 * (d + d.T)
    return d / jnp.max(jnp.abs(d))


def check_gradients(
    Y: Array,
    M: Array,
    K: Array,
    Sigma: Array,
    *,
    seed: int = 0,
    num_directions: int = 3,
) -> GradientReport:
    """Compare the hand-derived gradients of :func:`kronlik.loglik` with two independent witnesses.

    For each argument (Y, M, K, Sigma):

    * autodiff: ``jax.grad(kronlik.reference.loglik)``, the dense Cholesky of U; error
      ``max|g - g_ref| / max|g_ref|``. Σ also gets ``kronlik.grad_sigma`` against the
      literal block-diagonal sums of ``kronlik.reference.grad_sigma``.
    * finite differences: central differences of the dense reference along
      ``num_directions`` random directions V (symmetric for M, K, Σ), error
      ``|⟨g, V⟩ - FD| / (‖g‖ ‖V‖)`` (relative to the largest possible directional
      derivative, so a direction orthogonal to g does not divide by zero).

    Second order: per argument, a Hessian-vector product along a random direction (in the
    range of a singular M or K, so that the steps stay valid) from kronlik's second-order rules
    against the same of the dense reference and central differences of the hand-derived
    gradient; :func:`kronlik.fisher_information` in every entry of M, K and Σ against
    ½ tr(U⁻¹UᵢU⁻¹Uⱼ) built densely; for a diagonal Σ also :func:`kronlik.hessian_log_var`
    against ``jax.hessian`` of the dense reference and central differences of
    :func:`kronlik.grad_log_var`.

    References run in float64 whenever ``jax_enable_x64`` is on (so a float32 kronlik
    is checked against float64 truth), otherwise in the inputs' dtype. Inputs are
    validated first (:func:`kronlik.validate`), so bad input raises ``ValueError``.
    Small problems only: the references build the (TD, TD) matrix.
    """
    validate(Y, M, K, Sigma)
    args = as_dense_arrays(Y, M, K, Sigma)
    dtype = args[0].dtype
    ref_dtype = default_floating_dtype()
    tol = _TOLERANCES[(dtype.name, ref_dtype.name)]
    ref_args = tuple(a.astype(ref_dtype) for a in args)

    # Each computation jit-compiled whole: eagerly, every primitive compiles as its own program.
    value, grads = jax.jit(jax.value_and_grad(loglik, argnums=(0, 1, 2, 3)))(*args)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference.loglik, argnums=(0, 1, 2, 3)))(*ref_args)
    checks = [Check("L", "value", _max_rel(value, ref_value), tol["value"])]
    for name, g, r in zip(ARGUMENTS, grads, ref_grads):
        checks.append(Check(name, "autodiff", _max_rel(g, r), tol["autodiff"]))
    checks.append(
        Check(
            "Sigma",
            "block sums",
            _max_rel(jax.jit(grad_sigma)(*args), jax.jit(reference.grad_sigma)(*ref_args)),
            tol["autodiff"],
        )
    )

    keys = jax.random.split(jax.random.PRNGKey(seed), 4 * num_directions).reshape(4, num_directions, -1)
    f_ref = jax.jit(reference.loglik)
    eps = float(jnp.finfo(ref_dtype).eps)
    for i, name in enumerate(ARGUMENTS):
        x = ref_args[i]
        g = grads[i].astype(ref_dtype)
        step = eps ** (1 / 3) * max(float(jnp.max(jnp.abs(x))), 1.0)
        worst = 0.0
        for key in keys[i]:
            v = _direction(key, x, symmetric=i > 0)
            plus = list(ref_args)
            minus = list(ref_args)
            plus[i] = x + step * v
            minus[i] = x - step * v
            fd = (f_ref(*plus) - f_ref(*minus)) / (2 * step)
            scale = float(jnp.linalg.norm(g) * jnp.linalg.norm(v))
            err = abs(float(jnp.vdot(g, v)) - float(fd))
            worst = max(worst, err / scale if scale > 0 else err)
        checks.append(Check(name, "finite differences", worst, tol["finite differences"]))

    checks.extend(_hessian_vector_checks(args, ref_args, tol, keys[:, 0]))
    checks.extend(_second_order_checks(args, ref_args, tol))
    checks.sort(key=lambda c: (("L", "Y", "M", "K", "Sigma", "Fisher", "log_var").index(c.argument), c.witness))
    return GradientReport(tuple(args[0].shape), dtype.name, ref_dtype.name, tuple(checks))


def _in_range(x: Array, v: Array) -> Array:
    """v projected onto the range of a PSD x, so that x ± h v stays PSD where x is singular."""
    lam, q = np.linalg.eigh(np.asarray(x, np.float64))
    # eigenvalues below 1e3·eps of the largest are zeros rounded (float32 rounding of a singular M)
    q = q[:, lam > 1e3 * float(jnp.finfo(x.dtype).eps) * max(float(np.max(np.abs(lam))), 1e-300)]
    return jnp.asarray(q @ (q.T @ np.asarray(v, np.float64) @ q) @ q.T, x.dtype)


def _hessian_vector_checks(args, ref_args, tol, keys) -> list[Check]:
    """Per argument, H v along a random direction v of it (in the range of a singular M or K):
    kronlik's second-order rule (``jax.jvp`` of ``jax.grad``) against the same of the dense
    reference, and against five-point central differences of kronlik's hand-derived gradient (in
    the references' dtype)."""
    ref_dtype = ref_args[0].dtype
    fd_args = list(ref_args)
    if ref_dtype != args[0].dtype:
        # float32 inputs in float64: a singular M or K rounded to float32 is indefinite by ~1e-8,
        # far beyond float64 round-off, so kronlik in float64 would (rightly) call it invalid;
        # difference at its PSD projection, a perturbation of the size of that rounding.
        for i in (1, 2):
            lam, q = np.linalg.eigh(np.asarray(fd_args[i], np.float64))
            fd_args[i] = jnp.asarray((q * np.maximum(lam, 0.0)) @ q.T, ref_dtype)
    directions = []
    for i, key in enumerate(keys):
        v = _direction(key, args[i], symmetric=i > 0)
        directions.append(_in_range(args[i], v) if i in (1, 2) else v)

    def hvps(fn, at, dirs):
        # one compiled program: the four directions (one argument moving in each) batched
        moving = [tuple(d if j == i else jnp.zeros_like(a) for j, a in enumerate(at)) for i, d in enumerate(dirs)]
        batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *moving)
        grads = jax.grad(fn, argnums=(0, 1, 2, 3))
        out = jax.jit(jax.vmap(lambda t: jax.jvp(lambda *a: grads(*a), tuple(at), t)[1]))(batch)
        return [out[i][i] for i in range(4)]

    ref_dirs = [d.astype(ref_dtype) for d in directions]
    got, want = hvps(loglik, args, directions), hvps(reference.loglik, ref_args, ref_dirs)
    grad_all = jax.jit(jax.grad(loglik, argnums=(0, 1, 2, 3)))
    # δ: validate's estimate, at least eps, at most 1 (inf where no digit of the gradient is reliable)
    delta = min(max(validate(*fd_args).gradient_error_bound, float(jnp.finfo(ref_dtype).eps)), 1.0)
    checks = []
    for i, name in enumerate(ARGUMENTS):
        checks.append(Check(name, "HVP autodiff", _max_rel(got[i], want[i]), tol["autodiff"]))
        x_ref, v_ref = fd_args[i], ref_dirs[i]
        if i in (1, 2):  # in the range to float64 round-off, not to the float32 rounding of v
            v_ref = _in_range(x_ref, v_ref)
        # five-point differences (truncation ∝ step⁴), the step balancing that against the
        # hand-derived gradients' own error δ/step (δ: validate's estimate, at least eps)
        step = delta ** (1 / 5) * max(float(jnp.max(jnp.abs(x_ref))), 1.0)
        if i > 0:  # M, K, Σ ± 2 step·v must stay PSD: a quarter of the smallest eigenvalue in range
            lam = np.linalg.eigvalsh(np.asarray(x_ref, np.float64))
            kept = lam[lam > 1e3 * float(jnp.finfo(args[i].dtype).eps) * max(float(np.max(np.abs(lam))), 1e-300)]
            step = min(step, 0.125 * float(np.min(kept)) / float(np.linalg.norm(np.asarray(v_ref), 2)))

        def grad(h, i=i, x_ref=x_ref, v_ref=v_ref):
            return grad_all(*fd_args[:i], x_ref + h * v_ref, *fd_args[i + 1 :])[i]

        fd = (8.0 * (grad(step) - grad(-step)) - (grad(2 * step) - grad(-2 * step))) / (12 * step)
        # relative to the larger of max|Hv| and what the differences can resolve, δ·max|g|/step
        floor = delta * float(jnp.max(jnp.abs(grad(0.0)))) / step
        err = float(np.max(np.abs(np.asarray(got[i], np.float64) - np.asarray(fd, np.float64))))
        scale = max(float(np.max(np.abs(np.asarray(fd, np.float64)))), floor)
        checks.append(Check(name, "HVP fin. diff.", err / scale if scale > 0 else err, tol["finite differences"]))
    return checks


def _second_order_checks(args, ref_args, tol) -> list[Check]:
    """The Fisher information in every entry of M, K, Σ against ½ tr(U⁻¹UᵢU⁻¹Uⱼ) built densely;
    for a diagonal Σ, the Hessian in s = log diag Σ against jax.hessian of the dense reference
    and central differences of the hand-derived gradient (:func:`kronlik.grad_log_var`)."""
    Y, M, K, Sigma = args
    ref_dtype = ref_args[0].dtype

    def cov_fn(p):
        return p[0], p[1], p[2]

    fisher = jax.jit(lambda p: fisher_information(cov_fn, p))((M, K, Sigma))
    dense_fisher = jax.jit(lambda p: reference.fisher_information(cov_fn, p))(ref_args[1:])
    checks = [Check("Fisher", "dense formula", _max_rel(fisher, dense_fisher), tol["autodiff"])]
    if not bool(jnp.all(Sigma == jnp.diag(jnp.diagonal(Sigma)))):
        return checks
    s = jnp.log(jnp.diagonal(Sigma))
    hess = jax.jit(hessian_log_var)(Y, M, K, s)
    y, m, k, s_ref = ref_args[0], ref_args[1], ref_args[2], s.astype(ref_dtype)
    dense_hess = jax.jit(jax.hessian(lambda q: reference.loglik(y, m, k, jnp.diag(jnp.exp(q)))))(s_ref)
    checks.append(Check("log_var", "Hessian autodiff", _max_rel(hess, dense_hess), tol["autodiff"]))
    step = float(jnp.finfo(s.dtype).eps) ** (1 / 3)
    grad = jax.jit(grad_log_var)
    columns = [
        (grad(Y, M, K, s + step * e) - grad(Y, M, K, s - step * e)) / (2 * step)
        for e in jnp.eye(s.shape[0], dtype=s.dtype)
    ]
    fd = jnp.stack(columns, axis=1)
    checks.append(Check("log_var", "Hessian fin. diff.", _max_rel(hess, fd), tol["finite differences"]))
    return checks


def demo_problems(dtype=None) -> dict[str, tuple[Array, Array, Array, Array]]:
    """Small built-in problems (Y, M, K, Sigma) for :func:`check_gradients` and the CLI.

    ``smooth``: an RBF kernel over time for M (nearly repeated tiny eigenvalues), a
    random PSD K and a random SPD Σ. ``degenerate``: M = I, K = 2I, Σ = 0.5 I, every
    eigenvalue repeated. ``low-rank``: M = GGᵀ of rank 2 and K = hhᵀ of rank 1, both
    singular, with a diagonal Σ.
    """
    dtype = default_floating_dtype() if dtype is None else np.dtype(dtype)
    rng = np.random.default_rng(20260126)

    def spd(n: int, floor: float) -> np.ndarray:
        x = rng.standard_normal((n, n))
        return x @ x.T / n + floor * np.eye(n)

    t = np.linspace(0.0, 1.0, 12)
    m_smooth = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.3)) + 1e-3 * np.eye(12)
    g = rng.standard_normal((10, 2))
    h = rng.standard_normal((3, 1))
    problems = {
        "smooth": (rng.standard_normal((12, 5)), m_smooth, spd(5, 0.1), spd(5, 0.5)),
        "degenerate": (rng.standard_normal((8, 4)), np.eye(8), 2.0 * np.eye(4), 0.5 * np.eye(4)),
        "low-rank": (rng.standard_normal((10, 3)), g @ g.T, h @ h.T, np.diag([0.3, 1.0, 2.0])),
    }
    return {k: tuple(jnp.asarray(a, dtype) for a in v) for k, v in problems.items()}
