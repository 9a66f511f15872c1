"""Benchmark harness: kronlik against the dense references, GPyTorch's structured path and the eigh floor.

For each (T, D) and dtype it times, after a compile/warm-up call and with every result
blocked on, the median of several calls of:

* ``kronlik``: ``jax.value_and_grad(kronlik.loglik, argnums=(0, 1, 2, 3))`` (value + all gradients);
* ``kronlik fwd``: ``kronlik.loglik`` alone;
* ``kronlik no dM``: value + gradients in Y, K, Σ only (jit drops the O(T³) product that ∂L/∂M needs);
* ``dense autodiff``: the same through ``kronlik.reference.loglik`` (Cholesky of the TD×TD U), T·D ≤ --dense-limit;
* ``dense block sums``: ``kronlik.reference.grad_sigma``, the literal formula of the original question, same limit;
* ``gpytorch``: ``KroneckerProductLinearOperator(M, K)`` + ``KroneckerProductDiagLinearOperator`` noise,
  ``inv_quad_logdet`` under ``max_cholesky_size(0)``, autograd for (s, M, K), when gpytorch is importable;
* ``eigh floor``: ``eigh(M)`` and ``eigh(K̃)`` alone.

All implementations must agree on the value before anything is timed. Ratios are against
``kronlik`` in the same run. Output: a table, JSON (--json) and a log-log plot (--plot).

Run: python -m benchmarks.run --sizes 64x8 256x64 --dtype float64
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import kernels, reference

ALL = (0, 1, 2, 3)


def _time(fn, *args, repeats: int, budget_s: float) -> float:
    """Median seconds of fn(*args) after one warm-up call; fewer repeats for slow calls."""
    jax.block_until_ready(fn(*args))
    return _time_warm(fn, *args, repeats=repeats, budget_s=budget_s)


def _time_warm(fn, *args, repeats: int, budget_s: float) -> float:
    """As ``_time`` for a call already compiled and run once: the median of up to ``repeats`` calls."""
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def problem(T: int, D: int, dtype, seed: int = 0):
    """A reproducible (Y, M, K, log_var): smooth RBF M plus 1e-2 I, random PSD K, log-variances in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, T)
    M = np.asarray(kernels.rbf(jnp.asarray(t), jnp.asarray(t), 0.1)) + 1e-2 * np.eye(T)
    A = rng.standard_normal((D, D))
    K = A @ A.T / D + 0.1 * np.eye(D)
    return tuple(jnp.asarray(a, dtype) for a in (rng.standard_normal((T, D)), M, K, rng.uniform(-1, 1, D)))


def _gpytorch_fn(Y, M, K, log_var):
    """(value_and_grads callable, value) for GPyTorch's structured path, or None if not importable."""
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
    tdtype = torch.float64 if Y.dtype == jnp.float64 else torch.float32
    y, m, k, s = (torch.tensor(np.asarray(a), dtype=tdtype) for a in (Y, M, K, log_var))
    T, D = Y.shape
    ones = torch.ones(T, dtype=tdtype)

    def run():
        m_, k_, s_ = (a.detach().clone().requires_grad_(True) for a in (m, k, s))
        noise = KroneckerProductDiagLinearOperator(DiagLinearOperator(ones), DiagLinearOperator(torch.exp(s_)))
        cov = KroneckerProductLinearOperator(m_, k_) + noise
        with settings.max_cholesky_size(0):
            inv_quad, logdet = cov.inv_quad_logdet(inv_quad_rhs=y.reshape(-1, 1), logdet=True)
        value = -0.5 * (inv_quad + logdet + T * D * math.log(2 * math.pi))
        value.backward()
        return float(value.detach()), (s_.grad, m_.grad, k_.grad)

    return run


