"""kronlik's multi-trait mixed model against glimix-core 3.1.14 (the engine of limix), in one process.

Data: ``kronlik.datasets.simulate_traits(T=300, D=3, n_scan=10000, seed=0)``, float64. Model
vec(Y) ~ N(vec(F B), M ⊗ K + I ⊗ Σ) (kronlik, row-major vec) = N((A ⊗ X) vec(B), C₀ ⊗ GGᵀ + C₁ ⊗ I)
(glimix-core, column-major vec): K ↔ C₀ (genetic, it multiplies the kinship), Σ ↔ C₁ (environmental),
A = I_D, X = F = [1, x]. glimix-core takes the kinship as a factor G with GGᵀ = M (here M's
eigenvectors times √eigenvalue, the null eigenvalue of the centred kinship dropped: 300 × 299).

Measured:

1. glimix-core ``Kron2Sum(Y, I_D, F, G, rank, restricted)``, rank = D (full) and rank = 1 (its
   default), restricted False and True, from its default start: wall time of construction + ``fit()``
   (L-BFGS-B, factr 1e7, pgtol 1e-7), lml evaluations, ``lml()``, C₀, C₁, h²_d = m̄C₀_dd / (m̄C₀_dd + C₁_dd)
   (kronlik's definition, m̄ = mean diag M). ``kronlik.loglik_mixed`` at glimix's C₀, C₁ in every
   convention shows which one glimix reports: restricted=False is method "ml", restricted=True is
   "reml-lamotte" (Harville's REML + ½ log det XᵀX). A fit that runs past ``--cap`` seconds is
   stopped at its best point and marked ``capped``.
2. ``kronlik.fit_mixed`` with method "ml" and "reml-lamotte", each called twice (the first call
   includes JIT compilation), and the log-likelihood gap kronlik − glimix in each convention.
3. ``--n-scan`` variants, one at a time: glimix-core's ``KronFastScanner`` (``get_fast_scanner()`` of
   the full-rank ML fit; A₁ = I_D for an effect on any trait, A₁ = 1_D for a common effect) and
   ``kronlik.scan`` (score test, K and Σ fixed at the null fit), timed. KronFastScanner keeps C₀ and
   C₁ fixed but re-fits an overall scale s of the covariance by ML with and without the variant, so
   its 2(lml₁ − lml₀) = −TD log(1 − χ²/(TD s₀)), with χ² the fixed-covariance statistic kronlik
   reports: compared raw (max relative difference, correlation) and through that map, with kronlik
   both at its own fit and at glimix's C₀, C₁ (the same covariances: agreement to rounding).
4. A central-difference check of glimix-core's analytic gradient at a full-rank C₀ (rank ≥ 2).
   It is wrong with scipy >= 1.16: numpy_sugar's ``lu_solve`` hands scipy an (n, n, P)
   right-hand side, which scipy 1.16 solves as a batch over the leading axis, not column by
   column, so the rank-D fits wander. scipy 1.15.x, inside glimix-core's scipy>=1.15 pin, is
   right: the venv pins scipy 1.15.3.

BLAS threads: OpenBLAS's thread pool stalls on this 2-core machine when other work runs (glimix's
rank-1 fit 13 s instead of 1.7 s, its scan 8 ms instead of 1 ms per variant, kronlik's warm fit
1.3-2.4 s instead of 0.03 s), so the script sets OPENBLAS_NUM_THREADS (and OMP/MKL) to 1 unless
already set, for both libraries alike; XLA keeps its own threads. The value used is recorded.

Setup and run, from the repository root (2-core CPU: about 5 minutes):

    python3 -m venv /work/bench-glimix
    /work/bench-glimix/bin/pip install glimix-core==3.1.14 -e .
    /work/bench-glimix/bin/pip install scipy==1.15.3  # not >= 1.16: see 4.
    /work/bench-glimix/bin/python benchmarks/mixed_glimix.py [--n-scan 10000] [--cap 600] [--no-rank1]
        [--json benchmarks/results_mixed_glimix.json]
"""

from __future__ import annotations

import os

BLAS_THREADS = {
    v: os.environ.setdefault(v, "1") for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
}

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from glimix_core.lmm import Kron2Sum  # noqa: E402

jax.config.update("jax_enable_x64", True)  # a benchmark program chooses its precision

