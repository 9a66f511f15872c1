r"""The files geneticists have: PLINK 1 binary genotypes, GCTA kinships, phenotype tables with IDs.

- ``.bed/.bim/.fam`` (PLINK 1) through `bed-reader <https://pypi.org/project/bed-reader/>`_
  (``pip install kronlik[plink]``): maintained, reads any subset of variants straight from the
  file (so the kinship and the scan stream it in batches of variants, in bounded memory), and
  writes .bed files too. Allele counts are of allele 1 (the .bim's 5th column, PLINK's A1).
- ``.grm.bin/.grm.id`` (GCTA): the lower triangle, diagonal included, row by row, float32.
- Phenotype and covariate tables keyed by FID and IID: PLINK's whitespace format (``FID IID v1
  v2 ...``, a header line starting with FID optional; -9 and NA are missing) or a CSV whose header
  has FID and IID (or IID alone) columns (empty cells, NA and -9 are missing).

The kinship is GCTA's standardised genetic relationship matrix, A = Z Zᵀ / m with
z_ti = (x_ti - 2p_i) / √(2p_i(1 - p_i)), p_i the frequency of allele 1 among the non-missing
genotypes of the individuals analysed; a missing genotype gets z = 0 (the mean: mean imputation,
where GCTA instead drops the pair from that SNP's sum), and variants whose counts do not vary
among those individuals (monomorphic, or all heterozygous) are left out.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "Bed",
    "Table",
    "kinship_from_bed",
    "read_grm",
    "read_table",
    "standardise",
    "write_grm",
]

_MISSING = {"", "NA", "na", "NaN", "nan", "-9", "-9.0"}


def _bed_reader():
    try:
        import bed_reader
    except ImportError:
        raise ImportError("reading PLINK .bed files needs bed-reader: pip install 'kronlik[plink]'") from None
    return bed_reader


class Table(NamedTuple):
    """A table keyed by individual: ``ids`` (n, 2) FID, IID strings, ``names`` (k,), ``values`` (n, k), NaN missing."""

    ids: np.ndarray
    names: list[str]
    values: np.ndarray


def _number(cell: str, where: str) -> float:
    cell = cell.strip()
    if cell in _MISSING:
        return np.nan
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{where}: {cell!r} is not a number (missing values: empty, NA or -9)") from None


def read_table(path: str | Path) -> Table:
    """Read a phenotype or covariate table keyed by FID/IID (module docstring); IIDs must be unique."""
    path = Path(path)
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    first = lines[0]
    if "," in first:
        rows = list(csv.reader(lines))
        header = [h.strip() for h in rows[0]]
        if "IID" not in header:
            raise ValueError(f"{path}: a CSV keyed by individual needs an IID column (and optionally FID)")
        i_iid = header.index("IID")
        i_fid = header.index("FID") if "FID" in header else None
        keep = [j for j in range(len(header)) if j not in (i_iid, i_fid)]
        names = [header[j] for j in keep]
        body = rows[1:]
    else:
        rows = [ln.split() for ln in lines]
        has_header = rows[0][0] == "FID" and rows[0][1] == "IID"
        names = rows[0][2:] if has_header else [f"trait{j}" for j in range(len(rows[0]) - 2)]
        body = rows[1:] if has_header else rows
        i_fid, i_iid, keep = 0, 1, list(range(2, len(rows[0])))
    if not names:
        raise ValueError(f"{path} has no columns besides FID and IID")
    ids, values = [], []
    for r, row in enumerate(body, start=2 if names else 1):
        if len(row) != len(keep) + (2 if i_fid is not None else 1):
            raise ValueError(f"{path} line {r}: {len(row)} fields; the header has {len(keep) + 2 - (i_fid is None)}")
        fid = row[i_fid].strip() if i_fid is not None else row[i_iid].strip()
        ids.append((fid, row[i_iid].strip()))
        values.append([_number(row[j], f"{path} line {r}") for j in keep])
    ids = np.asarray(ids, dtype=str).reshape(-1, 2)
    seen, dup = set(), None
    for iid in ids[:, 1]:
        if iid in seen:
            dup = iid
            break
        seen.add(iid)
    if dup is not None:
        raise ValueError(f"{path}: individual {dup!r} appears twice")
    return Table(ids, names, np.asarray(values, dtype=float).reshape(len(ids), len(names)))


def read_grm(prefix: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """GCTA's ``PREFIX.grm.bin`` and ``PREFIX.grm.id``: (ids (T, 2), the (T, T) kinship in float64)."""
    prefix = str(prefix)
    ids = np.asarray([ln.split()[:2] for ln in Path(prefix + ".grm.id").read_text().splitlines() if ln.strip()], str)
    T = ids.shape[0]
    values = np.fromfile(prefix + ".grm.bin", dtype="<f4")
    if values.size != T * (T + 1) // 2:
        raise ValueError(
            f"{prefix}.grm.bin holds {values.size} numbers; {T} individuals in .grm.id need {T * (T + 1) // 2}"
        )
    M = np.zeros((T, T))
    rows, cols = np.tril_indices(T)
    M[rows, cols] = values
    M[cols, rows] = values
    return ids, M


