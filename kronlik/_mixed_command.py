"""``kronlik mixed``: fit a multi-trait mixed model, report heritabilities and correlations, scan.

With no input files it simulates a data set (:func:`kronlik.datasets.simulate_traits`: T = 300
individuals, 3 traits, a kinship from 500 SNPs, 1000 SNPs to scan with three causal) and runs
the whole job on it. Bad arguments or files: exit 2 with a message, before any fitting, and
nothing written; outputs are written all or none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ._fit_command import _write_all
from .datasets import DataError, read_csv


def _fail(message: str) -> int:
    print(f"kronlik mixed: error: {message}", file=sys.stderr)
    return 2


def add_parser(sub) -> None:
    p = sub.add_parser(
        "mixed",
        help="multi-trait linear mixed model: REML fit, heritabilities, genetic correlations, association scan",
        description="Fits vec(Y) ~ N(vec(F B), M ⊗ K + I ⊗ Σ) (Y: T individuals × D traits, M: kinship, K: "
        "genetic and Σ: environmental covariance, F: covariates with an intercept) by REML, prints K, Σ, "
        "heritabilities and genetic/environmental correlations with standard errors, and scans genotypes "
        "for association. With no --pheno, runs on a built-in simulated data set. Bad input: exit 2.",
    )
    p.add_argument(
        "--pheno",
        help="CSV of traits: a header row, one column per trait, one row per individual (empty cells: missing); "
        "with --bfile/--grm keyed by FID/IID: PLINK's FID IID t1 t2 ... or a CSV with IID (and FID) columns",
    )
    p.add_argument("--kinship", help=".npy or headerless .csv (T, T) kinship matrix, rows in --pheno's order")
    p.add_argument("--genotypes", help=".npy (T, m) allele counts: kinship = Z Zᵀ/m from standardised genotypes")
    p.add_argument(
        "--bfile",
        help="PLINK 1 .bed/.bim/.fam prefix: the kinship (GCTA's standardised GRM, unless --grm) and the variants "
        "to scan, streamed in batches; individuals matched to --pheno by IID",
    )
    p.add_argument("--grm", help="GCTA .grm.bin/.grm.id prefix: the kinship, individuals matched to --pheno by IID")
    p.add_argument("--batch-size", type=int, default=2048, help="variants read from --bfile at a time (default 2048)")
    p.add_argument("--covariates", help="CSV with a header row, one column per covariate (an intercept is added)")
    p.add_argument("--no-intercept", action="store_true", help="do not add a column of ones to the covariates")
    p.add_argument("--method", choices=("reml", "reml-lamotte", "ml"), default="reml")
    p.add_argument("--scan", help=".npy (T, m) genotypes to test for association, one column per variant")
    p.add_argument("--design", choices=("any", "common"), default="any", help="scan: effect on any trait or common")
    p.add_argument("--test", choices=("score", "wald", "lrt"), default="score", help="scan test (lrt: slow)")
    p.add_argument("--top", type=int, default=5, help="variants to print, smallest p first (default 5)")
    p.add_argument("--out", help="write the fit (and scan statistics) as JSON here")
    p.add_argument("--scan-out", help="write the scan table as CSV here")


def _load_matrix(path: str, what: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{what}: no such file: {path}")
    try:
        if file.suffix == ".npy":
            x = np.load(file, allow_pickle=False)
        else:
            x = np.loadtxt(file, delimiter=",", ndmin=2)
    except (ValueError, OSError) as e:
        raise DataError(f"{what}: cannot read {path} as a numeric matrix ({e})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{what}: {path} must hold a 2-D numeric array; got shape {x.shape}, {x.dtype}")
    x = x.astype(float)
    if not np.all(np.isfinite(x)):
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{what}: {path} has a missing or non-finite entry at row {r + 1}, column {c + 1}")
    return x


def _complete_csv(path: str, what: str) -> tuple[list[str], np.ndarray]:
    names, values, _ = read_csv(path)
    if values.shape[0] == 0:
        raise DataError(f"{what}: {path} has no rows")
    bad = np.argwhere(np.isnan(values))
    if bad.size:
        r, c = bad[0]
        raise DataError(
            f"{what}: {path} row {r + 1}, column '{names[c]}' is missing; kronlik mixed needs complete "
            f"data ({int(np.isnan(values).any(axis=1).sum())} rows have gaps: drop those individuals)"
        )
    return names, values


def _phenotypes(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The traits with empty cells as missing: (names, Y with NaN there, the rows to keep).

    Individuals with no observed trait add nothing to the likelihood of the observed cells (their
    rows of M only marginalise out): they are dropped, exactly, before the kinship is factorised.
    """
    names, values, _ = read_csv(path)
    if values.shape[0] == 0:
        raise DataError(f"--pheno: {path} has no rows")
    observed = ~np.isnan(values)
    never = [names[d] for d in np.flatnonzero(~observed.any(axis=0))]
    if never:
        raise DataError(f"--pheno: {path} trait(s) {never} have no observed value")
    return names, values, observed.any(axis=1)


