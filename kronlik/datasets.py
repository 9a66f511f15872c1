"""The built-in dataset and the CSV reader of the command line, with errors that say where."""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

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