import kronlik  # noqa: E402
from kronlik.datasets import simulate_traits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHOD_OF = {False: "ml", True: "reml-lamotte"}  # glimix restricted= -> the kronlik convention it reports
# glimix-core 3.1.14's conventions, read from its source (lmm/_kron2sum.py, _kron2sum_scan.py, cov/) and
# confirmed numerically by this script where a number can confirm them
GLIMIX_CONVENTIONS = {
    "covariance": "C0 ⊗ GGᵀ + C1 ⊗ I on column-major vec(Y): C0 (genetic) = kronlik K, C1 (environmental) = Σ",
    "kinship_input": "a factor G (n × r) with GGᵀ = kinship, not the kinship; G is divided by max(G) inside, "
    "and the C0 property is rescaled back",
    "C1_floor": "C1 = LLᵀ + εI with ε = 1000·sqrt(machine eps) ≈ 1.5e-5, included in the C1 property",
    "rank": "rank of C0 (C0 = LLᵀ, L is D × rank), default 1; the default start is L = ones (rank-1 C0)",
    "lml_restricted_false": "ML = kronlik method='ml'",
    "lml_restricted_true": "REML with + ½ log det(MᵀM), M = A ⊗ X, and −(nD − cD)/2 log 2π = kronlik "
    "'reml-lamotte' (Harville's REML + ½ log det XᵀX)",
    "fit": "scipy L-BFGS-B, factr 1e7, pgtol 1e-7, default start; no max-iteration option",
    "scanner": "KronFastScanner: ML whatever 'restricted'; C0, C1 fixed, an overall scale s re-fitted with and "
    "without each candidate; its lml includes s, effsizes1_se are scaled by sqrt(s)",
    "heritability": "not reported; here h2 = m̄C0_dd / (m̄C0_dd + C1_dd) as in kronlik",
}


class _Budget(Exception):
    """Raised inside glimix's optimiser when a fit runs past its time cap."""


class _CountedKron2Sum(Kron2Sum):
    """Kron2Sum that counts lml evaluations, keeps the best point seen and stops after ``budget_s``."""

    def __init__(self, *args, budget_s: float = float("inf"), **kwargs):
        super().__init__(*args, **kwargs)
        self.budget_s = budget_s
        self.n_evals = 0
        self._deadline = None
        self._best = (-np.inf, None)

    def gradient(self):  # optimix evaluates the gradient first, then the value
        if self._deadline is not None and time.perf_counter() > self._deadline:
            raise _Budget
        return super().gradient()

    def value(self):
        v = super().value()
        self.n_evals += 1
        if v > self._best[0]:
            self._best = (v, (self._cov.C0.Lu.copy(), self._cov.C1.Lu.copy()))
        return v

    def fit_capped(self) -> bool:
        """glimix's own ``fit()``; True if it was stopped by the budget (then left at its best point)."""
        self._deadline = time.perf_counter() + self.budget_s
        try:
            self.fit(verbose=False)
            return False
        except _Budget:
            self._cov.C0.Lu, self._cov.C1.Lu = self._best[1]
            return True
        finally:
            self._deadline = None


def _kinship_factor(M: np.ndarray) -> np.ndarray:
    """G with GGᵀ = M: eigenvectors times √eigenvalue, eigenvalues ≤ 1e-10 λ_max dropped."""
    w, v = np.linalg.eigh(M)
    keep = w > 1e-10 * w[-1]
    return v[:, keep] * np.sqrt(w[keep])


def _h2(C0, C1, m_bar):
    g = m_bar * np.diag(np.asarray(C0))
    return g / (g + np.diag(np.asarray(C1)))


def _loglik_all(data, C0, C1) -> dict:
    return {
        m: float(kronlik.loglik_mixed(data.Y, data.kinship, C0, C1, data.covariates, method=m))
        for m in ("ml", "reml", "reml-lamotte")
    }


def _glimix_fit(data, G, rank, restricted, cap, m_bar):
    D = data.Y.shape[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        model = _CountedKron2Sum(data.Y, np.eye(D), data.covariates, G, rank=rank, restricted=restricted, budget_s=cap)
        capped = model.fit_capped()
        seconds = time.perf_counter() - t0
        lml = float(model.lml())
    C0, C1 = np.asarray(model.C0), np.asarray(model.C1)
    kron = _loglik_all(data, C0, C1)
    same = METHOD_OF[restricted]
    out = {
        "rank": rank,
        "restricted": restricted,
        "seconds": seconds,
        "n_lml_evaluations": model.n_evals,
        "capped": capped,
        "cap_s": cap,
        "lml": lml,
        "C0_genetic": C0.tolist(),
        "C1_environmental": C1.tolist(),
        "C0_eigenvalues": np.linalg.eigvalsh(C0).tolist(),
        "h2": _h2(C0, C1, m_bar).tolist(),
        "B": np.asarray(model.B).tolist(),
        "kronlik_loglik_at_glimix_params": kron,
        "matches_kronlik_method": same,
        "abs_diff_vs_kronlik_method": abs(kron[same] - lml),
        "abs_diff_vs_other_methods": {m: abs(v - lml) for m, v in kron.items() if m != same},
        "G_norm": float(model._G_norm),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}),
    }
    return model, out