def write_grm(prefix: str | Path, ids: np.ndarray, M: np.ndarray) -> None:
    """Write GCTA's binary GRM (float32 lower triangle) and its ``.grm.id``."""
    prefix = str(prefix)
    rows, cols = np.tril_indices(M.shape[0])
    np.asarray(M, dtype="<f4")[rows, cols].tofile(prefix + ".grm.bin")
    Path(prefix + ".grm.id").write_text("".join(f"{f}\t{i}\n" for f, i in np.asarray(ids)))


def standardise(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GCTA's standardisation of (T, m) allele counts with NaN missing.

    Returns (Z (T, m') of the variants whose counts vary, their allele-1 frequencies (m'), and the
    boolean (m,) selecting them); a missing count standardises to 0 (mean imputation).
    """
    counts = np.asarray(counts, dtype=float)
    with warnings.catch_warnings():  # a variant with every genotype missing: NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        freq = np.nanmean(counts, axis=0) / 2.0
        spread = np.nanmax(counts, axis=0) - np.nanmin(counts, axis=0) if counts.shape[0] else freq * 0
    var = 2.0 * freq * (1.0 - freq)
    keep = np.isfinite(var) & (var > 1e-12) & (spread > 0)  # constant counts (e.g. all 1) carry nothing
    centred = counts[:, keep] - 2.0 * freq[keep]
    Z = np.where(np.isnan(centred), 0.0, centred) / np.sqrt(var[keep])
    return Z, freq[keep], keep


class Bed:
    """A PLINK 1 file set opened for reading in batches of variants (bed-reader)."""

    def __init__(self, prefix: str | Path):
        prefix = str(prefix)
        for ext in (".bed", ".bim", ".fam"):
            if not Path(prefix + ext).is_file():
                raise FileNotFoundError(f"--bfile {prefix}: {prefix + ext} not found")
        self._bed = _bed_reader().open_bed(prefix + ".bed")
        self.ids = np.column_stack([self._bed.fid, self._bed.iid]).astype(str)
        self.chromosome = np.asarray(self._bed.chromosome).astype(str)
        self.snp = np.asarray(self._bed.sid).astype(str)
        self.bp = np.asarray(self._bed.bp_position)
        self.allele_1 = np.asarray(self._bed.allele_1).astype(str)
        self.allele_2 = np.asarray(self._bed.allele_2).astype(str)

    @property
    def num_variants(self) -> int:
        return int(self.snp.size)

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """(the variants' slice, their (len(rows), b) allele-1 counts as float64 with NaN missing)."""
        for start in range(0, self.num_variants, batch_size):
            cols = slice(start, min(start + batch_size, self.num_variants))
            yield cols, self._bed.read(index=(rows, cols), dtype="float64", order="C")


def kinship_from_bed(bed: Bed, rows: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, int, bool]:
    """GCTA's GRM of the individuals ``rows`` (module docstring), streamed from the file.

    Each batch of variants is standardised with the allele frequencies of those individuals and
    added, A = Σ_batches Z_b Z_bᵀ / m: memory O(T² + T·batch). With no more variants than
    individuals, the factor Z/√m (T × m) is returned instead of A (for ``kronlik.LowRank``: O(T m)
    memory and a thin SVD).

    Returns:
      (A (T, T) or the factor (T, m), m the polymorphic variants, whether it is the factor).
    """
    T = len(rows)
    if bed.num_variants <= T:
        Z = np.concatenate([standardise(counts)[0] for _, counts in bed.batches(rows, batch_size)], axis=1)
        if Z.shape[1] == 0:
            raise ValueError("every variant is monomorphic among these individuals")
        return Z / np.sqrt(Z.shape[1]), Z.shape[1], True
    A = np.zeros((T, T))
    m = 0
    for _, counts in bed.batches(rows, batch_size):
        Z = standardise(counts)[0]
        A += Z @ Z.T
        m += Z.shape[1]
    if m == 0:
        raise ValueError("every variant is monomorphic among these individuals")
    return A / m, m, False
