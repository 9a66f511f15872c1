"""State-space M (``kronlik.StateSpace``, Kalman recursions) against tinygp, celerite2, the eigh engine and GPyTorch.

The problem: vec(Y) ~ N(0, M ⊗ K + I_T ⊗ Σ), Y (T, D) standard normal, float64, M_ik = k(t_i - t_k)
for a Matérn-3/2 kernel (amplitude 1, lengthscale 5) over T random irregular sorted times (gaps
Exponential(1)), K random SPD, Σ = diag(exp(log_var)) with log_var uniform in [-1, 1].

For each (T, D) it times, jit'd, after a compile/warm-up call and with every result blocked on, the
median of up to --repeats calls (fewer once --budget seconds are spent):

* ``kronlik value``: ``kronlik.loglik_diag(Y, StateSpace(t, Matern32(σ², ℓ)), K, log_var)``;
* ``kronlik value+grad``: ``jax.value_and_grad`` of it in all four arguments (Y, the times and both
  kernel parameters, K, log_var);
* ``tinygp value`` / ``tinygp value+grad``: tinygp's ``QuasisepSolver`` (``kernels.quasisep.Matern32``,
  ``GaussianProcess(kernel, t, diag=ν).log_probability``), the complete-data floor: D SEPARATE calls
  of one jit'd function, one per column of the pencil's problems z_j ~ N(0, κ_j M + ν_j I) (Z = Y P,
  Pᵀ K P = diag(κ), Pᵀ Σ P = diag(ν), Pᵀ (αK + Σ) P = I, α = k(0)), so that
  Σ_j log p(z_j) - (T/2) log det(αK + Σ) is exactly kronlik's value and is checked to be; the
  gradient is ``jax.value_and_grad`` in (z_j, lengthscale, sigma, log ν_j) for each call. The pencil
  (a D×D eigenproblem) is formed once, outside the timing;
* ``celerite2 value``: celerite2's numpy interface (``terms.Matern32Term``, ``GaussianProcess.compute``
  + ``log_likelihood``), D separate calls; its Matern32Term is celerite's ε = 0.01 approximation of
  the Matérn-3/2 kernel, so it agrees to about 1e-5, not to round-off;
* ``celerite2.jax value`` / ``celerite2.jax value+grad``: the same through ``celerite2.jax`` (jit'd,
  grad in z_j, sigma, rho, log ν_j), D separate calls;
* ``eigh value`` / ``eigh value+grad``: kronlik's eigh engine, ``loglik_diag`` with the dense T×T M
  (``StateSpace(...).dense()`` inside the function, so the gradients are in the same arguments), for
  T ≤ --dense-max-T and the sizes in --dense-extra;
* ``gpytorch value`` / ``gpytorch value+grad``: as in ``benchmarks/run.py``, linear_operator's
  ``KroneckerProductLinearOperator(M, K)`` + Kronecker-diagonal noise under ``max_cholesky_size(0)``,
  M formed in torch from (t, σ², ℓ), autograd in (σ², ℓ, K, log_var), same sizes as the eigh engine.

Every time is recorded in wall seconds and in process CPU seconds (``cpu_seconds``: on one pinned
thread, the work done whatever else shares the core). Baselines that are not importable are skipped
("skipped: not installed"). Ratios are taken within the run. --bars TxD measures the issue's bars in
interleaved rounds (kronlik value, kronlik value + gradients, tinygp's D calls, in turn, ratios per
round), robust to a shared core. --peak-memory TxD runs kronlik value (+ all gradients) once in a
fresh subprocess each and records the peak resident set size (VmHWM).

One thread (the JSON records the flags): run as a script, this file sets
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" before importing jax;
pin it to one core as well:

    taskset -c 1 python benchmarks/statespace.py --repeats 5 --budget 10 --dense-extra 2048x8 \
        --bars 1000000x8 100000x8 --bar-rounds 7 --peak-memory 1000000x8 \
        --json benchmarks/results_statespace_1thread.json

(tinygp, celerite2, torch and gpytorch in the environment; the 1-thread run took 20-30 min.)
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one CPU thread: must precede jax's import (a no-op when imported)
    _FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from kronlik.statespace import Matern32, StateSpace, scan_method  # noqa: E402

ALL = (0, 1, 2, 3)
AMPLITUDE, LENGTHSCALE = 1.0, 5.0


class Timer:
    """Records, per name, the median wall seconds, the median process CPU seconds (on one pinned thread
    the CPU time is the work done, whatever else shares the core) and the first (compiling) call."""

    def __init__(self, repeats: int, budget_s: float):
        self.repeats, self.budget_s = repeats, budget_s
        self.seconds, self.cpu_seconds, self.first_call = {}, {}, {}

    def time(self, name: str, fn, *args, warm: bool = False):
        """Call ``fn(*args)`` once to compile and warm up (skipped if ``warm``), then up to ``repeats``
        timed calls, fewer once ``budget_s`` seconds are spent (at least one). Returns the first output."""
        out = None
        if not warm:
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            self.first_call[name] = time.perf_counter() - start
        walls, cpus = [], []
        while len(walls) < self.repeats and (not walls or sum(walls) < self.budget_s):
            start, cpu = time.perf_counter(), time.process_time()
            result = jax.block_until_ready(fn(*args))
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
            out = result if out is None else out
        self.seconds[name], self.cpu_seconds[name] = statistics.median(walls), statistics.median(cpus)
        return out

    def separate(self, name: str, fn, cols):
        """Time a jit'd ``fn`` as D separate calls, one per column's arguments: the first call (the
        compile) is the first column's alone, and the first timed round of D calls gives the outputs."""
        start = time.perf_counter()
        jax.block_until_ready(fn(*cols[0]))
        self.first_call[name] = time.perf_counter() - start
        return self.time(name, _separate(fn, cols), warm=True)