def _kronlik_fit(data, method):
    times, fit = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            t0 = time.perf_counter()
            fit = kronlik.fit_mixed(data.Y, data.kinship, data.covariates, method=method)
            jax.block_until_ready(fit)
            times.append(time.perf_counter() - t0)
    h2, h2_se = kronlik.heritability(fit)
    K, S = np.asarray(fit.K), np.asarray(fit.Sigma)
    return fit, {
        "method": method,
        "seconds_first_call_with_jit": times[0],
        "seconds_second_call": times[1],
        "loglik": float(fit.loglik),
        "converged": bool(fit.converged),
        "num_steps": int(fit.num_steps),
        "K_genetic": K.tolist(),
        "Sigma_environmental": S.tolist(),
        "K_eigenvalues": np.linalg.eigvalsh(K).tolist(),
        "h2": np.asarray(h2).tolist(),
        "h2_se": np.asarray(h2_se).tolist(),
        "B": np.asarray(fit.B).tolist(),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}),
    }


def _gradient_check(data, G, seed=1) -> dict:
    """Max relative error of glimix's analytic lml gradient against central differences, full-rank C₀."""
    D = data.Y.shape[1]
    model = Kron2Sum(data.Y, np.eye(D), data.covariates, G, rank=D, restricted=False)
    rng = np.random.default_rng(seed)
    model._cov.C0.L = np.linalg.cholesky(np.eye(D) * model._G_norm**2) + 0.3 * np.tril(rng.normal(size=(D, D)), -1)
    model._cov.C1.Lu = 0.3 * rng.normal(size=model._cov.C1.Lu.size)
    grad = model.gradient()
    errors = {}
    for name, cov in (("C0.Lu", model._cov.C0), ("C1.Lu", model._cov.C1)):
        base, fd = cov.Lu.copy(), []
        for i in range(base.size):
            step = 1e-5 * max(1.0, abs(base[i]))
            values = []
            for sign in (1, -1):
                x = base.copy()
                x[i] += sign * step
                cov.Lu = x
                values.append(model.lml())
            fd.append((values[0] - values[1]) / (2 * step))
        cov.Lu = base
        fd = np.array(fd)
        errors[name] = float(np.max(np.abs(grad[name] - fd)) / np.max(np.abs(fd)))
    return {"max_relative_error": errors, "ok": bool(max(errors.values()) < 1e-4)}


def _glimix_scan(scanner, genotypes, A1):
    t0 = time.perf_counter()
    res = [scanner.scan(A1, genotypes[:, j : j + 1]) for j in range(genotypes.shape[1])]
    seconds = time.perf_counter() - t0
    lml = np.array([r["lml"] for r in res])
    return seconds, {
        "lrt": 2.0 * (lml - scanner.null_lml()),
        "effect": np.array([r["effsizes1"].ravel() for r in res]),
        "se_unscaled": np.array([r["effsizes1_se"].ravel() / np.sqrt(r["scale"]) for r in res]),
    }


def _kronlik_scan(fit, genotypes, design):
    times, res = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        res = kronlik.scan(fit, genotypes, design=design)
        jax.block_until_ready(res.chi2)
        times.append(time.perf_counter() - t0)
    return times, res


def _rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _scan_agreement(glim, res, n_obs, null_scale) -> dict:
    chi2 = np.asarray(res.chi2)
    lrt = glim["lrt"]
    mapped = n_obs * null_scale * -np.expm1(-lrt / n_obs)  # glimix's LRT mapped to the fixed-scale χ²
    return {
        "max_rel_diff_lrt_vs_chi2": _rel(lrt, chi2),
        "max_rel_diff_lrt_vs_chi2_where_chi2_gt_1": _rel(lrt[chi2 > 1], chi2[chi2 > 1]),
        "max_abs_diff_lrt_vs_chi2": float(np.max(np.abs(lrt - chi2))),
        "correlation_lrt_chi2": float(np.corrcoef(lrt, chi2)[0, 1]),
        "max_rel_diff_mapped_lrt_vs_chi2": _rel(mapped, chi2),
        "max_abs_diff_mapped_lrt_vs_chi2": float(np.max(np.abs(mapped - chi2))),
        "max_abs_diff_effect_over_max_abs_effect": float(
            np.max(np.abs(glim["effect"] - np.asarray(res.effect))) / np.max(np.abs(np.asarray(res.effect)))
        ),
        "max_rel_diff_se_after_removing_scale": _rel(glim["se_unscaled"], np.asarray(res.se)),
        "same_top_variant": bool(np.argmax(lrt) == np.argmax(chi2)),
        "top10_overlap": len(set(np.argsort(-lrt)[:10]) & set(np.argsort(-chi2)[:10])),
    }


