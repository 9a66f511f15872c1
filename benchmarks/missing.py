"""Missing entries: kronlik's masked likelihood against the dense Cholesky of U_oo and GPyTorch's mask policy.

float64, the problem of ``benchmarks/run.py`` (RBF M + 1e-2 I, random PSD K, log-variances s in
[-1, 1], Y standard normal), Σ = diag(eˢ). For each T×D and each fraction of the T·D entries
missing at random (a fixed permutation, so the 1 % set lies inside the 10 % set inside the 50 %
set; Y is NaN there), timed after a warm-up call, jit-compiled, every result blocked on:

* ``masked value``: ``kronlik.loglik_diag(Y, M, K, s, mask=mask)``;
* ``masked value+grad``: ``jax.value_and_grad`` of the same in (Y, M, K, s) (the baseline, 1.0);
* ``complete value+grad``: the same without a mask on the complete Y (the cost the mask adds to);
* ``dense value+grad``: ``jax.value_and_grad`` of a jitted function that builds the TD×TD U
  (``kronlik.reference.dense_covariance``), gathers U_oo and y_o with a fixed numpy index array,
  and takes its Cholesky; gradients in (Y, M, K, s) by autodiff. T·D ≤ --dense-limit.

Before anything is timed, the masked value must equal the dense one and ``kronlik.loglik`` with
Σ = diag(eˢ) to 1e-9 (relative) and every gradient the dense one to 1e-8 (max|Δ| / max|dense| per
argument); ∂L/∂Y must be exactly zero at the missing entries.

GPyTorch (``--gpytorch-size``, value only in the comparison, when gpytorch is importable): an
``ExactGP`` whose prior is ``MultitaskMultivariateNormal(0, KroneckerProductLinearOperator(M, K))``
(interleaved, so its vector is ``Y.reshape(-1)``), ``MultitaskGaussianLikelihood(num_tasks=D,
rank=0, has_global_noise=False)`` with ``task_noises = eˢ`` (I_T ⊗ diag(eˢ), no global noise term),
``ExactMarginalLogLikelihood`` under ``observation_nan_policy("mask")`` on the Y with NaNs. That MLL
divides log N(y_o; 0, U_oo) by the number of entries of the full prior (T·D, not the observed
count), so the value compared is mll · T·D. Two settings: ``max_cholesky_size`` above the observed
count (a Cholesky of U_oo: exact) and GPyTorch's defaults (CG + stochastic Lanczos log-det above 800
observed entries, torch seed 0). Timed: the value (no_grad) and value + backward (∂ in M, K and the
raw task noises), next to kronlik's masked value and value + all gradients at the same size.

Run: python benchmarks/missing.py [--sizes 1024x8] [--missing 0.01 0.1 0.5] [--json out.json]
results_missing.json: OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/missing.py --json benchmarks/results_missing.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kronlik
from kronlik import reference

ALL = (0, 1, 2, 3)
VALUE_RTOL, GRAD_RTOL = 1e-9, 1e-8
_run = runpy.run_path(str(Path(__file__).with_name("run.py")))
_time, _time_warm, problem = _run["_time"], _run["_time_warm"], _run["problem"]  # the harness's timers and problem


def random_mask(T: int, D: int, fraction: float, seed: int = 1) -> np.ndarray:
    """(T, D) bool, True = observed: the first round(fraction·T·D) entries of a fixed permutation missing."""
    order = np.random.default_rng(seed).permutation(T * D)
    mask = np.ones(T * D, bool)
    mask[order[: round(fraction * T * D)]] = False
    return mask.reshape(T, D)


def dense_masked_loglik(mask: np.ndarray):
    """log N(y_o; 0, U_oo) of (Y, M, K, s) through the TD×TD U, gathered at the observed indices, and its Cholesky."""
    obs = np.flatnonzero(mask.reshape(-1))
    log_2pi = obs.size * math.log(2.0 * math.pi)

    def f(Y, M, K, log_var):
        U = reference.dense_covariance(M, K, jnp.diag(jnp.exp(log_var)))
        chol = jnp.linalg.cholesky(U[obs][:, obs])
        white = jax.scipy.linalg.solve_triangular(chol, Y.reshape(-1)[obs], lower=True)
        return -0.5 * (2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) + white @ white + log_2pi)

    return f


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def _masked(fn, mask):
    return lambda Y, M, K, noise: fn(Y, M, K, noise, mask=mask)


def bench_one(T: int, D: int, fraction: float, *, repeats: int, budget_s: float, dense_limit: int, seed: int) -> dict:
    Y, M, K, s = problem(T, D, jnp.float64)
    mask = random_mask(T, D, fraction, seed)
    Yn = jnp.where(mask, Y, jnp.nan)
    args = (Yn, M, K, s)
    fns = {
        "masked value": jax.jit(_masked(kronlik.loglik_diag, mask)),
        "masked value+grad": jax.jit(jax.value_and_grad(_masked(kronlik.loglik_diag, mask), argnums=ALL)),
        "complete value+grad": jax.jit(jax.value_and_grad(kronlik.loglik_diag, argnums=ALL)),
    }
    value, grads = fns["masked value+grad"](*args)
    value = float(value)
    agree = {
        "value: value alone vs value+grad": _rel(fns["masked value"](*args), value),
        "value: loglik(Σ) vs loglik_diag": _rel(
            jax.jit(_masked(kronlik.loglik, mask))(Yn, M, K, jnp.diag(jnp.exp(s))), value
        ),
    }
    if not (np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)):
        raise AssertionError(f"T={T} D={D} missing={fraction}: masked value or gradient not finite")
    if np.any(np.asarray(grads[0])[~mask] != 0):
        raise AssertionError(f"T={T} D={D} missing={fraction}: ∂L/∂Y not zero at the missing entries")
    seconds = {}
    if T * D <= dense_limit:
        fns["dense value+grad"] = jax.jit(jax.value_and_grad(dense_masked_loglik(mask), argnums=ALL))
        dense_value, dense_grads = jax.block_until_ready(fns["dense value+grad"](*args))  # also its warm-up
        agree["value: dense vs kronlik"] = _rel(value, dense_value)
        for name, g, d in zip(("Y", "M", "K", "log_var"), grads, dense_grads):
            agree[f"∂{name}: dense vs kronlik"] = _rel(g, d)
    bad = {k: v for k, v in agree.items() if v > (VALUE_RTOL if k.startswith("value") else GRAD_RTOL)}
    if bad:
        raise AssertionError(f"T={T} D={D} missing={fraction}: kronlik disagrees: {bad}")
    complete_args = (Y, M, K, s)
    for name, fn in fns.items():
        a = complete_args if name.startswith("complete") else args
        timer = _time_warm if name.startswith("dense") else _time  # the dense call ran once already
        seconds[name] = timer(fn, *a, repeats=repeats, budget_s=budget_s)
    base = seconds["masked value+grad"]
    return {
        "T": T,
        "D": D,
        "missing_fraction": fraction,
        "n_missing": int(np.sum(~mask)),
        "value": value,
        "seconds": seconds,
        "ratio": {k: v / base for k, v in seconds.items()},
        "agree": agree,
    }


def gpytorch_compare(T: int, D: int, fraction: float, *, repeats: int, budget_s: float, seed: int) -> dict | None:
    """GPyTorch's masked multitask MLL (× T·D) against kronlik at one size, or None if not importable."""
    try:
        import gpytorch
        import torch
        from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator
    except ImportError:
        return None
    Y, M, K, s = problem(T, D, jnp.float64)
    mask = random_mask(T, D, fraction, seed)
    Yn = jnp.where(mask, Y, jnp.nan)
    kron_value = jax.jit(_masked(kronlik.loglik_diag, mask))
    kron_vg = jax.jit(jax.value_and_grad(_masked(kronlik.loglik_diag, mask), argnums=ALL))
    value, (_, gM, gK, _) = kron_vg(Yn, M, K, s)
    value = float(value)

    f64 = torch.float64
    train_x = torch.arange(T, dtype=f64)
    train_y = torch.tensor(np.asarray(Yn), dtype=f64)  # (T, D), NaN = missing

    class KronGP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(train_x, train_y, likelihood)
            self.M = torch.nn.Parameter(torch.tensor(np.asarray(M), dtype=f64))
            self.K = torch.nn.Parameter(torch.tensor(np.asarray(K), dtype=f64))

        def forward(self, x):
            t = x.reshape(-1).long()
            covar = KroneckerProductLinearOperator(DenseLinearOperator(self.M[t][:, t]), DenseLinearOperator(self.K))
            return gpytorch.distributions.MultitaskMultivariateNormal(torch.zeros(t.shape[0], D, dtype=f64), covar)

    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=D, rank=0, has_global_noise=False)
    likelihood = likelihood.double()
    likelihood.task_noises = torch.exp(torch.tensor(np.asarray(s), dtype=f64))
    model = KronGP(likelihood).double()
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    n_obs = int(mask.sum())

    def make(cholesky: bool, backward: bool):
        cholesky_size = n_obs + 1 if cholesky else gpytorch.settings.max_cholesky_size.value()

        def call():
            torch.manual_seed(0)  # the default path's log-det probes are random
            with (
                gpytorch.settings.observation_nan_policy("mask"),
                gpytorch.settings.max_cholesky_size(cholesky_size),
                torch.set_grad_enabled(backward),
            ):
                model.zero_grad()
                likelihood.zero_grad()
                out = mll(model(train_x), train_y) * (T * D)  # the MLL divides by T·D
                if backward:
                    out.backward()
                return float(out.detach())

        return call

    result = {"T": T, "D": D, "missing_fraction": fraction, "n_missing": int(T * D - n_obs), "kronlik value": value}
    seconds = {
        "kronlik masked value": _time(kron_value, Yn, M, K, s, repeats=repeats, budget_s=budget_s),
        "kronlik masked value+grad": _time(kron_vg, Yn, M, K, s, repeats=repeats, budget_s=budget_s),
    }
    for label, cholesky in (("gpytorch Cholesky", True), ("gpytorch default", False)):
        gp_value = make(cholesky, backward=True)()
        result[f"{label} value"] = gp_value
        result[f"{label} rel diff"] = abs(gp_value - value) / abs(value)
        if cholesky:  # exact: its gradients in M and K must match too
            result["gpytorch Cholesky ∂M rel diff"] = _rel(model.M.grad.numpy(), gM)
            result["gpytorch Cholesky ∂K rel diff"] = _rel(model.K.grad.numpy(), gK)
        seconds[f"{label} value"] = _time(make(cholesky, backward=False), repeats=repeats, budget_s=budget_s)
        seconds[f"{label} value+backward"] = _time(make(cholesky, backward=True), repeats=repeats, budget_s=budget_s)
    if (
        result["gpytorch Cholesky rel diff"] > VALUE_RTOL
        or max(result["gpytorch Cholesky ∂M rel diff"], result["gpytorch Cholesky ∂K rel diff"]) > GRAD_RTOL
    ):
        raise AssertionError(f"gpytorch (Cholesky) disagrees with kronlik: {result}")
    result["seconds"] = seconds
    result["ratio"] = {k: v / seconds["kronlik masked value+grad"] for k, v in seconds.items()}
    return result


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _table(rows: list[dict]) -> str:
    names = ["masked value", "masked value+grad", "complete value+grad", "dense value+grad"]
    lines = [f"{'T':>5} {'D':>3} {'missing':>8} {'m':>6} " + " ".join(f"{n:>22}" for n in names)]
    for r in rows:
        cells = [
            f"{_fmt(r['seconds'][n]):>12} {r['ratio'][n]:>8.3g}x" if n in r["seconds"] else f"{'-':>22}" for n in names
        ]
        lines.append(f"{r['T']:>5} {r['D']:>3} {r['missing_fraction']:>8.0%} {r['n_missing']:>6} " + " ".join(cells))
    lines.append("(median time per call; ratio = time / masked value+grad: the dense column is dense / kronlik)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/missing.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x8"])
    parser.add_argument("--missing", nargs="+", type=float, default=[0.01, 0.1, 0.5], help="fractions of T·D")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of repeats per measurement")
    parser.add_argument("--dense-limit", type=int, default=8192, help="largest T·D for the dense path")
    parser.add_argument("--seed", type=int, default=1, help="of the missing-entry permutation")
    parser.add_argument("--gpytorch-size", default="256x8")
    parser.add_argument("--gpytorch-missing", type=float, default=0.1)
    parser.add_argument("--no-gpytorch", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # a benchmark program chooses its precision
    rows = []
    for size in args.sizes:
        T, D = (int(x) for x in size.lower().split("x"))
        for fraction in args.missing:
            rows.append(
                bench_one(
                    T,
                    D,
                    fraction,
                    repeats=args.repeats,
                    budget_s=args.budget,
                    dense_limit=args.dense_limit,
                    seed=args.seed,
                )
            )
            print(f"done T={T} D={D} missing={fraction}", file=sys.stderr, flush=True)
    print(_table(rows))
    print(
        "agreement (worst relative difference): "
        + ", ".join(f"{k} {max(r['agree'][k] for r in rows if k in r['agree']):.1e}" for k in rows[0]["agree"])
    )
    env = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    gp = None
    if not args.no_gpytorch:
        T, D = (int(x) for x in args.gpytorch_size.lower().split("x"))
        gp = gpytorch_compare(T, D, args.gpytorch_missing, repeats=args.repeats, budget_s=args.budget, seed=args.seed)
        if gp is None:
            env["gpytorch"] = "not importable"
        else:
            import gpytorch
            import linear_operator
            import torch

            env.update(
                torch=torch.__version__, gpytorch=gpytorch.__version__, linear_operator=linear_operator.__version__
            )
            print(
                f"GPyTorch T={T} D={D} missing={args.gpytorch_missing:.0%}: kronlik {gp['kronlik value']:.12g}; "
                f"Cholesky {gp['gpytorch Cholesky value']:.12g} (rel {gp['gpytorch Cholesky rel diff']:.1e}), "
                f"default {gp['gpytorch default value']:.12g} (rel {gp['gpytorch default rel diff']:.1e})"
            )
            print("  " + ", ".join(f"{k} {_fmt(v)} ({gp['ratio'][k]:.3g}x)" for k, v in gp["seconds"].items()))
    print(json.dumps(env))
    result = {"environment": env, "rows": rows, "gpytorch": gp}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