def problem(T: int, D: int, seed: int = 0):
    """(Y, M, K, log_var) as numpy-backed jax arrays; M a StateSpace over sorted irregular times."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0, T))
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.1 * np.eye(D)
    Y = rng.standard_normal((T, D))
    log_var = rng.uniform(-1.0, 1.0, D)
    M = StateSpace(jnp.asarray(t), Matern32(jnp.asarray(AMPLITUDE), jnp.asarray(LENGTHSCALE)))
    return jnp.asarray(Y), M, jnp.asarray(K), jnp.asarray(log_var)


def pencil(K: np.ndarray, log_var: np.ndarray, alpha: float):
    """(P, κ, ν, log det(αK + Σ)): Pᵀ(αK + Σ)P = I, Pᵀ K P = diag(κ), ν = diag(Pᵀ Σ P)."""
    sigma = np.diag(np.exp(log_var))
    chol = np.linalg.cholesky(alpha * K + sigma)
    li = np.linalg.inv(chol)
    kappa, V = np.linalg.eigh(li @ K @ li.T)
    P = li.T @ V
    nu = np.einsum("ij,ij->j", P, sigma @ P)
    return P, kappa, nu, 2.0 * np.sum(np.log(np.diag(chol)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _separate(fn, columns):
    """A callable making one call of ``fn`` per column's argument tuple: the D separate calls."""

    def run():
        return [fn(*c) for c in columns]

    return run


def _tinygp_fns(t, Z, kappa, nu):
    """(jit'd value, jit'd value+grad, the D columns' arguments) for tinygp, or None if not importable."""
    try:
        import tinygp
    except ImportError:
        return None

    def value(y, t, scale, sigma, log_nu):
        kernel = tinygp.kernels.quasisep.Matern32(scale=scale, sigma=sigma)
        gp = tinygp.GaussianProcess(kernel, t, diag=jnp.exp(log_nu), solver=tinygp.solvers.QuasisepSolver)
        return gp.log_probability(y)

    cols = [
        (Z[:, j], t, jnp.asarray(LENGTHSCALE), jnp.sqrt(AMPLITUDE * kappa[j]), jnp.log(nu[j])) for j in range(len(nu))
    ]
    return jax.jit(value), jax.jit(jax.value_and_grad(value, argnums=(0, 2, 3, 4))), cols