def _machine() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREADS}  # nproc obeys OMP_NUM_THREADS

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    model = next((ln.split(":", 1)[1].strip() for ln in run(["lscpu"]).splitlines() if "Model name" in ln), "")
    return {
        "nproc": run(["nproc"]).strip(),
        "cpu": model or platform.processor(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "blas_threads_env": BLAS_THREADS,
    }


def _versions() -> dict:
    names = ("kronlik", "jax", "jaxlib", "numpy", "scipy", "glimix-core", "numpy-sugar", "optimix")
    out = {n: metadata.version(n) for n in names}
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "kronlik"], capture_output=True, text=True)
    out["kronlik_git"] = rev + (" (kronlik/ modified)" if dirty.stdout.strip() else "")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n-scan", type=int, default=10000)
    parser.add_argument("--cap", type=float, default=600.0, help="seconds per glimix fit before it is stopped")
    parser.add_argument("--no-rank1", action="store_true", help="skip glimix's rank-1 fits")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results_mixed_glimix.json"))
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    result = {
        "machine": _machine(),
        "versions": _versions(),
        "same_process": True,
        "glimix_conventions": GLIMIX_CONVENTIONS,
    }

    data = simulate_traits(T=300, D=3, n_scan=args.n_scan, seed=0)
    T, D = data.Y.shape
    n_obs = T * D
    m_bar = float(np.mean(np.diag(data.kinship)))
    G = _kinship_factor(data.kinship)
    F = data.covariates
    result["data"] = {
        "call": f"simulate_traits(T=300, D=3, n_scan={args.n_scan}, seed=0)",
        "T": T,
        "D": D,
        "n_scan": args.n_scan,
        "m_bar": m_bar,
        "glimix_G_shape": list(G.shape),
        "max_abs_GGt_minus_kinship": float(np.max(np.abs(G @ G.T - data.kinship))),
        "half_logdet_XtX": 0.5 * D * float(np.linalg.slogdet(F.T @ F)[1]),
        "true_h2": _h2(data.K, data.Sigma, m_bar).tolist(),
        "causal": np.asarray(data.causal).tolist(),
    }
    print(f"glimix-core gradient check (scipy {metadata.version('scipy')}) ...", flush=True)
    result["glimix_gradient_check"] = _gradient_check(data, G)
    if not result["glimix_gradient_check"]["ok"]:
        print("  WARNING: glimix-core's gradient is wrong with this scipy; its full-rank fits will be too", flush=True)

    print("kronlik fits ...", flush=True)
    kfits, result["kronlik"] = {}, {}
    for method in ("ml", "reml-lamotte"):
        kfits[method], result["kronlik"][method] = _kronlik_fit(data, method)

    print("glimix-core fits ...", flush=True)
    gmodels, result["glimix"] = {}, {}
    for rank in (D,) if args.no_rank1 else (D, 1):
        for restricted in (False, True):
            key = f"rank{rank}_{'restricted' if restricted else 'ml'}"
            gmodels[key], result["glimix"][key] = _glimix_fit(data, G, rank, restricted, args.cap, m_bar)
            r = result["glimix"][key]
            print(
                f"  {key}: {r['seconds']:.1f} s, lml {r['lml']:.8f}, {r['n_lml_evaluations']} evaluations", flush=True
            )

    gaps = {}
    for key, g in result["glimix"].items():
        method = g["matches_kronlik_method"]
        gaps[key] = {"convention": method, "kronlik_minus_glimix": result["kronlik"][method]["loglik"] - g["lml"]}
        if g["rank"] == D:
            k = result["kronlik"][method]
            gaps[key]["max_abs_diff_K"] = float(np.max(np.abs(np.array(k["K_genetic"]) - np.array(g["C0_genetic"]))))
            gaps[key]["max_abs_diff_Sigma"] = float(
                np.max(np.abs(np.array(k["Sigma_environmental"]) - np.array(g["C1_environmental"])))
            )
            gaps[key]["max_abs_diff_h2"] = float(np.max(np.abs(np.array(k["h2"]) - np.array(g["h2"]))))
    result["gaps"] = gaps

    print(f"scans of {args.n_scan} variants ...", flush=True)
    model = gmodels[f"rank{D}_ml"]
    t0 = time.perf_counter()
    scanner = model.get_fast_scanner()
    null_lml = scanner.null_lml()
    scanner_setup = time.perf_counter() - t0
    null_scale = float(scanner.null_scale)
    at_glimix = kfits["ml"]._replace(K=jax.numpy.asarray(model.C0), Sigma=jax.numpy.asarray(model.C1))
    result["scan"] = {
        "glimix_scanner": "KronFastScanner of the rank-D ML fit (C0, C1 fixed; overall scale re-fitted by ML)",
        "glimix_null_scale": null_scale,
        "glimix_null_lml": float(null_lml),
        "glimix_scanner_setup_seconds": scanner_setup,
    }
    for design, A1 in (("any", np.eye(D)), ("common", np.ones((D, 1)))):
        seconds, glim = _glimix_scan(scanner, data.genotypes, A1)
        times, res = _kronlik_scan(kfits["ml"], data.genotypes, design)
        _, res_same = _kronlik_scan(at_glimix, data.genotypes, design)
        result["scan"][design] = {
            "df": int(res.df),
            "glimix_seconds": seconds,
            "kronlik_seconds_first_call_with_jit": times[0],
            "kronlik_seconds_second_call": times[1],
            "speedup_second_call": seconds / times[1],
            "vs_kronlik_at_its_ml_fit": _scan_agreement(glim, res, n_obs, null_scale),
            "vs_kronlik_at_glimix_C0_C1": _scan_agreement(glim, res_same, n_obs, null_scale),
            "max_lrt_glimix": float(np.max(glim["lrt"])),
            "max_chi2_kronlik": float(np.max(np.asarray(res.chi2))),
            "causal_chi2_kronlik": np.asarray(res.chi2)[np.asarray(data.causal)].tolist(),
            "causal_lrt_glimix": glim["lrt"][np.asarray(data.causal)].tolist(),
        }
        print(f"  {design}: glimix {seconds:.1f} s, kronlik {times[1]:.2f} s", flush=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["total_seconds"] = time.perf_counter() - t_start

    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"wrote {args.json}")
    return result