def _keyed_inputs(args) -> dict:
    """--bfile/--grm: individuals matched by IID across the files, in the genotype (or GRM) order."""
    from . import plink

    if args.kinship is not None or args.genotypes is not None or args.scan is not None:
        raise DataError(
            "--kinship/--genotypes/--scan take rows in --pheno's order; --bfile/--grm match individuals by IID: "
            "use one kind"
        )
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1; got {args.batch_size}")
    try:
        pheno = plink.read_table(args.pheno)
        covar = plink.read_table(args.covariates) if args.covariates is not None else None
        bed = plink.Bed(args.bfile) if args.bfile is not None else None
        grm_ids, grm = plink.read_grm(args.grm) if args.grm is not None else (None, None)
    except (OSError, ValueError, ImportError) as e:
        raise DataError(str(e)) from None
    ref = grm_ids if grm_ids is not None else bed.ids
    lookups = [{iid: k for k, iid in enumerate(t.ids[:, 1])} for t in (pheno, covar) if t is not None]
    bed_index = {iid: k for k, iid in enumerate(bed.ids[:, 1])} if bed is not None else None
    chosen, dropped = [], {"no phenotype record": 0, "no observed trait": 0, "missing covariate": 0, "no genotypes": 0}
    for k, iid in enumerate(ref[:, 1]):
        rows = [lk.get(iid) for lk in lookups]
        if rows[0] is None:
            dropped["no phenotype record"] += 1
        elif np.isnan(pheno.values[rows[0]]).all():
            dropped["no observed trait"] += 1
        elif covar is not None and (rows[1] is None or np.isnan(covar.values[rows[1]]).any()):
            dropped["missing covariate"] += 1
        elif bed_index is not None and iid not in bed_index:
            dropped["no genotypes"] += 1
        else:
            chosen.append((k, *rows))
    if len(chosen) < 3:
        raise DataError(f"only {len(chosen)} individuals are in every file with an observed trait")
    chosen = np.asarray(chosen)
    Y = pheno.values[chosen[:, 1]]
    never = [pheno.names[d] for d in np.flatnonzero(np.isnan(Y).all(axis=0))]
    if never:
        raise DataError(f"--pheno: trait(s) {never} have no observed value among the matched individuals")
    T = len(chosen)
    F = covar.values[chosen[:, 2]] if covar is not None else np.ones((T, 0))
    cov_names = covar.names if covar is not None else []
    bed_rows = None if bed is None else np.asarray([bed_index[iid] for iid in ref[chosen[:, 0], 1]])
    if grm is not None:
        M = grm[np.ix_(chosen[:, 0], chosen[:, 0])]
        kinship = f"GCTA GRM {args.grm}"
    else:
        A, m, is_factor = plink.kinship_from_bed(bed, bed_rows, args.batch_size)
        M = ("lowrank", A) if is_factor else A
        kinship = f"GRM of {m} polymorphic variants of {args.bfile} (GCTA's standardisation)"
    notes = ", ".join(f"{n} {why}" for why, n in dropped.items() if n)
    return {
        "source": f"{args.pheno} with {kinship}" + (f"; dropped: {notes}" if notes else ""),
        "traits": pheno.names,
        "Y": Y,
        "M": M,
        "F": F,
        "covariates": cov_names,
        "scan": None,
        "scan_bed": None if bed is None else (bed, bed_rows),
        "ids": ref[chosen[:, 0]],
        "dropped": sum(dropped.values()),
    }