def _tinygp(timer: Timer, t, Z, kappa, nu):
    """The outputs of D separate value and value+grad calls, or None if tinygp is not importable."""
    fns = _tinygp_fns(t, Z, kappa, nu)
    if fns is None:
        return None
    f, g, cols = fns
    return timer.separate("tinygp value", f, cols), timer.separate("tinygp value+grad", g, cols)


def _celerite2(timer: Timer, t, Z, kappa, nu):
    """(values, celerite2.jax values or None) of D separate calls, or None if celerite2 is not importable."""
    try:
        import celerite2
    except ImportError:
        return None
    tn, Zn = np.asarray(t), np.asarray(Z)
    T = tn.shape[0]

    def one(j):
        term = celerite2.terms.Matern32Term(sigma=math.sqrt(AMPLITUDE * kappa[j]), rho=LENGTHSCALE)
        gp = celerite2.GaussianProcess(term, mean=0.0)
        gp.compute(tn, diag=np.full(T, nu[j]), quiet=True)
        return gp.log_likelihood(Zn[:, j])

    def run():
        return [one(j) for j in range(len(nu))]

    values = [float(v) for v in timer.time("celerite2 value", run)]
    try:
        import celerite2.jax as c2j
    except ImportError:
        return values, None

    def value(y, t, sigma, rho, log_nu):
        gp = c2j.GaussianProcess(c2j.terms.Matern32Term(sigma=sigma, rho=rho), mean=0.0)
        gp.compute(t, diag=jnp.full(t.shape, jnp.exp(log_nu)), check_sorted=False)
        return gp.log_likelihood(y)

    cols = [
        (Z[:, j], t, jnp.sqrt(AMPLITUDE * kappa[j]), jnp.asarray(LENGTHSCALE), jnp.log(nu[j])) for j in range(len(nu))
    ]
    f = jax.jit(value)
    g = jax.jit(jax.value_and_grad(value, argnums=(0, 2, 3, 4)))
    jax_values = [float(v) for v in timer.separate("celerite2.jax value", f, cols)]
    timer.separate("celerite2.jax value+grad", g, cols)
    return values, jax_values


def _dense_loglik(Y, M, K, log_var):
    """kronlik's eigh engine on the dense M formed from the same (times, kernel)."""
    return kronlik.loglik_diag(Y, M.dense(), K, log_var)


def _gpytorch(timer: Timer, Y, M, K, log_var):
    """GPyTorch's value (Kronecker path, timed with and without gradients), or None if not importable."""
    try:
        import torch
        from linear_operator import settings
        from linear_operator.operators import (
            DiagLinearOperator,
            KroneckerProductDiagLinearOperator,
            KroneckerProductLinearOperator,
        )
    except ImportError:
        return None
    torch.set_num_threads(1)
    y, t, k, s = (torch.tensor(np.asarray(a), dtype=torch.float64) for a in (Y, M.times, K, log_var))
    T, D = Y.shape
    ones = torch.ones(T, dtype=torch.float64)

    def loglik(amp, ell, k_, s_):
        r = math.sqrt(3.0) * torch.abs(t[:, None] - t[None, :]) / ell
        m = amp * (1.0 + r) * torch.exp(-r)
        noise = KroneckerProductDiagLinearOperator(DiagLinearOperator(ones), DiagLinearOperator(torch.exp(s_)))
        cov = KroneckerProductLinearOperator(m, k_) + noise
        with settings.max_cholesky_size(0):
            inv_quad, logdet = cov.inv_quad_logdet(inv_quad_rhs=y.reshape(-1, 1), logdet=True)
        return -0.5 * (inv_quad + logdet + T * D * math.log(2 * math.pi))

    def params(grad):
        amp = torch.tensor(AMPLITUDE, dtype=torch.float64)
        ell = torch.tensor(LENGTHSCALE, dtype=torch.float64)
        return [a.detach().clone().requires_grad_(grad) for a in (amp, ell, k, s)]

    def value():
        with torch.no_grad():
            return float(loglik(*params(False)))

    def value_and_grad():
        p = params(True)
        v = loglik(*p)
        v.backward()
        return float(v.detach()), [a.grad for a in p]

    timer.time("gpytorch value+grad", value_and_grad)
    return timer.time("gpytorch value", value)


