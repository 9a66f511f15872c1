"""``kronlik mixed``: the built-in default, user files, and bad input (exit 2, nothing written)."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel

import kronlik
from kronlik.__main__ import main
from kronlik.datasets import simulate_traits


@pytest.mark.slow
def test_default_runs_on_the_simulation(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["mixed", "--out", str(out), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "heritability" in text and "genetic correlations" in text and "association scan" in text
    result = json.loads(out.read_text())
    sim = simulate_traits()
    fit = kronlik.fit_mixed(sim.Y, kronlik.factorize(jnp.asarray(sim.kinship)), sim.covariates)
    assert abs(result["loglik"] - float(fit.loglik)) < 1e-6
    assert max_rel(result["heritability"], kronlik.heritability(fit)[0]) < 1e-6
    assert result["converged"] and len(result["scan"]["top"]) == 3
    # the strongest simulated causal variant is found first
    assert result["scan"]["top"][0] in result["truth"]["causal"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    sim = simulate_traits(T=60, D=2, n_snps=80, n_scan=9, seed=5)
    header = "height,weight\n"
    (d / "pheno.csv").write_text(header + "\n".join(f"{a:.17g},{b:.17g}" for a, b in sim.Y) + "\n")
    (d / "cov.csv").write_text("x\n" + "\n".join(f"{x:.17g}" for x in sim.covariates[:, 1]) + "\n")
    np.save(d / "kin.npy", sim.kinship)
    np.save(d / "scan.npy", sim.genotypes)
    return d, sim


@pytest.mark.slow
def test_user_files_and_scan_table(files, capsys):
    d, sim = files
    args = ["mixed", "--pheno", str(d / "pheno.csv"), "--kinship", str(d / "kin.npy"), "--covariates"]
    args += [str(d / "cov.csv"), "--scan", str(d / "scan.npy"), "--scan-out", str(d / "scan.csv")]
    assert main([*args, "--out", str(d / "fit.json")]) == 0
    capsys.readouterr()
    fit = kronlik.fit_mixed(sim.Y, sim.kinship, sim.covariates)
    want = kronlik.scan(fit, sim.genotypes)
    table = np.loadtxt(d / "scan.csv", delimiter=",", skiprows=1)
    header = (d / "scan.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["variant", "chi2", "df", "p_value"] and "effect_height" in header
    assert max_rel(table[:, 1], want.chi2) < 1e-6 and max_rel(table[:, 4:6], want.effect) < 1e-6
    saved = json.loads((d / "fit.json").read_text())
    assert saved["traits"] == ["height", "weight"] and saved["covariates"] == ["intercept", "x"]
    assert max_rel(saved["K"], fit.K) < 1e-6
    # genotypes instead of a kinship: the LowRank path
    G = np.round(np.random.default_rng(0).uniform(0, 2, (60, 100)))
    np.save(d / "geno.npy", G)
    assert main(["mixed", "--pheno", str(d / "pheno.csv"), "--genotypes", str(d / "geno.npy")]) == 0
    assert "heritability" in capsys.readouterr().out


@pytest.mark.slow
def test_empty_cells_are_missing_phenotypes(files, capsys):
    """Empty cells: the exact fit of the observed cells; a row with no trait is dropped."""
    d, sim = files
    Y = sim.Y.copy()
    rng = np.random.default_rng(6)
    Y[rng.random(Y.shape) < 0.15] = np.nan
    Y[7] = np.nan  # nothing observed: dropped
    cell = lambda x: "" if np.isnan(x) else f"{x:.17g}"  # noqa: E731
    (d / "gappy.csv").write_text("height,weight\n" + "\n".join(f"{cell(a)},{cell(b)}" for a, b in Y) + "\n")
    args = ["mixed", "--pheno", str(d / "gappy.csv"), "--kinship", str(d / "kin.npy"), "--covariates"]
    args += [str(d / "cov.csv"), "--scan", str(d / "scan.npy"), "--scan-out", str(d / "gappy_scan.csv")]
    assert main([*args, "--out", str(d / "gappy.json")]) == 0
    err = capsys.readouterr().err
    keep = np.arange(60) != 7
    mask = ~np.isnan(Y[keep])
    assert f"{int((~mask).sum())} missing phenotypes" in err and "1 individuals with no observed trait dropped" in err
    fit = kronlik.fit_mixed(Y[keep], sim.kinship[np.ix_(keep, keep)], sim.covariates[keep], mask=mask)
    saved = json.loads((d / "gappy.json").read_text())
    assert abs(saved["loglik"] - float(fit.loglik)) < 1e-6 * abs(float(fit.loglik))
    assert saved["missing_phenotypes"] == int((~mask).sum()) and saved["dropped_individuals"] == 1
    want = kronlik.scan(fit, sim.genotypes[keep])
    table = np.loadtxt(d / "gappy_scan.csv", delimiter=",", skiprows=1)
    assert max_rel(table[:, 1], want.chi2) < 1e-6


def _bad(d, sim):
    nan_pheno = d / "nan.csv"
    nan_pheno.write_text("a,b\n" + "\n".join(f"{y[0]}," for y in sim.Y))  # trait b never observed
    np.save(d / "kin_small.npy", sim.kinship[:10, :10])
    (d / "const.csv").write_text("c\n" + "1\n" * 60)
    scan_nan = sim.genotypes.copy()
    scan_nan[2, 1] = np.nan
    np.save(d / "scan_nan.npy", scan_nan)
    p, k = str(d / "pheno.csv"), str(d / "kin.npy")
    return {
        "no such file": ["--pheno", str(d / "none.csv"), "--kinship", k],
        "exactly one of --kinship": ["--pheno", p],
        "\\['b'\\] have no observed value": ["--pheno", str(nan_pheno), "--kinship", k],
        "must be \\(60, 60\\)": ["--pheno", p, "--kinship", str(d / "kin_small.npy")],
        "linearly dependent": ["--pheno", p, "--kinship", k, "--covariates", str(d / "const.csv")],
        "non-finite": ["--pheno", p, "--kinship", k, "--scan", str(d / "scan_nan.npy")],
        "need --pheno": ["--kinship", k],
        "--bfile/--grm need --pheno": ["--bfile", str(d / "plink_prefix")],  # not ignored for the simulation
        "--top must be": ["--top", "-1"],
        "must be different": ["--out", str(d / "x.json"), "--scan-out", str(d / "x.json")],
    }


@pytest.mark.parametrize("case", range(10))
def test_bad_input_exits_2_and_writes_nothing(files, capsys, case):
    d, sim = files
    message, args = list(_bad(d, sim).items())[case]
    out = d / f"never{case}.json"
    assert main(["mixed", *args, "--out", str(out)] if "--out" not in args else ["mixed", *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and not (d / "x.json").exists()
