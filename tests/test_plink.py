"""PLINK/GCTA files (kronlik.plink, ``kronlik mixed --bfile/--grm``): readers against what they wrote,
GCTA's standardisation against its formula, and the CLI against the in-order .npy path."""

import json

import numpy as np
import pytest

from kronlik import plink
from kronlik.__main__ import main
from kronlik.datasets import simulate_traits

bed_reader = pytest.importorskip("bed_reader")  # the [plink] extra; CI's [test] extra installs it


def _write_bed(prefix, G, iids):
    m = G.shape[1]
    bed_reader.to_bed(
        f"{prefix}.bed",
        np.where(np.isnan(G), np.nan, G).astype(np.float32),
        properties={
            "fid": [f"f{i}" for i in iids],
            "iid": list(iids),
            "sid": [f"rs{k}" for k in range(m)],
            "chromosome": ["1"] * (m // 2) + ["2"] * (m - m // 2),
            "bp_position": list(range(100, 100 + m)),
            "allele_1": ["A"] * m,
            "allele_2": ["G"] * m,
        },
    )


def test_tables_grm_and_standardisation(tmp_path):
    (tmp_path / "p.txt").write_text("FID IID h w\nf1 a 1.5 NA\nf2 b -9 2\nf3 c 0.25 3e-1\n")
    t = plink.read_table(tmp_path / "p.txt")
    assert t.names == ["h", "w"] and t.ids.tolist() == [["f1", "a"], ["f2", "b"], ["f3", "c"]]
    assert np.array_equal(np.isnan(t.values), [[False, True], [True, False], [False, False]])
    assert t.values[2].tolist() == [0.25, 0.3]
    (tmp_path / "p.csv").write_text("IID,h,w\na,1.5,\nb,,2\n")
    t = plink.read_table(tmp_path / "p.csv")
    assert t.ids.tolist() == [["a", "a"], ["b", "b"]] and np.isnan(t.values[0, 1]) and np.isnan(t.values[1, 0])
    (tmp_path / "dup.csv").write_text("IID,h\na,1\na,2\n")
    with pytest.raises(ValueError, match="appears twice"):
        plink.read_table(tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("IID,h\na,x\n")
    with pytest.raises(ValueError, match="not a number"):
        plink.read_table(tmp_path / "bad.csv")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 7))
    M = X @ X.T / 7
    plink.write_grm(tmp_path / "k", np.array([[f"f{i}", f"i{i}"] for i in range(5)]), M)
    ids, back = plink.read_grm(tmp_path / "k")
    assert ids[:, 1].tolist() == [f"i{i}" for i in range(5)]
    assert np.array_equal(back, M.astype(np.float32).astype(float)) and np.array_equal(back, back.T)
    counts = np.array([[0, 1, 2, 1], [2, 1, np.nan, 1], [1, 2, 0, 1]], dtype=float)
    Z, freq, keep = plink.standardise(counts)
    assert keep.tolist() == [True, True, True, False]  # the last variant does not vary (all heterozygous)
    p = np.array([3 / 6, 4 / 6, 2 / 4])
    want = (counts[:, :3] - 2 * p) / np.sqrt(2 * p * (1 - p))
    want[1, 2] = 0.0  # a missing genotype: the mean
    assert np.allclose(Z, want, rtol=1e-15, atol=0) and np.allclose(freq, p, rtol=1e-15)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plink")
    T, m = 60, 150  # more variants than individuals: the streamed dense GRM
    sim = simulate_traits(T=T, D=2, n_snps=40, n_scan=m, seed=7)
    G = sim.genotypes.astype(float)
    iids = [f"i{k}" for k in range(T)]
    _write_bed(d / "g", G, iids)
    np.save(d / "G.npy", G)
    Y = sim.Y.copy()
    Y[np.random.default_rng(8).random(Y.shape) < 0.1] = np.nan
    cell = lambda x: "NA" if np.isnan(x) else f"{x:.17g}"  # noqa: E731
    order = np.random.default_rng(9).permutation(T)  # the phenotype file in another order, one extra
    lines = ["FID IID height weight"] + [f"f{iids[k]} {iids[k]} {cell(Y[k, 0])} {cell(Y[k, 1])}" for k in order]
    (d / "pheno.txt").write_text("\n".join([*lines, "fx stranger 1.0 2.0"]) + "\n")
    plain = lambda x: "" if np.isnan(x) else f"{x:.17g}"  # noqa: E731
    (d / "pheno.csv").write_text("height,weight\n" + "\n".join(f"{plain(a)},{plain(b)}" for a, b in Y) + "\n")
    return d, sim, Y


@pytest.mark.slow
def test_bfile_equals_the_npy_path_and_the_grm(files, capsys):
    d, sim, Y = files
    run = ["mixed", "--pheno", str(d / "pheno.txt"), "--bfile", str(d / "g"), "--batch-size", "64"]
    assert main([*run, "--out", str(d / "bed.json"), "--scan-out", str(d / "bed.csv"), "--top", "3"]) == 0
    err = capsys.readouterr().err
    assert "1 no genotypes" not in err and "missing phenotypes" in err and "150/150 variants" in err
    npy = ["mixed", "--pheno", str(d / "pheno.csv"), "--genotypes", str(d / "G.npy"), "--scan", str(d / "G.npy")]
    assert main([*npy, "--out", str(d / "npy.json"), "--scan-out", str(d / "npy.csv")]) == 0
    capsys.readouterr()
    bed, npy_fit = (json.loads((d / f"{n}.json").read_text()) for n in ("bed", "npy"))
    assert abs(bed["loglik"] - npy_fit["loglik"]) < 1e-8 * abs(npy_fit["loglik"])
    assert np.allclose(bed["heritability"], npy_fit["heritability"], rtol=1e-6, atol=1e-9)
    table = np.genfromtxt(d / "bed.csv", delimiter=",", names=True, dtype=None, encoding=None)
    want = np.loadtxt(d / "npy.csv", delimiter=",", skiprows=1)
    assert table["snp"][0] == "rs0" and table["chr"][-1] == 2 and table["a1"][0] == "A"
    assert np.allclose(table["chi2"], want[:, 1], rtol=1e-6) and np.allclose(table["p"], want[:, 3], rtol=1e-6)
    assert np.allclose(table["freq_a1"], np.mean(sim.genotypes, axis=0) / 2, rtol=1e-12)
    # the same kinship as a GCTA .grm.bin (float32: the fit agrees to its rounding)
    from kronlik.plink import Bed, kinship_from_bed

    ids = Bed(d / "g").ids
    A, _, is_factor = kinship_from_bed(Bed(d / "g"), np.arange(60), 64)
    assert not is_factor
    plink.write_grm(d / "k", ids, A)
    assert main(["mixed", "--pheno", str(d / "pheno.txt"), "--grm", str(d / "k"), "--out", str(d / "grm.json")]) == 0
    capsys.readouterr()
    grm = json.loads((d / "grm.json").read_text())
    assert abs(grm["loglik"] - bed["loglik"]) < 1e-4 * abs(bed["loglik"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bfile", "nowhere"], "nowhere.bed not found"),
        (["--bfile", "{d}/g", "--kinship", "{d}/G.npy"], "use one kind"),
        (["--bfile", "{d}/g", "--batch-size", "0"], "--batch-size must be"),
        (["--grm", "{d}/none"], "No such file"),
    ],
)
def test_bad_plink_input_exits_2(files, capsys, args, message):
    d, _, _ = files
    args = [a.format(d=d) for a in args]
    assert main(["mixed", "--pheno", str(d / "pheno.txt"), *args]) == 2
    assert message in capsys.readouterr().err