def bench_one(
    T: int, D: int, *, repeats: int, budget_s: float, dense: bool, baselines: bool, scans: tuple[str, ...] = ()
) -> dict:
    Y, M, K, log_var = problem(T, D)
    timer = Timer(repeats, budget_s)
    agree, skipped = {}, {}
    forward = jax.jit(kronlik.loglik_diag)
    structured = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ALL))
    value_only = timer.time("kronlik value", forward, Y, M, K, log_var)
    value, grads = timer.time("kronlik value+grad", structured, Y, M, K, log_var)
    value = float(value)
    if not np.isfinite(value):
        raise AssertionError(f"T={T} D={D}: kronlik value {value}")
    agree["kronlik value vs value+grad"] = abs(float(value_only) - value) / abs(value)
    for method in scans:  # the same calls with the recursions named (the rows above run scan_method()'s)
        named = StateSpace(M.times, M.kernel, scan=method)
        v = timer.time(f"kronlik {method} value", forward, Y, named, K, log_var)
        _, g = timer.time(f"kronlik {method} value+grad", structured, Y, named, K, log_var)
        agree[f"kronlik {method} value"] = abs(float(v) - value) / abs(value)
        flat, flat_m = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g)
        agree[f"kronlik {method} gradients (max over arguments)"] = max(_rel(a, b) for a, b in zip(flat_m, flat))

    P, kappa, nu, logdet = pencil(np.asarray(K), np.asarray(log_var), AMPLITUDE)
    Z = jnp.asarray(np.asarray(Y) @ P)  # the times are sorted: no reordering
    const = -0.5 * T * logdet
    why = "skipped: not installed" if baselines else "skipped: --no-baselines"

    tg = _tinygp(timer, M.times, Z, kappa, nu) if baselines else None
    if tg is None:
        skipped["tinygp"] = why
    else:
        values, vgrads = tg
        floor = sum(float(v) for v in values) + const
        agree["tinygp floor value"] = abs(floor - value) / abs(value)
        # ∂L/∂ℓ = Σ_j ∂ℓ_j/∂ℓ and ∂L/∂Y = [∂ℓ_j/∂z_j] Pᵀ: the same numbers through tinygp
        d_ell = sum(float(g[1][1]) for g in vgrads)
        agree["tinygp floor d/dlengthscale"] = abs(d_ell - float(grads[1].kernel.lengthscale)) / abs(d_ell)
        dz = np.stack([np.asarray(g[1][0]) for g in vgrads], axis=1)
        agree["tinygp floor dY"] = _rel(np.asarray(grads[0]), dz @ P.T)
        if agree["tinygp floor value"] > 1e-9:
            raise AssertionError(f"T={T} D={D}: kronlik {value} != tinygp floor {floor}")
    c2 = _celerite2(timer, M.times, Z, kappa, nu) if baselines else None
    if c2 is None:
        skipped["celerite2"] = why
    else:
        values, jax_values = c2
        # celerite2's Matern32Term is an approximation (ε = 0.01): a loose check only
        agree["celerite2 value (eps=0.01 kernel)"] = abs(sum(values) + const - value) / abs(value)
        if jax_values is not None:
            agree["celerite2.jax vs celerite2 value"] = abs(sum(jax_values) - sum(values)) / abs(sum(values))
        if agree["celerite2 value (eps=0.01 kernel)"] > 1e-2:
            raise AssertionError(f"T={T} D={D}: celerite2 disagrees with kronlik by more than its kernel's error")

    if dense:
        timer.time("eigh value", jax.jit(_dense_loglik), Y, M, K, log_var)
        dv, dg = timer.time(
            "eigh value+grad", jax.jit(jax.value_and_grad(_dense_loglik, argnums=ALL)), Y, M, K, log_var
        )
        agree["eigh value"] = abs(float(dv) - value) / abs(value)
        flat, flat_d = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(dg)
        agree["eigh gradients (max over arguments)"] = max(_rel(a, b) for a, b in zip(flat, flat_d))
        if agree["eigh value"] > 1e-9:
            raise AssertionError(f"T={T} D={D}: kronlik {value} != eigh engine {float(dv)}")
        gp = _gpytorch(timer, Y, M, K, log_var) if baselines else None
        if gp is None:
            skipped["gpytorch"] = why
        else:
            agree["gpytorch value"] = abs(gp - value) / abs(value)
            if agree["gpytorch value"] > 1e-6:
                raise AssertionError(f"T={T} D={D}: kronlik {value} != gpytorch {gp}")

    ratios = {}
    for kind, sec in (("", timer.seconds), ("cpu: ", timer.cpu_seconds)):
        kv, kg = sec["kronlik value"], sec["kronlik value+grad"]
        ratios[f"{kind}kronlik value+grad / kronlik value"] = kg / kv
        for name in ("tinygp", "celerite2", "celerite2.jax", "eigh", "gpytorch"):
            if f"{name} value" in sec:
                ratios[f"{kind}kronlik value / {name} value"] = kv / sec[f"{name} value"]
            if f"{name} value+grad" in sec:
                ratios[f"{kind}kronlik value+grad / {name} value+grad"] = kg / sec[f"{name} value+grad"]
    return {
        "T": T,
        "D": D,
        "dtype": "float64",
        "value": value,
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "first_call_seconds": timer.first_call,
        "ratios": ratios,
        "agree": agree,
        "skipped": skipped,
    }


