"""Multi-trait mixed models: kronlik against a dense TD×TD computation in the same process.

float64, ``kronlik.datasets.simulate_traits(T, D, n_scan=m, seed=0)`` (a kinship from 500 SNPs,
covariates [1, x], h² = 0.6). Timed after a warm-up call (jit-compiled, results blocked on):

* ``value+grad``: REML (Harville) value and gradients in (K, Σ): ``kronlik.loglik_mixed`` with M
  factorised once, against ``jax.value_and_grad`` of ``kronlik.reference.loglik_mixed`` (the
  Cholesky of the TD×TD U, autodiff through it);
* ``fit``: ``kronlik.fit_mixed`` on a factorised M (first call: compilation included; then a
  second data set of the same shape, which reuses it), and the same L-BFGS on the dense
  likelihood (``kronlik.fit`` of -L/(TD) in the same Cholesky parameters, from the same start
  values), with the gap between the two optima in log-likelihood units;
* ``scan``: ``kronlik.scan`` of all m variants (any effect, score) against the dense per-variant
  GLS (``kronlik.reference.scan_mixed``) on the first ``--dense-variants`` of them, extrapolated
  linearly to m; and the largest relative difference of χ² on those.

Run: python benchmarks/mixed.py [--T 300] [--D 3] [--variants 10000] [--json benchmarks/results_mixed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # a benchmark script is a program: float64 throughout

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from kronlik import reference  # noqa: E402
from kronlik.datasets import simulate_traits  # noqa: E402
from kronlik.mixed import _cholesky_params, _from_cholesky, _start, make_problem  # noqa: E402


def _seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=300)
    p.add_argument("--D", type=int, default=3)
    p.add_argument("--variants", type=int, default=10000)
    p.add_argument("--dense-variants", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args(argv)
    sim = simulate_traits(T=args.T, D=args.D, n_scan=args.variants, seed=0)
    Y, M, F = (jnp.asarray(a) for a in (sim.Y, sim.kinship, sim.covariates))
    terms = ((F, jnp.eye(args.D)),)
    fm = kronlik.factorize(M)
    K, S = jnp.asarray(sim.K), jnp.asarray(sim.Sigma)
    out: dict = {"T": args.T, "D": args.D, "variants": args.variants}

    structured = jax.jit(jax.value_and_grad(lambda k, s: kronlik.loglik_mixed(Y, fm, k, s, F), argnums=(0, 1)))
    dense = jax.jit(jax.value_and_grad(lambda k, s: reference.loglik_mixed(Y, M, k, s, terms, "reml"), argnums=(0, 1)))
    (v1, g1), (v2, g2) = structured(K, S), dense(K, S)
    rel = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g1, g2)]
    out["value_grad_agreement"] = max(abs(float(v1 - v2)) / abs(float(v2)), *rel)
    out["value_grad_s"] = {"kronlik": _seconds(structured, K, S), "dense": _seconds(dense, K, S)}

    start = time.perf_counter()
    fit = kronlik.fit_mixed(Y, fm, F)
    jax.block_until_ready(fit.K)
    cold = time.perf_counter() - start
    other = simulate_traits(T=args.T, D=args.D, n_scan=1, seed=1)
    start = time.perf_counter()
    jax.block_until_ready(kronlik.fit_mixed(other.Y, fm, F).K)  # same shapes: no compilation
    warm = time.perf_counter() - start
    prob = make_problem(Y, fm, F, None)
    K0, S0 = _start(prob, method="reml")

    def dense_loss(p):
        k, s = _from_cholesky(p["k"]), _from_cholesky(p["s"])
        return -reference.loglik_mixed(Y, M, k, s, terms, "reml") / Y.size

    start = time.perf_counter()
    dense_fit = kronlik.fit(dense_loss, {"k": _cholesky_params(K0), "s": _cholesky_params(S0)}, tol=1e-8)
    dense_s = time.perf_counter() - start
    dense_l = -float(dense_fit.value) * Y.size
    out["fit"] = {
        "kronlik_first_call_s": cold,
        "kronlik_second_data_set_s": warm,
        "kronlik_steps": int(fit.num_steps),
        "kronlik_loglik": float(fit.loglik),
        "dense_s": dense_s,
        "dense_steps": int(dense_fit.num_steps),
        "dense_loglik": dense_l,
        "kronlik_minus_dense_loglik": float(fit.loglik) - dense_l,
    }

    G = jnp.asarray(sim.genotypes)
    scan = lambda: kronlik.scan(fit, G).chi2  # noqa: E731
    jax.block_until_ready(scan())
    start = time.perf_counter()
    chi2 = jax.block_until_ready(scan())
    scan_s = time.perf_counter() - start
    n = min(args.dense_variants, args.variants)
    start = time.perf_counter()
    dense_chi2, _, _ = reference.scan_mixed(Y, M, fit.K, fit.Sigma, terms, G[:, :n], jnp.eye(args.D))
    dense_scan_s = (time.perf_counter() - start) * args.variants / n
    out["scan"] = {
        "kronlik_s": scan_s,
        "dense_extrapolated_s": dense_scan_s,
        "dense_variants_timed": n,
        "max_rel_chi2_difference": float(jnp.max(jnp.abs(chi2[:n] - dense_chi2) / dense_chi2)),
    }
    out["environment"] = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "machine": platform.machine()}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    print("done", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