def _print_table(r):
    print(
        f"\n{r['machine']['cpu']}, {r['machine']['nproc']} cores; numpy {r['versions']['numpy']}, "
        f"scipy {r['versions']['scipy']}, jax {r['versions']['jax']}, glimix-core {r['versions']['glimix-core']}"
    )
    print(f"{'fit':<34}{'seconds':>16}{'loglik':>18}{'h2':>24}")
    for m, k in r["kronlik"].items():
        secs = f"{k['seconds_first_call_with_jit']:.2f}/{k['seconds_second_call']:.2f}"
        print(f"{'kronlik ' + m + ' (1st/2nd)':<34}{secs:>16}{k['loglik']:>18.8f}{str(np.round(k['h2'], 3)):>24}")
    for key, g in r["glimix"].items():
        name = f"glimix {key}" + (" CAPPED" if g["capped"] else "")
        print(f"{name:<34}{g['seconds']:>16.1f}{g['lml']:>18.8f}{str(np.round(g['h2'], 3)):>24}")
    print(f"\n{'glimix model':<22}{'= kronlik method':>18}{'|diff|':>12}{'gap kronlik-glimix':>22}")
    for key, g in r["glimix"].items():
        gap = r["gaps"][key]["kronlik_minus_glimix"]
        print(f"{key:<22}{g['matches_kronlik_method']:>18}{g['abs_diff_vs_kronlik_method']:>12.1e}{gap:>22.3e}")
    print(
        f"\n{'scan':<8}{'glimix s':>10}{'kronlik s':>11}{'max rel (LRT vs chi2)':>24}{'corr':>12}"
        f"{'|mapped-chi2|, same C':>23}"
    )
    for design in ("any", "common"):
        s = r["scan"][design]
        a, b = s["vs_kronlik_at_its_ml_fit"], s["vs_kronlik_at_glimix_C0_C1"]
        print(
            f"{design:<8}{s['glimix_seconds']:>10.1f}{s['kronlik_seconds_second_call']:>11.2f}"
            f"{a['max_rel_diff_lrt_vs_chi2']:>24.2e}{a['correlation_lrt_chi2']:>12.8f}"
            f"{b['max_abs_diff_mapped_lrt_vs_chi2']:>23.1e}"
        )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