def bar_rounds(T: int, D: int, rounds: int, baselines: bool) -> dict:
    """The issue's bars at (T, D), robust to a shared core: ``rounds`` rounds, each calling kronlik value,
    kronlik value+grad and (if importable) tinygp's D separate value calls once, in turn, so that all
    three see the same load; the ratios are taken within each round, then their median (and range)."""
    Y, M, K, log_var = problem(T, D)
    forward = jax.jit(kronlik.loglik_diag)
    structured = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ALL))
    calls = {
        "kronlik value": lambda: forward(Y, M, K, log_var),
        "kronlik value+grad": lambda: structured(Y, M, K, log_var),
    }
    P, kappa, nu, _ = pencil(np.asarray(K), np.asarray(log_var), AMPLITUDE)
    fns = _tinygp_fns(M.times, jnp.asarray(np.asarray(Y) @ P), kappa, nu) if baselines else None
    if fns is not None:
        calls["tinygp value"] = _separate(fns[0], fns[2])
    for fn in calls.values():
        jax.block_until_ready(fn())  # compile and warm up
    wall = {n: [] for n in calls}
    cpu = {n: [] for n in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - c)
    pairs = {"kronlik value+grad / kronlik value": ("kronlik value+grad", "kronlik value")}
    if fns is not None:
        pairs["kronlik value / tinygp value"] = ("kronlik value", "tinygp value")
    ratios = {}
    for kind, data in (("wall", wall), ("cpu", cpu)):
        for label, (num, den) in pairs.items():
            per_round = [a / b for a, b in zip(data[num], data[den])]
            ratios[f"{kind}: {label}"] = {
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
            }
    return {
        "T": T,
        "D": D,
        "rounds": rounds,
        "seconds": {n: statistics.median(v) for n, v in wall.items()},
        "cpu_seconds": {n: statistics.median(v) for n, v in cpu.items()},
        "ratios": ratios,
        "tinygp": "D separate calls" if fns is not None else ("skipped: not installed" if baselines else "skipped"),
    }


