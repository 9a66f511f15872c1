"""Mixed models at scale (issue 19): many traits, missing phenotypes, and MGREML's anchor size.

float64, one process, timed after a warm-up call (jit-compiled, results blocked on):

* ``many``: ``simulate_traits(T, D, n_snps)`` (kinship from ``n_snps`` SNPs, covariates [1, x]),
  M factorised once. REML value + gradient in (K, Σ) on the rotated problem by the per-column
  GLS (A = I_D: D QRs of T × c) against the joint QR of the T·D × c·D whitened design (the path
  before issue 19; a traced A takes it), and their agreement. The fit as ``fit_mixed`` runs it
  (start, Fisher scoring in the pencil's coordinates, L-BFGS), cold (compilation included) and
  warm (a second data set of the same shape), against L-BFGS alone from the same start on the
  joint path (what ``fit_mixed`` did before), with steps and the optima's gap; and the summary
  (the 2·D(D+1)/2-square information, its inverse, every h², r_g, r_e with its SE).
* ``missing``: the same at (T_m, D_m) with a fraction of each trait's cells missing at random:
  the masked value + gradient (each missing cell a covariate of its own) and the masked fit,
  against the complete data's.
* ``big``: ``simulate_traits(..., low_rank=True)``, T_big × D_big with the kinship of n_big SNPs
  as a LowRank factor; wall time of the factorisation (its thin SVD) and of the fit separately.

Run: python benchmarks/mixed_many.py [--json benchmarks/results_mixed_many.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # a benchmark script is a program: float64 throughout

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from kronlik import mixed  # noqa: E402
from kronlik._noise import FullNoise  # noqa: E402
from kronlik.datasets import simulate_traits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script or by runpy
from benchmarks.mixed import _seconds  # noqa: E402


def _value_and_grad(prob, split):
    def value(K, S):
        return mixed._loglik_mixed(prob.Y, prob.form, K, FullNoise(S), prob.terms, prob.cells, "reml", None, split)

    return jax.jit(jax.value_and_grad(value, argnums=(0, 1)))


def _timed_fit(*args, **kwargs):
    start = time.perf_counter()
    fit = kronlik.fit_mixed(*args, **kwargs)
    jax.block_until_ready(fit.information)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = [kronlik.heritability(fit), kronlik.genetic_correlation(fit), kronlik.environmental_correlation(fit)]
    jax.block_until_ready(summary)
    return fit, fit_s, time.perf_counter() - start, summary


def many(T: int, D: int, n_snps: int, before: bool) -> dict:
    sim = simulate_traits(T=T, D=D, n_snps=n_snps, n_scan=1, seed=0)
    start = time.perf_counter()
    fm = kronlik.factorize(jnp.asarray(sim.kinship))
    jax.block_until_ready(fm)
    out: dict = {"T": T, "D": D, "n_snps": n_snps, "factorize_s": time.perf_counter() - start}
    prob = mixed.make_problem(sim.Y, fm, sim.covariates, None)
    K, S = jnp.asarray(sim.K), jnp.asarray(sim.Sigma)
    split, joint = _value_and_grad(prob, True), _value_and_grad(prob, False)
    (v1, g1), (v2, g2) = split(K, S), joint(K, S)
    out["split_vs_joint"] = max(
        abs(float(v1 - v2)) / abs(float(v2)),
        *(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g1, g2)),
    )
    out["value_grad_ms"] = {"split": 1e3 * _seconds(split, K, S), "joint": 1e3 * _seconds(joint, K, S, repeats=3)}
    fit, cold, summary_s, (h2, rg, re) = _timed_fit(sim.Y, fm, sim.covariates)
    other = simulate_traits(T=T, D=D, n_snps=n_snps, n_scan=1, seed=1)
    fit2, warm, _, _ = _timed_fit(other.Y, kronlik.factorize(jnp.asarray(other.kinship)), other.covariates)
    out["fit"] = {
        "cold_s": cold,
        "warm_s": warm,
        "summary_s": summary_s,
        "steps": int(fit.num_steps),
        "steps_second_data_set": int(fit2.num_steps),
        "converged": bool(fit.converged),
        "loglik": float(fit.loglik),
        "finite_ses": bool(all(bool(jnp.all(jnp.isfinite(se))) for _, se in (h2, rg, re))),
        "h2_se_range": [float(jnp.min(h2[1])), float(jnp.max(h2[1]))],
    }
    if before:  # L-BFGS alone from the same start, on the joint path: fit_mixed before issue 19
        K0, S0 = mixed._start(prob, method="reml", split=True)
        start_params = {"k": mixed._cholesky_params(K0), "s": mixed._cholesky_params(S0)}
        tol = jnp.asarray(1e-8)
        for split_path in (False, True):
            t0 = time.perf_counter()
            run = mixed._lbfgs(
                prob, start_params, {}, tol, method="reml", build=mixed._build_free, num_steps=500, split=split_path
            )
            jax.block_until_ready(run.loglik)
            key = "lbfgs_alone_joint" if not split_path else "lbfgs_alone_split"
            out[key] = {
                "s": time.perf_counter() - t0,
                "steps": int(run.num_steps),
                "converged": bool(run.converged),
                "loglik_below_fit": float(fit.loglik - run.loglik),
            }
    return out


def missing(T: int, D: int, fraction: float) -> dict:
    sim = simulate_traits(T=T, D=D, n_snps=2 * T, n_scan=1, seed=0)
    mask = np.random.default_rng(0).random((T, D)) >= fraction
    Y = np.where(mask, sim.Y, np.nan)
    fm = kronlik.factorize(jnp.asarray(sim.kinship))
    out: dict = {"T": T, "D": D, "fraction": fraction, "missing_cells": int((~mask).sum())}
    K, S = jnp.asarray(sim.K), jnp.asarray(sim.Sigma)
    masked = _value_and_grad(mixed.make_problem(Y, fm, sim.covariates, None, mask), False)
    complete = _value_and_grad(mixed.make_problem(sim.Y, fm, sim.covariates, None), True)
    out["value_grad_ms"] = {"masked": 1e3 * _seconds(masked, K, S), "complete": 1e3 * _seconds(complete, K, S)}
    fit, seconds, _, _ = _timed_fit(Y, fm, sim.covariates, mask=mask)
    full, full_s, _, _ = _timed_fit(sim.Y, fm, sim.covariates)
    out["fit"] = {
        "masked_s": seconds,
        "masked_steps": int(fit.num_steps),
        "converged": bool(fit.converged),
        "complete_s": full_s,
        "complete_steps": int(full.num_steps),
    }
    return out


def big(T: int, D: int, n_snps: int) -> dict:
    t0 = time.perf_counter()
    sim = simulate_traits(T=T, D=D, n_snps=n_snps, n_scan=1, seed=0, low_rank=True)
    out: dict = {"T": T, "D": D, "n_snps": n_snps, "simulate_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    prob = mixed.make_problem(sim.Y, kronlik.LowRank(jnp.asarray(sim.kinship_factor)), sim.covariates, None)
    jax.block_until_ready(prob.form)
    out["factorize_s"] = time.perf_counter() - t0  # the thin SVD of the T × n_snps factor
    fit, seconds, summary_s, (h2, _, _) = _timed_fit(sim.Y, kronlik.LowRank(jnp.asarray(sim.kinship_factor)))
    out["fit"] = {
        "s_including_factorize": seconds,
        "s_excluding_factorize": seconds - out["factorize_s"],
        "summary_s": summary_s,
        "steps": int(fit.num_steps),
        "converged": bool(fit.converged),
        "h2_mean": float(jnp.mean(h2[0])),
        "h2_effective_mean": float(np.mean(sim.h2_effective)),
    }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=2000)
    p.add_argument("--D", type=int, default=50)
    p.add_argument("--n-snps", type=int, default=2000)
    p.add_argument("--no-before", action="store_true", help="skip the L-BFGS-alone fits on the joint path")
    p.add_argument("--T-missing", type=int, default=1000)
    p.add_argument("--D-missing", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--T-big", type=int, default=20000)
    p.add_argument("--D-big", type=int, default=50)
    p.add_argument("--n-big", type=int, default=5000)
    p.add_argument("--skip", nargs="*", default=[], choices=["many", "missing", "big"])
    p.add_argument("--json")
    args = p.parse_args(argv)
    out: dict = {"machine": platform.processor() or platform.machine(), "jax": jax.__version__}
    if "many" not in args.skip:
        out["many"] = many(args.T, args.D, args.n_snps, not args.no_before)
        print(json.dumps(out["many"], indent=1), flush=True)
    if "missing" not in args.skip:
        out["missing"] = missing(args.T_missing, args.D_missing, args.fraction)
        print(json.dumps(out["missing"], indent=1), flush=True)
    if "big" not in args.skip:
        out["big"] = big(args.T_big, args.D_big, args.n_big)
        print(json.dumps(out["big"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