def _inputs(args) -> dict:
    """Everything read and checked (DataError on the first problem); the simulation by default."""
    if args.top < 0:
        raise DataError(f"--top must be >= 0; got {args.top}")
    for flag in ("out", "scan_out"):
        value = getattr(args, flag)
        if value is not None and Path(value).is_dir():
            raise DataError(f"--{flag.replace('_', '-')} {value} is a directory")
    if args.out is not None and args.out == args.scan_out:
        raise DataError("--out and --scan-out must be different files")
    if args.pheno is None:
        if any(getattr(args, f) is not None for f in ("kinship", "genotypes", "covariates", "scan", "bfile", "grm")):
            raise DataError("--kinship/--genotypes/--covariates/--scan/--bfile/--grm need --pheno")
        from .datasets import simulate_traits

        sim = simulate_traits()
        return {
            "source": "built-in simulation (kronlik.datasets.simulate_traits(): T=300, D=3, h²=0.6 of the "
            "polygenic + environmental variance, three causal variants among 1000 scanned; with their "
            f"variance as residual h² = {', '.join(f'{h:.2f}' for h in sim.h2_effective)})",
            "traits": [f"trait{d}" for d in range(sim.Y.shape[1])],
            "Y": sim.Y,
            "M": sim.kinship,
            "F": sim.covariates,
            "covariates": ["intercept", "x"],
            "scan": sim.genotypes,
            "truth": {
                "causal": sim.causal.tolist(),
                "K": sim.K.tolist(),
                "Sigma": sim.Sigma.tolist(),
                "h2_effective": sim.h2_effective.tolist(),
            },
        }
    if args.bfile is not None or args.grm is not None:
        return _finish_covariates(args, _keyed_inputs(args))
    if (args.kinship is None) == (args.genotypes is None):
        raise DataError("give exactly one of --kinship, --genotypes, --grm and --bfile")
    traits, Y, keep = _phenotypes(args.pheno)
    T = Y.shape[0]
    if args.kinship is not None:
        M = _load_matrix(args.kinship, "--kinship")
        if M.shape != (T, T):
            raise DataError(f"--kinship must be ({T}, {T}) to match --pheno's {T} rows; got {M.shape}")
        if not np.allclose(M, M.T, rtol=1e-10, atol=1e-12 * np.abs(M).max()):
            raise DataError("--kinship is not symmetric")
        M = M[np.ix_(keep, keep)]
    else:
        G = _load_matrix(args.genotypes, "--genotypes")
        if G.shape[0] != T:
            raise DataError(f"--genotypes must have {T} rows to match --pheno; got {G.shape}")
        M = _kinship_from_genotypes(G[keep])
    cov_names, F = [], np.ones((T, 0))
    if args.covariates is not None:
        cov_names, F = _complete_csv(args.covariates, "--covariates")
        if F.shape[0] != T:
            raise DataError(f"--covariates must have {T} rows to match --pheno; got {F.shape[0]}")
    dropped = int(T - keep.sum())
    Y, F, T = Y[keep], F[keep], int(keep.sum())
    scan = None
    if args.scan is not None:
        scan = _load_matrix(args.scan, "--scan")
        if scan.shape[0] != keep.size:
            raise DataError(f"--scan must have {keep.size} rows to match --pheno; got {scan.shape}")
        scan = scan[keep]
    data = {
        "source": args.pheno,
        "traits": traits,
        "Y": Y,
        "M": M,
        "F": F,
        "covariates": cov_names,
        "scan": scan,
        "dropped": dropped,
    }
    return _finish_covariates(args, data)


def _finish_covariates(args, data: dict) -> dict:
    """The intercept (unless --no-intercept) and the covariates' rank, checked."""
    F, cov_names = data["F"], data["covariates"]
    if not args.no_intercept:
        F, cov_names = np.column_stack([np.ones(F.shape[0]), F]), ["intercept", *cov_names]
    if F.shape[1] == 0:
        raise DataError("no covariates: drop --no-intercept or give --covariates")
    if np.linalg.matrix_rank(F) < F.shape[1]:
        raise DataError(
            f"the covariates {cov_names} are linearly dependent (e.g. a constant column beside the intercept)"
        )
    return data | {"F": F, "covariates": cov_names}


def _kinship_from_genotypes(G: np.ndarray):
    """GCTA's standardised GRM of (T, m) allele counts (:mod:`kronlik.plink`): the factor Z/√m for
    ``LowRank`` when m ≤ T, else the (T, T) matrix: the same rule as ``--bfile``."""
    from .plink import standardise

    Z = standardise(G)[0]
    if Z.shape[1] == 0:
        raise DataError("--genotypes: every SNP is monomorphic")
    return ("lowrank", Z / np.sqrt(Z.shape[1])) if Z.shape[1] <= Z.shape[0] else Z @ Z.T / Z.shape[1]


def _heritability_lines(traits, h2, se, lower, upper, level: float = 0.95) -> list[str]:
    """The printed heritabilities: ĥ² ± its Wald SE, and the logit-scale interval
    (:func:`kronlik.heritability_interval`)."""
    lines = [
        "heritability h² = m̄ K_dd / (m̄ K_dd + Σ_dd) ± SE (delta method, expected information), "
        f"{100 * level:g}% interval (delta method on the logit scale):"
    ]
    for t, h, s, lo, hi in zip(traits, h2, se, lower, upper):
        lines.append(f"  {t:<16}{float(h):.4f} ± {float(s):.4f}   [{float(lo):.4f}, {float(hi):.4f}]")
    return lines