def verdicts(bars: list[dict]) -> dict:
    """The issue's three bars, from the interleaved rounds, in wall and in CPU time."""
    out = {}
    for b in bars:
        T, D, r = b["T"], b["D"], b["ratios"]
        if (T, D) == (1_000_000, 8):
            for kind in ("wall", "cpu"):
                if f"{kind}: kronlik value / tinygp value" in r:
                    x = r[f"{kind}: kronlik value / tinygp value"]["median"]
                    out[f"T=1e6 D=8: kronlik value <= 1.5 x (8 x tinygp value) [{kind}]"] = {
                        "ratio": x,
                        "met": x <= 1.5,
                    }
                x = r[f"{kind}: kronlik value+grad / kronlik value"]["median"]
                out[f"T=1e6 D=8: kronlik value+grad <= 4 x kronlik value [{kind}]"] = {"ratio": x, "met": x <= 4.0}
        if (T, D) == (100_000, 8):
            for kind, sec in (("wall", b["seconds"]), ("cpu", b["cpu_seconds"])):
                x = sec["kronlik value+grad"]
                out[f"T=1e5 D=8: kronlik value+grad < 1 s [{kind}]"] = {"seconds": x, "met": x < 1.0}
    return out


def _peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM (ru_maxrss can include the parent's RSS at fork)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_child(T: int, D: int, grad: bool) -> dict:
    """In this (fresh) process: kronlik value (+ gradients) once at (T, D); peak RSS before and after."""
    jax.config.update("jax_enable_x64", True)
    Y, M, K, log_var = problem(T, D)
    jax.block_until_ready((Y, M, K, log_var))
    before = _peak_rss_mib()
    fn = jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ALL) if grad else kronlik.loglik_diag)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(Y, M, K, log_var))
    seconds = time.perf_counter() - start
    value = out[0] if grad else out
    J = 2
    return {
        "T": T,
        "D": D,
        "what": "kronlik value+grad" if grad else "kronlik value",
        "peak_rss_MiB": _peak_rss_mib(),
        "rss_before_call_MiB": before,
        "inputs_MiB": (T * D + T + D * D + D) * 8 / 2**20,
        "stored_posteriors_MiB": (T * (J + J * J) * D) * 8 / 2**20 if grad else 0.0,
        "seconds_incl_compile": seconds,
        "finite": bool(np.isfinite(float(value))),
    }


