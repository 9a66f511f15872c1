"""The built-in dataset and the CSV reader of the command line, with errors that say where."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np


class DataError(ValueError):
    """Input data that cannot be fitted; the message says which file, row or column."""


MISSING_CELLS = ("", "na", "nan", "null", "none")


def read_csv(
    path: str | Path, text_columns: tuple[str, ...] = ()
) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """Read a CSV with a header row; lines starting with '#' are comments; a UTF-8 BOM is ignored.

    Returns (column names, float64 array of shape (rows, columns), {name: cells} for the
    ``text_columns``, which are kept as strings and NaN in the array). Empty cells and
    NA/NaN/null/none (any case) are missing: NaN. Raises :class:`DataError` for a missing or
    unreadable file, a ragged table, a non-numeric or infinite cell (naming the line and
    column), or a header without columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            lines = [(i + 1, row) for i, row in enumerate(csv.reader(fh)) if row and not row[0].startswith("#")]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as a UTF-8 CSV ({e})") from None
    if not lines:
        raise DataError(f"{path}: no header row")
    header = [h.strip() for h in lines[0][1]]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated or "" in header:
        raise DataError(f"{path}: column names must be unique and non-empty; repeated or empty: {repeated or ['']}")
    missing_text = [c for c in text_columns if c not in header]
    if missing_text:
        raise DataError(f"{path}: no column {missing_text[0]!r} (columns: {', '.join(header)})")
    text_index = {header.index(c): c for c in text_columns}
    values = np.full((len(lines) - 1, len(header)), np.nan)
    texts: dict[str, list[str]] = {c: [] for c in text_columns}
    for r, (lineno, row) in enumerate(lines[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}, line {lineno}: {len(row)} cells, but the header has {len(header)}")
        for c, cell in enumerate(row):
            cell = cell.strip()
            if c in text_index:
                texts[text_index[c]].append(cell)
                continue
            if cell.lower() in MISSING_CELLS:
                continue
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise DataError(f"{path}, line {lineno}, column {header[c]!r}: {cell!r} is not a number") from None
            if not np.isfinite(values[r, c]):
                raise DataError(
                    f"{path}, line {lineno}, column {header[c]!r}: {cell!r} is not finite "
                    "(leave the cell empty if the value is missing)"
                )
    return header, values, texts


def load_macrodata() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """US quarterly macro series 1959Q2-2009Q3 (public domain, from statsmodels' 'macrodata').

    Returns (time in years, Y of shape (202, 4), output names): real GDP growth
    (400·Δlog, % a year), unemployment rate, inflation and the 3-month T-bill rate,
    unstandardised. The first quarter is dropped because growth needs a previous one.
    """
    with resources.as_file(resources.files("kronlik") / "data" / "macrodata.csv") as path:
        header, table, _ = read_csv(path)
    col = {name: table[:, i] for i, name in enumerate(header)}
    time = (col["year"] + (col["quarter"] - 1) / 4)[1:]
    growth = 400.0 * np.diff(np.log(col["realgdp"]))
    Y = np.column_stack([growth, col["unemp"][1:], col["infl"][1:], col["tbilrate"][1:]])
    return time, Y, ["gdp_growth", "unemp", "infl", "tbilrate"]


def _decimal_year(stamp: datetime) -> float:
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(timezone.utc).replace(tzinfo=None)
    start, end = datetime(stamp.year, 1, 1), datetime(stamp.year + 1, 1, 1)
    return stamp.year + (stamp - start) / (end - start)


def from_decimal_year(y: float, whole_days: bool = False) -> str:
    """The ISO date-time of a decimal year (:func:`parse_times`' inverse), to the nearest second.

    With ``whole_days``, to the nearest day, as a date ('2010-04-01'): the resolution of input
    dates without a time of day. Rounding, not truncation: a date a step of decimal years after
    another lands a hair before midnight, which truncation printed as 23:59:59 the day before.
    """
    year = int(np.floor(y))
    start, end = datetime(year, 1, 1), datetime(year + 1, 1, 1)
    stamp = start + timedelta(seconds=round((y - year) * (end - start).total_seconds()))
    if whole_days:
        return (stamp + timedelta(hours=12)).date().isoformat()
    return stamp.isoformat(timespec="seconds")


def whole_days(t: np.ndarray) -> bool:
    """Whether every decimal year in ``t`` is a midnight (dates given without a time of day)."""
    return all(from_decimal_year(float(y)).endswith("T00:00:00") for y in np.asarray(t).ravel())


def parse_times(cells: list[str], where: str) -> tuple[np.ndarray, bool]:
    """(times as float64, whether they were dates) from a time column's cells.

    Numbers are taken as they are; otherwise every cell must be an ISO date or datetime
    ('2012-01-31', '2012-01-31T06:00', '2012-01-31 06:00:00+01:00'), converted to decimal years
    (2012.0 is the start of 2012). Missing cells and mixtures are refused with the row named.
    """
    empty = [i + 1 for i, c in enumerate(cells) if c.lower() in MISSING_CELLS]
    if empty:
        raise DataError(f"{where}: missing times in data rows {', '.join(map(str, empty[:10]))}")
    try:
        values = np.array([float(c) for c in cells], np.float64)
    except ValueError:
        values = None
    if values is not None:
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise DataError(f"{where}: non-finite time in data row {bad[0] + 1}")
        return values, False
    out = np.empty(len(cells))
    for i, cell in enumerate(cells):
        try:
            out[i] = _decimal_year(datetime.fromisoformat(cell.replace("Z", "+00:00")))
        except ValueError:
            raise DataError(
                f"{where}, data row {i + 1}: {cell!r} is neither a number nor an ISO date (YYYY-MM-DD[THH:MM[:SS]])"
            ) from None
    return out, True


class SimulatedTraits(NamedTuple):
    """A simulated multi-trait mixed-model data set (:func:`simulate_traits`), numpy float64."""

    Y: np.ndarray  # (T, D) traits
    kinship: np.ndarray | None  # (T, T) M = Z Zᵀ / m from m standardised SNPs; None with low_rank=True
    covariates: np.ndarray  # (T, 2) [1, x]
    genotypes: np.ndarray  # (T, n_scan) 0/1/2 allele counts for an association scan
    K: np.ndarray  # (D, D) true genetic covariance
    Sigma: np.ndarray  # (D, D) true environmental covariance
    B: np.ndarray  # (2, D) true covariate effects
    causal: np.ndarray  # indices of the scan variants with an effect
    effects: np.ndarray  # (len(causal), D) their effects
    # (D,) the heritability a kinship model sees: m̄ K_dd / (m̄ K_dd + Σ_dd + Σ_k effects_kd²)
    h2_effective: np.ndarray
    kinship_factor: np.ndarray | None = None  # (T, m) Z / √m with low_rank=True (M = its Gram), else None


def _standardise(G: np.ndarray) -> np.ndarray:
    freq = G.mean(axis=0) / 2
    return (G - 2 * freq) / np.sqrt(2 * freq * (1 - freq))


def simulate_traits(
    T: int = 300,
    D: int = 3,
    n_snps: int = 500,
    n_scan: int = 1000,
    h2: float = 0.6,
    seed: int = 0,
    *,
    low_rank: bool = False,
) -> SimulatedTraits:
    """Simulate Y ~ N(F B, M ⊗ K + I ⊗ Σ) with a kinship from genotypes, as a geneticist would test.

    Genotypes are Binomial(2, p) with allele frequencies p ~ U(0.05, 0.5) (independent SNPs);
    M = Z Zᵀ/m with Z the standardised genotypes of ``n_snps`` SNPs. K and Σ split each trait's
    polygenic + environmental variance as ``h2`` : 1 - h2 (m̄ K_dd / (m̄ K_dd + Σ_dd) = h2 with
    m̄ = mean diag M), with genetic correlations 0.5, -0.3, 0.2, ... and environmental
    correlations 0.3, 0.1, ... between consecutive traits (positive definite by construction),
    covariates F = [1, x] with x ~ N(0, 1), and three variants of a further ``n_scan`` (the scan
    set) with effects β_kd ~ 0.25 N(0, 1) · sqrt(m̄ K_dd + Σ_dd) on the traits.

    The causal variants are not in the kinship, so a model with M as the kinship counts their
    variance Σ_k β_kd² (each standardised variant has variance 1) as residual: the heritability
    it estimates is ``h2_effective`` = m̄ K_dd / (m̄ K_dd + Σ_dd + Σ_k β_kd²), about
    h2 / 1.19 on average (0.6 → about 0.5), not ``h2``. Compare a fitted ĥ² with
    ``h2_effective``.

    ``low_rank=True`` (for T in the tens of thousands) never forms M: it returns the factor
    Z/√m as ``kinship_factor`` (``kronlik.LowRank`` of it is M) and ``kinship=None``, and draws
    the genetic values as Z W/√m with W's m rows N(0, K) (the same distribution, another draw).
    """
    rng = np.random.default_rng(seed)

    def genotypes(n):
        p = rng.uniform(0.05, 0.5, size=n)
        G = rng.binomial(2, p, size=(T, n)).astype(float)
        keep = G.std(axis=0) > 0  # a monomorphic SNP cannot be standardised
        G[:, ~keep] = rng.binomial(2, 0.5, size=(T, int((~keep).sum())))
        return G

    Z = _standardise(genotypes(n_snps))
    M = None if low_rank else Z @ Z.T / n_snps
    m_bar = float(np.mean(np.sum(Z * Z, axis=1)) / n_snps if low_rank else np.mean(np.diag(M)))
    idx = np.arange(D)
    gap = np.abs(idx[:, None] - idx[None, :])
    first = np.minimum(idx[:, None], idx[None, :])
    r_g = np.where(gap == 0, 1.0, 0.0) + np.where(gap == 1, 0.5 * (-0.6) ** first, 0.0)
    r_e = np.where(gap == 0, 1.0, np.where(gap == 1, 0.3, 0.0))
    r_g, r_e = 0.5 * (r_g + r_g.T), 0.5 * (r_e + r_e.T)
    total = np.linspace(1.0, 2.0, D)
    sd_g, sd_e = np.sqrt(h2 * total / m_bar), np.sqrt((1 - h2) * total)
    K = sd_g[:, None] * r_g * sd_g[None, :]
    Sigma = sd_e[:, None] * r_e * sd_e[None, :]
    F = np.column_stack([np.ones(T), rng.normal(size=T)])
    B = np.vstack([np.linspace(1.0, -1.0, D), np.linspace(0.5, 0.2, D)])
    if low_rank:
        genetic = Z @ (rng.normal(size=(n_snps, D)) / np.sqrt(n_snps)) @ np.linalg.cholesky(K).T
    else:
        w, v = np.linalg.eigh(M)
        root = v * np.sqrt(np.clip(w, 0, None))
        genetic = root @ rng.normal(size=(T, D)) @ np.linalg.cholesky(K).T
    noise = rng.normal(size=(T, D)) @ np.linalg.cholesky(Sigma).T
    scan = genotypes(n_scan)
    causal = np.sort(rng.choice(n_scan, size=min(3, n_scan), replace=False))
    effects = 0.25 * rng.normal(size=(causal.size, D)) * np.sqrt(total)[None, :]
    Y = F @ B + genetic + noise + _standardise(scan[:, causal]) @ effects
    polygenic = m_bar * np.diag(K)
    h2_effective = polygenic / (polygenic + np.diag(Sigma) + np.sum(effects * effects, axis=0))
    factor = Z / np.sqrt(n_snps) if low_rank else None
    return SimulatedTraits(Y, M, F, scan, K, Sigma, B, causal, effects, h2_effective, factor)
