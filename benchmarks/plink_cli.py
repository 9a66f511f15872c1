"""``kronlik mixed --bfile`` on a PLINK file set written with bed-reader, against the .npy path.

``simulate_traits(T, D=3, n_scan=m)``'s allele counts are written as PREFIX.bed/.bim/.fam (with
bed-reader's ``to_bed``), the traits as a PLINK phenotype file keyed by FID/IID (10 % of the cells
NA) and as an in-order CSV. Then, each in a fresh process (``/usr/bin/time``-style peak memory from
``resource.getrusage`` of the child):

* ``--bfile``: the kinship streamed from the .bed in batches (GCTA's standardised GRM), the fit,
  and the scan of every variant streamed again, rows written as they come;
* ``--genotypes G.npy --scan G.npy``: the same counts from memory, in --pheno's order.

Reports each wall time and peak memory and the largest differences between the two (log-likelihood,
heritabilities, every variant's χ²).

Run: python benchmarks/plink_cli.py [--T 2000] [--variants 10000] [--json benchmarks/results_plink_cli.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS in MB (RUSAGE_CHILDREN: the largest child so far)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kronlik", *args], check=True, capture_output=True)
    wall = time.perf_counter() - start
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=2000)
    p.add_argument("--variants", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from bed_reader import to_bed

    from kronlik.datasets import simulate_traits

    sim = simulate_traits(T=args.T, D=3, n_snps=500, n_scan=args.variants, seed=11)
    d = Path(tempfile.mkdtemp())
    iids = [f"i{k}" for k in range(args.T)]
    G = sim.genotypes.astype(np.float32)
    to_bed(
        d / "g.bed",
        G,
        properties={
            "fid": iids,
            "iid": iids,
            "sid": [f"rs{k}" for k in range(args.variants)],
            "chromosome": ["1"] * args.variants,
        },
    )
    np.save(d / "G.npy", sim.genotypes.astype(float))
    Y = sim.Y.copy()
    Y[np.random.default_rng(12).random(Y.shape) < 0.1] = np.nan
    na = lambda x, empty: empty if np.isnan(x) else f"{x:.17g}"  # noqa: E731
    (d / "pheno.txt").write_text(
        "FID IID a b c\n" + "".join(f"{i} {i} " + " ".join(na(x, "NA") for x in y) + "\n" for i, y in zip(iids, Y))
    )
    (d / "pheno.csv").write_text("a,b,c\n" + "".join(",".join(na(x, "") for x in y) + "\n" for y in Y))
    out: dict = {"T": args.T, "variants": args.variants, "missing_cells": int(np.isnan(Y).sum())}
    common = ["--batch-size", str(args.batch_size)]
    bed_s, bed_mb = _run(
        [
            "mixed",
            "--pheno",
            str(d / "pheno.txt"),
            "--bfile",
            str(d / "g"),
            *common,
            "--out",
            str(d / "bed.json"),
            "--scan-out",
            str(d / "bed.csv"),
        ]
    )
    npy_s, npy_mb = _run(
        [
            "mixed",
            "--pheno",
            str(d / "pheno.csv"),
            "--genotypes",
            str(d / "G.npy"),
            "--scan",
            str(d / "G.npy"),
            "--out",
            str(d / "npy.json"),
            "--scan-out",
            str(d / "npy.csv"),
        ]
    )
    bed, npy = (json.loads((d / f"{n}.json").read_text()) for n in ("bed", "npy"))
    chi_bed = np.genfromtxt(d / "bed.csv", delimiter=",", names=True, dtype=None, encoding=None)["chi2"]
    chi_npy = np.loadtxt(d / "npy.csv", delimiter=",", skiprows=1)[:, 1]
    out |= {
        "bfile": {"wall_s": bed_s, "peak_rss_mb_max_so_far": bed_mb},
        "npy": {"wall_s": npy_s, "peak_rss_mb_max_so_far": npy_mb},
        "loglik_rel_diff": abs(bed["loglik"] - npy["loglik"]) / abs(npy["loglik"]),
        "heritability_max_abs_diff": float(np.max(np.abs(np.subtract(bed["heritability"], npy["heritability"])))),
        "chi2_max_rel_diff": float(np.max(np.abs(chi_bed - chi_npy) / np.maximum(np.abs(chi_npy), 1e-300))),
        "bed_file_mb": (d / "g.bed").stat().st_size / 2**20,
        "npy_file_mb": (d / "G.npy").stat().st_size / 2**20,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
