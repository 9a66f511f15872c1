"""Coverage of kronlik's heritability and genetic-correlation standard errors, by simulation.

:func:`kronlik.heritability` and :func:`kronlik.genetic_correlation` report delta-method standard
errors from the expected REML information of (vech K, vech Σ). If those SEs are calibrated, the
Wald interval ``estimate ± 1.96 SE`` covers the true value in about 95% of data sets, and the mean
SE over many data sets matches the empirical standard deviation of the estimates. This script
checks both. It keeps one kinship M (from :func:`kronlik.datasets.simulate_traits`: T individuals,
``--snps`` SNPs), one design F = [1, x] and one true K, Σ, B (every trait has heritability ``--h2``,
genetic correlations 0.5, -0.3, ... between consecutive traits), then for each replicate draws

    Y = F B + G + E,   G ~ MN(0, M, K),   E ~ MN(0, I, Σ),

fits K and Σ by REML (:func:`kronlik.fit_mixed`, M eigendecomposed once by
:func:`kronlik.factorize`) and records whether each interval covers the truth.

The traits are drawn here rather than taken from ``simulate_traits(...).Y``, which also adds three
causal variants of its scan set: a fixed effect outside the model, which inflates the trait
variance and biases h² (``--with-scan-variants`` adds them back, to see that bias).

For each trait (h²) and pair of traits (r_g) it prints the coverage with a Wilson 95% interval
and whether that interval contains 0.95, the mean estimate against the truth (bias, with its
Monte Carlo SE), the mean SE against the empirical SD of the estimates (with an approximate 95%
interval for that SD), the share of fits that converged (and of those that stalled: stopped with
the value unchanged at rounding level, which fit_mixed reports apart) and the wall time. Failed
fits (NaN SE) count as intervals that miss.

What to expect: the SEs match the spread of the estimates (SE/SD near 1) and the r_g intervals
cover about 95%. At T = 300 the h² Wald intervals cover a little less (about 91-93%) although SE/SD
is near 1: the SE is evaluated at the estimate and falls as ĥ² rises, so over-estimates get too
narrow intervals (misses fall mostly above the truth). That is the Wald interval's finite-sample
asymmetry, not a wrong SE; with ``--T 1000`` the h² Wald coverage is about 95%, and at T = 300 the
logit-scale intervals of :func:`kronlik.heritability_interval` (also printed) cover about 95%.

Run (float64; the first fit compiles, later ones take tens of milliseconds on a CPU):

    python examples/heritability_coverage.py                     # 500 replicates, T = 300, D = 3
    python examples/heritability_coverage.py --quick             # 50 replicates, a smoke test
    python examples/heritability_coverage.py --replicates 1000 --T 600 --D 2 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # before any array is made; kronlik never sets it itself

import numpy as np  # noqa: E402

import kronlik  # noqa: E402
from kronlik.datasets import simulate_traits  # noqa: E402

Z95 = 1.959963984540054  # the 97.5% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion k/n."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, default=500, help="number of simulated data sets (default 500)")
    parser.add_argument("--T", type=int, default=300, help="individuals (default 300)")
    parser.add_argument("--D", type=int, default=3, help="traits (default 3)")
    parser.add_argument("--snps", type=int, default=500, help="SNPs behind the kinship (default 500)")
    parser.add_argument("--h2", type=float, default=0.6, help="true heritability of every trait (default 0.6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kinship/truth and of the replicates")
    parser.add_argument("--quick", action="store_true", help="50 replicates: a smoke test")
    parser.add_argument(
        "--with-scan-variants",
        action="store_true",
        help="add simulate_traits' three causal scan variants to every Y (outside the model: expect bias)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.replicates = 50
    if args.replicates < 2:
        parser.error("--replicates must be at least 2")
    return args


def _standardise(G: np.ndarray) -> np.ndarray:
    freq = G.mean(axis=0) / 2
    return (G - 2 * freq) / np.sqrt(2 * freq * (1 - freq))


def simulate(args: argparse.Namespace):
    """The fixed design and truth, and a function drawing one replicate's Y from a generator."""
    data = simulate_traits(T=args.T, D=args.D, n_snps=args.snps, h2=args.h2, seed=args.seed)
    w, v = np.linalg.eigh(data.kinship)
    root = v * np.sqrt(np.clip(w, 0.0, None))  # root rootᵀ = M
    chol_k, chol_s = np.linalg.cholesky(data.K), np.linalg.cholesky(data.Sigma)
    mean = data.covariates @ data.B
    if args.with_scan_variants:  # what simulate_traits adds to Y: fixed, not in the model
        mean = mean + _standardise(data.genotypes[:, data.causal]) @ data.effects

    def draw(rng: np.random.Generator) -> np.ndarray:
        genetic = root @ rng.standard_normal((args.T, args.D)) @ chol_k.T
        noise = rng.standard_normal((args.T, args.D)) @ chol_s.T
        return mean + genetic + noise

    return data, draw