def _table(names, values, ses) -> str:
    width = max(len(n) for n in names) + 2
    lines = ["".ljust(width) + "".join(n.rjust(20) for n in names)]
    for i, n in enumerate(names):
        cells = [
            f"{values[i, j]: .4g} ± {ses[i, j]:.2g}" if i != j else f"{values[i, j]: .4g}" for j in range(len(names))
        ]
        lines.append(n.ljust(width) + "".join(c.rjust(20) for c in cells))
    return "\n".join(lines)


def _scan_bed(args, fit, data: dict, result: dict, traits: list[str]) -> list[str]:
    """Every variant of --bfile, read in batches (memory O(T · batch)), each a score test with K and Σ
    at the null fit; a missing genotype is imputed by its variant's mean. Rows go to --scan-out as
    they come; stderr shows progress about every 5 s."""
    import time

    import kronlik

    bed, rows = data["scan_bed"]
    m = bed.num_variants
    names = traits if args.design == "any" else ["common"]
    header = ["chr", "snp", "bp", "a1", "a2", "freq_a1", *(f"effect_{n}" for n in names)]
    header += [*(f"se_{n}" for n in names), "chi2", "df", "p"]
    sink = open(args.scan_out + ".partial", "w") if args.scan_out else None  # renamed when complete
    if sink is not None:
        sink.write(",".join(header) + "\n")
    best: list[tuple[float, int, float]] = []  # (p, variant, chi2), the --top smallest
    df, last, start = None, time.perf_counter(), time.perf_counter()
    print(f"kronlik mixed: scanning {m} variants of {args.bfile} in batches of {args.batch_size}", file=sys.stderr)
    for cols, counts in bed.batches(rows, args.batch_size):
        freq = np.nanmean(counts, axis=0) / 2.0
        G = np.where(np.isnan(counts), 2.0 * freq[None, :], counts)
        res = kronlik.scan(fit, G, design=args.design, test=args.test, batch_size=args.batch_size)
        df = res.df
        chi2, p = np.asarray(res.chi2), np.asarray(res.p_value)
        effect, se = np.asarray(res.effect), np.asarray(res.se)
        for k in range(chi2.size):
            v = cols.start + k
            if sink is not None:
                info = [bed.chromosome[v], bed.snp[v], str(bed.bp[v]), bed.allele_1[v], bed.allele_2[v]]
                numbers = [freq[k], *effect[k], *se[k], chi2[k]]
                sink.write(",".join([*info, *(f"{x:.10g}" for x in numbers), str(df), f"{p[k]:.10g}"]) + "\n")
            if np.isfinite(p[k]):
                best.append((float(p[k]), v, float(chi2[k])))
        best = sorted(best)[: args.top]
        if time.perf_counter() - last > 5.0 or cols.stop == m:
            print(
                f"kronlik mixed: scan {cols.stop}/{m} variants ({100 * cols.stop / m:.0f} %), "
                f"{time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            last = time.perf_counter()
    if sink is not None:
        sink.close()
        Path(args.scan_out + ".partial").replace(args.scan_out)
    lines = [f"association scan: {m} variants of {args.bfile}, χ² on {df} df ({args.test}); smallest p:"]
    for p_k, v, chi2_k in best:
        lines.append(f"  {bed.snp[v]:<16} chr {bed.chromosome[v]:<3} bp {bed.bp[v]:<11} χ² {chi2_k:9.3f}   p {p_k:.3e}")
    result["scan"] = {"test": args.test, "design": args.design, "df": df, "top": [bed.snp[v] for _, v, _ in best]}
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        data = _inputs(args)
    except (DataError, ValueError) as e:
        return _fail(str(e))
    import jax

    # This process is a program: float64 for a statistical fit (the library never sets this).
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import kronlik

    Y, F, traits = data["Y"], data["F"], data["traits"]
    T, D = Y.shape
    M = data["M"]
    M = kronlik.LowRank(jnp.asarray(M[1])) if isinstance(M, tuple) else kronlik.factorize(jnp.asarray(M))
    if not bool(jnp.all(jnp.isfinite(M.values if hasattr(M, "values") else M.factor))):
        return _fail("the kinship is not positive semi-definite (or not finite)")
    mask = ~np.isnan(Y)
    missing = int((~mask).sum())
    print(
        f"kronlik mixed: {data['source']}: T={T} individuals, D={D} traits, covariates {data['covariates']}"
        + (f"; {missing} missing phenotypes (empty cells), fitted exactly on the observed ones" if missing else "")
        + (f"; {data['dropped']} individuals with no observed trait dropped" if data.get("dropped") else ""),
        file=sys.stderr,
    )
    fit = kronlik.fit_mixed(Y, M, F, method=args.method, mask=mask if missing else None, progress=True)
    h2, h2_se = kronlik.heritability(fit)
    h2_lower, h2_upper = kronlik.heritability_interval(fit, 0.95)
    rg, rg_se = kronlik.genetic_correlation(fit)
    re, re_se = kronlik.environmental_correlation(fit)
    lines = [
        f"{args.method.upper()} log-likelihood {float(fit.loglik):.6f}   converged {bool(fit.converged)}"
        + ("" if bool(fit.converged) else f" (stalled {bool(fit.stalled)})"),
        *_heritability_lines(traits, h2, h2_se, h2_lower, h2_upper, 0.95),
        "genetic correlations ± SE:",
        _table(traits, np.asarray(rg), np.asarray(rg_se)),
        "environmental correlations ± SE:",
        _table(traits, np.asarray(re), np.asarray(re_se)),
    ]
    result = {
        "source": data["source"],
        "method": args.method,
        "traits": traits,
        "covariates": data["covariates"],
        "loglik": float(fit.loglik),
        "converged": bool(fit.converged),
        "individuals": T,
        "missing_phenotypes": missing,
        "dropped_individuals": int(data.get("dropped", 0)),
        "K": np.asarray(fit.K).tolist(),
        "Sigma": np.asarray(fit.Sigma).tolist(),
        "B": np.asarray(fit.B).tolist(),
        "B_se": np.sqrt(np.diagonal(np.asarray(fit.B_cov))).reshape(np.shape(fit.B)).tolist(),
        "heritability": np.asarray(h2).tolist(),
        "heritability_se": np.asarray(h2_se).tolist(),
        "heritability_interval": {
            "level": 0.95,
            "method": "delta method on the logit scale (kronlik.heritability_interval)",
            "lower": np.asarray(h2_lower).tolist(),
            "upper": np.asarray(h2_upper).tolist(),
        },
        "genetic_correlation": np.asarray(rg).tolist(),
        "genetic_correlation_se": np.asarray(rg_se).tolist(),
        "environmental_correlation": np.asarray(re).tolist(),
        "environmental_correlation_se": np.asarray(re_se).tolist(),
        "information_order": "vech(K), vech(Sigma), lower triangles row by row",
        "information": np.asarray(fit.information).tolist(),
    }
    if "truth" in data:
        result["truth"] = data["truth"]
    outputs = []
    if data.get("scan_bed") is not None:
        lines += _scan_bed(args, fit, data, result, traits)
    if data["scan"] is not None:
        G = data["scan"]
        print(f"kronlik mixed: scanning {G.shape[1]} variants ({args.design} effect, {args.test})", file=sys.stderr)
        res = kronlik.scan(fit, G, design=args.design, test=args.test, progress=True)
        p = np.asarray(res.p_value)
        order = np.argsort(p)[: args.top]
        causal = set(data.get("truth", {}).get("causal", []))
        lines.append(f"association scan: {G.shape[1]} variants, χ² on {res.df} df ({args.test}); smallest p:")
        for k in order:
            mark = "   (simulated causal)" if k in causal else ""
            lines.append(f"  variant {k:<8d} χ² {float(res.chi2[k]):9.3f}   p {p[k]:.3e}{mark}")
        result["scan"] = {"test": args.test, "design": args.design, "df": res.df, "top": order.tolist()}
        if args.scan_out:
            cols = ["variant", "chi2", "df", "p_value"]
            a = res.effect.shape[1]
            effect_names = traits if a == D else ["common"]
            cols += [f"effect_{n}" for n in effect_names] + [f"se_{n}" for n in effect_names]
            rows = np.column_stack(
                [np.arange(G.shape[1]), res.chi2, np.full(G.shape[1], res.df), p, res.effect, res.se]
            )
            text = (
                ",".join(cols)
                + "\n"
                + "\n".join(",".join([str(int(r[0])), *(f"{x:.10g}" for x in r[1:])]) for r in rows)
            )
            outputs.append((args.scan_out, text + "\n", None))
    print("\n".join(lines))
    if args.out:
        outputs.append((args.out, json.dumps(result, indent=2), None))
    _write_all(outputs)
    return 0