def bench_one(T: int, D: int, dtype, *, repeats: int, dense_limit: int, budget_s: float, use_gpytorch: bool) -> dict:
    Y, M, K, log_var = problem(T, D, dtype)
    Sigma = jnp.diag(jnp.exp(log_var))
    args = (Y, M, K, Sigma)
    structured = jax.jit(jax.value_and_grad(kronlik.loglik, argnums=ALL))
    forward = jax.jit(kronlik.loglik)
    value = float(structured(*args)[0])
    rtol = 1e-8 if dtype == jnp.float64 else 1e-3
    row = {"T": T, "D": D, "dtype": jnp.dtype(dtype).name, "value": value, "seconds": {}}
    sec = row["seconds"]
    sec["kronlik"] = _time(structured, *args, repeats=repeats, budget_s=budget_s)
    sec["kronlik fwd"] = _time(forward, *args, repeats=repeats, budget_s=budget_s)
    no_dm = jax.jit(jax.value_and_grad(kronlik.loglik, argnums=(0, 2, 3)))
    sec["kronlik no dM"] = _time(no_dm, *args, repeats=repeats, budget_s=budget_s)

    @jax.jit
    def floor(M, K, Sigma):
        inv_sd = 1.0 / jnp.sqrt(jnp.diagonal(Sigma))
        return jnp.linalg.eigh(M), jnp.linalg.eigh(K * inv_sd[:, None] * inv_sd[None, :])

    sec["eigh floor"] = _time(floor, M, K, Sigma, repeats=repeats, budget_s=budget_s)
    if T * D <= dense_limit:
        dense = jax.jit(jax.value_and_grad(reference.loglik, argnums=ALL))
        dense_value = float(dense(*args)[0])
        if not math.isclose(dense_value, value, rel_tol=rtol):
            raise AssertionError(f"T={T} D={D}: kronlik {value} != dense {dense_value}")
        sec["dense autodiff"] = _time(dense, *args, repeats=repeats, budget_s=budget_s)
        sec["dense block sums"] = _time(reference.grad_sigma, *args, repeats=repeats, budget_s=budget_s)
    run = _gpytorch_fn(Y, M, K, log_var) if use_gpytorch else None
    if run is not None:
        gp_value = run()[0]
        if not math.isclose(gp_value, value, rel_tol=max(rtol, 1e-6)):
            raise AssertionError(f"T={T} D={D}: kronlik {value} != gpytorch {gp_value}")
        sec["gpytorch"] = _time(run, repeats=repeats, budget_s=budget_s)
    row["ratio_to_kronlik"] = {k: v / sec["kronlik"] for k, v in sec.items()}
    return row


def _table(rows: list[dict]) -> str:
    names = ["kronlik", "kronlik fwd", "kronlik no dM", "eigh floor", "dense autodiff", "dense block sums", "gpytorch"]
    head = f"{'T':>6} {'D':>5} {'dtype':>8} " + " ".join(f"{n:>17}" for n in names)
    lines = [head]
    for r in rows:
        cells = []
        for n in names:
            if n in r["seconds"]:
                s, ratio = r["seconds"][n], r["ratio_to_kronlik"][n]
                cells.append(f"{s * 1e3:>9.2f}ms {ratio:>5.2f}x" if s < 100 else f"{s:>9.1f}s {ratio:>5.1f}x")
            else:
                cells.append(f"{'-':>17}")
        lines.append(f"{r['T']:>6} {r['D']:>5} {r['dtype']:>8} " + " ".join(cells))
    lines.append("(time per call, median; ratio = time / kronlik value+all gradients)")
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype in sorted({r["dtype"] for r in rows}):
        sub = [r for r in rows if r["dtype"] == dtype]
        for name in sorted({n for r in sub for n in r["seconds"]}):
            pts = sorted((r["T"] * r["D"], r["seconds"][name]) for r in sub if name in r["seconds"])
            ax.loglog(*zip(*pts), "o-", label=f"{name} ({dtype})")
    ax.set_xlabel("T·D")
    ax.set_ylabel("seconds per call")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["64x8", "256x16", "256x64", "1024x64", "1024x128"])
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float64"), default=["float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of repeats per measurement (min 1)")
    parser.add_argument("--dense-limit", type=int, default=16384, help="largest T·D for the dense references")
    parser.add_argument("--no-gpytorch", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw time against T·D to this PNG")
    args = parser.parse_args(argv)
    if "float64" in args.dtype:
        jax.config.update("jax_enable_x64", True)  # a benchmark program chooses its precision
    rows = []
    for dtype in args.dtype:
        for size in args.sizes:
            T, D = (int(x) for x in size.lower().split("x"))
            row = bench_one(
                T,
                D,
                jnp.dtype(dtype),
                repeats=args.repeats,
                dense_limit=args.dense_limit,
                budget_s=args.budget,
                use_gpytorch=not args.no_gpytorch,
            )
            rows.append(row)
            print(f"done T={T} D={D} {dtype}", file=sys.stderr, flush=True)
    print(_table(rows))
    env = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "machine": platform.machine()}
    try:
        import gpytorch
        import torch

        env.update(torch=torch.__version__, gpytorch=gpytorch.__version__)
    except ImportError:
        env["gpytorch"] = "not importable"
    print(json.dumps(env))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=2)
    if args.plot:
        _plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