def _row(label, truth, est, se, covered, R):
    k = int(covered.sum())
    lo, hi = wilson(k, R)
    ok = lo <= 0.95 <= hi
    finite = np.isfinite(est)
    est, se = est[finite], se[np.isfinite(se)]
    sd = est.std(ddof=1)
    half = Z95 / np.sqrt(2 * (est.size - 1))  # approximate 95% interval of an SD (normal data)
    bias, mcse = est.mean() - truth, sd / np.sqrt(est.size)
    sd_lo, sd_hi = sd * (1 - half), sd * (1 + half)
    line = (
        f"{label:>6} {truth:>7.3f} {est.mean():>8.4f} {bias:>+8.4f} ±{Z95 * mcse:<6.4f} "
        f"{se.mean():>7.4f} {sd:>7.4f} [{sd_lo:.4f}, {sd_hi:.4f}] {se.mean() / sd:>6.3f} "
        f"{k / R:>7.3f} [{lo:.3f}, {hi:.3f}]  {'yes' if ok else 'NO'}"
    )
    row = dict(truth=truth, bias=bias, mean_se=se.mean(), sd=sd, sd_lo=sd_lo, sd_hi=sd_hi, coverage=k / R)
    row["consistent"] = ok
    return line, row


def _table(title, labels, truth, est, se, R):
    print(f"\n{title}")
    print(
        f"{'':>6} {'true':>7} {'mean est':>8} {'bias':>8} {'±95% MC':<7} {'mean SE':>7} {'emp. SD':>7} "
        f"{'emp. SD 95% int.':>16} {'SE/SD':>6} {'cover':>7} {'Wilson 95%':>14}  0.95 inside?"
    )
    covered = np.abs(est - truth) <= Z95 * se  # NaN compares False: a failed fit misses
    rows = {}
    for j, label in enumerate(labels):
        line, rows[label] = _row(label, truth[j], est[:, j], se[:, j], covered[:, j], R)
        print(line)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    R, T, D = args.replicates, args.T, args.D
    start = time.perf_counter()
    data, draw = simulate(args)
    M = kronlik.factorize(data.kinship)  # once: every replicate shares the kinship
    m_bar = float(np.mean(np.diag(data.kinship)))
    h2_true = m_bar * np.diag(data.K) / (m_bar * np.diag(data.K) + np.diag(data.Sigma))
    assert np.allclose(h2_true, args.h2), h2_true
    pairs = [(i, j) for i in range(D) for j in range(i + 1, D)]
    sd_k = np.sqrt(np.diag(data.K))
    rg_true = np.array([data.K[i, j] / (sd_k[i] * sd_k[j]) for i, j in pairs])

    h2, h2_se = np.full((R, D), np.nan), np.full((R, D), np.nan)
    h2_lo, h2_hi = np.full((R, D), np.nan), np.full((R, D), np.nan)
    rg, rg_se = np.full((R, len(pairs)), np.nan), np.full((R, len(pairs)), np.nan)
    converged, stalled, steps = np.zeros(R, bool), np.zeros(R, bool), np.zeros(R, int)
    rng = np.random.default_rng((args.seed, 1))  # a stream apart from simulate_traits' own
    fit_start, compile_s = time.perf_counter(), 0.0
    for r in range(R):
        t0 = time.perf_counter()
        fit = kronlik.fit_mixed(draw(rng), M, data.covariates, method="reml")
        h, hs = kronlik.heritability(fit)
        lo, hi = kronlik.heritability_interval(fit)
        h2_lo[r], h2_hi[r] = np.asarray(lo), np.asarray(hi)
        c, cs = kronlik.genetic_correlation(fit)
        h2[r], h2_se[r] = np.asarray(h), np.asarray(hs)
        c, cs = np.asarray(c), np.asarray(cs)
        rg[r] = [c[i, j] for i, j in pairs]
        rg_se[r] = [cs[i, j] for i, j in pairs]
        converged[r], stalled[r], steps[r] = bool(fit.converged), bool(fit.stalled), int(fit.num_steps)
        if r == 0:
            compile_s = time.perf_counter() - t0
        if (r + 1) % max(1, R // 10) == 0:
            print(f"  {r + 1}/{R} replicates, {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    fit_s = time.perf_counter() - fit_start
    wall = time.perf_counter() - start

    extra = ", with simulate_traits' 3 scan variants added (outside the model)" if args.with_scan_variants else ""
    print(f"kronlik REML coverage study: T = {T}, D = {D}, {R} replicates, seed {args.seed}{extra}")
    print(f"one kinship ({args.snps} SNPs, mean diag {m_bar:.4f}), covariates [1, x], fixed true K and Sigma")
    truth_rg = ", ".join(f"({i},{j}) = {x:+.3f}" for (i, j), x in zip(pairs, rg_true))
    print(f"true h2 = {', '.join(f'{x:.3f}' for x in h2_true)}" + (f"; true r_g {truth_rg}" if pairs else ""))
    neither = int((~converged & ~stalled).sum())
    print(
        f"fits: {converged.sum()}/{R} converged ({converged.mean():.1%}), {stalled.sum()} stalled at rounding "
        f"level, {neither} neither; L-BFGS steps median {int(np.median(steps))}, max {steps.max()}"
    )
    print(
        f"wall time {wall:.1f} s: first fit (compiling) {compile_s:.1f} s, "
        f"then {1e3 * (fit_s - compile_s) / max(R - 1, 1):.0f} ms a replicate"
    )
    print("intervals: estimate ± 1.96 SE (Wald, delta-method SE from the REML expected information)")
    nan_h2, nan_rg = int((~np.isfinite(h2_se)).any(axis=1).sum()), int((~np.isfinite(rg_se)).any(axis=1).sum())
    if nan_h2 or nan_rg:
        print(f"replicates with a NaN SE (counted as misses): h2 {nan_h2}, r_g {nan_rg}")
    results = {"h2": _table("heritability h2 by trait", [f"h2_{d}" for d in range(D)], h2_true, h2, h2_se, R)}
    print("  the same with kronlik.heritability_interval (delta method on the logit scale, mapped back):")
    logit_rows = {}
    for d in range(D):
        k = int(((h2_lo[:, d] <= h2_true[d]) & (h2_true[d] <= h2_hi[:, d])).sum())
        lo, hi = wilson(k, R)
        logit_rows[f"h2_{d}"] = dict(coverage=k / R, consistent=lo <= 0.95 <= hi)
        print(f"  h2_{d}  cover {k / R:.3f} [{lo:.3f}, {hi:.3f}]  {'yes' if lo <= 0.95 <= hi else 'NO'}")

    if pairs:
        labels = [f"rg_{i}{j}" for i, j in pairs]
        results["rg"] = _table("genetic correlation by pair", labels, rg_true, rg, rg_se, R)
    rows = [row for part in results.values() for row in part.values()]
    bad = [name for part in results.values() for name, row in part.items() if not row["consistent"]]
    print(
        f"\n{len(rows) - len(bad)}/{len(rows)} coverages consistent with 95% (Wilson interval contains 0.95)"
        + (f"; not: {', '.join(bad)}" if bad else "")
    )
    inside = sum(row["sd_lo"] <= row["mean_se"] <= row["sd_hi"] for row in rows)
    print(f"{inside}/{len(rows)} mean SEs inside the 95% interval of the empirical SD (SE/SD = 1 within noise)")
    print("(a calibrated SE fails either check by chance about 5% of the time)")
    results.update(converged=float(converged.mean()), wall_s=wall, replicates=R, h2_logit=logit_rows)
    results["draws"] = dict(h2=h2, h2_se=h2_se, rg=rg, rg_se=rg_se, converged=converged, stalled=stalled)
    return results


if __name__ == "__main__":
    main()