def peak_memory(T: int, D: int, grad: bool) -> dict:
    """Run ``_peak_child`` in a fresh subprocess (same interpreter, environment and CPU affinity)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", f"{T}x{D}"] + ([] if grad else ["--value-only"])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    names = [
        "kronlik value",
        "kronlik value+grad",
        "tinygp value",
        "tinygp value+grad",
        "celerite2 value",
        "celerite2.jax value",
        "celerite2.jax value+grad",
        "eigh value",
        "eigh value+grad",
        "gpytorch value",
        "gpytorch value+grad",
    ]
    names = [n for n in names if any(n in r["seconds"] for r in rows)]
    lines = [f"{'T':>8} {'D':>3} " + " ".join(f"{n:>24}" for n in names)]
    for r in rows:
        cells = [f"{r['seconds'][n]:>24.4g}" if n in r["seconds"] else f"{'-':>24}" for n in names]
        lines.append(f"{r['T']:>8} {r['D']:>3} " + " ".join(cells))
    lines.append("(wall seconds per call, median; tinygp and celerite2: the sum of D separate calls)")
    lines.append("")
    for r in rows:
        lines.append(f"T={r['T']} D={r['D']}: " + "; ".join(f"{k} {v:.3g}" for k, v in r["ratios"].items()))
    return "\n".join(lines)


def _environment() -> dict:
    env = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "scan_method (the default rows' recursions)": scan_method(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        env["cpu"] = None
    for name in ("tinygp", "celerite2", "gpytorch", "torch"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "not importable"
    return env


def _size(s: str) -> tuple[int, int]:
    T, D = (int(x) for x in s.lower().split("x"))
    return T, D


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/statespace.py", description=__doc__.split("\n")[0])
    parser.add_argument("--T", nargs="+", type=int, default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--D", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--skip", nargs="*", default=[], help="TxD sizes to leave out, e.g. 1000000x16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of repeats per measurement")
    parser.add_argument("--dense-max-T", type=int, default=1000, help="the eigh engine and GPyTorch up to this T")
    parser.add_argument("--dense-extra", nargs="*", default=[], help="TxD sizes (beyond the grid) for the eigh engine")
    parser.add_argument("--no-baselines", action="store_true", help="kronlik alone (the eigh engine still runs)")
    parser.add_argument("--peak-memory", nargs="*", default=[], help="TxD sizes for the peak-RSS subprocess")
    parser.add_argument("--bars", nargs="*", default=[], help="TxD sizes for interleaved bar rounds")
    parser.add_argument("--bar-rounds", type=int, default=7)
    parser.add_argument(
        "--scans",
        nargs="*",
        default=[],
        choices=["sequential", "parallel"],
        help="also time kronlik with these recursions (StateSpace(..., scan=...))",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    parser.add_argument("--value-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # a benchmark program chooses its precision
    if args.peak_child:
        result = _peak_child(*_size(args.peak_child), grad=not args.value_only)
        print(json.dumps(result))
        return result

    start = time.perf_counter()
    env = _environment()
    skip = {_size(s) for s in args.skip}
    sizes = [(T, D) for T in args.T for D in args.D if (T, D) not in skip]
    extra = [s for s in map(_size, args.dense_extra) if s not in sizes]
    rows = []
    for T, D in sizes + extra:
        is_extra = (T, D) in extra
        dense = T <= args.dense_max_T or is_extra
        row = bench_one(
            T,
            D,
            repeats=args.repeats,
            budget_s=args.budget,
            dense=dense,
            baselines=not args.no_baselines,
            scans=tuple(args.scans),
        )
        row["dense_extra"] = is_extra
        rows.append(row)
        done = ", ".join(f"{k} {v:.4g}s" for k, v in row["seconds"].items())
        print(f"done T={T} D={D}: {done}", file=sys.stderr, flush=True)
    for name, reason in sorted({(k, v) for r in rows for k, v in r["skipped"].items()}):
        print(f"{name}: {reason}")
    bars = []
    for s in args.bars:
        bars.append(bar_rounds(*_size(s), rounds=args.bar_rounds, baselines=not args.no_baselines))
        print(json.dumps(bars[-1]), file=sys.stderr, flush=True)
    peaks = []
    for s in args.peak_memory:
        for grad in (False, True):
            peaks.append(peak_memory(*_size(s), grad=grad))
            print(json.dumps(peaks[-1]), file=sys.stderr, flush=True)
    print(_table(rows))
    env["load_average_end"] = os.getloadavg()
    env["wall_seconds"] = time.perf_counter() - start
    result = {
        "environment": env,
        "skipped_sizes": sorted(args.skip),
        "rows": rows,
        "bars": bars,
        "verdicts": verdicts(bars),
        "peak_memory": peaks,
    }
    for name, v in result["verdicts"].items():
        numbers = ", ".join(f"{k} {x:.3g}" for k, x in v.items() if k != "met")
        print(f"{name}: {'met' if v['met'] else 'NOT met'} ({numbers})")
    print(json.dumps(env))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
