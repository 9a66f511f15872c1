"""The built-in dataset and the CSV reader of the command line, with errors that say where."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Input data that cannot be fitted; the message says which file, row or column."""


def read_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a numeric CSV with a header row; lines starting with '#' are comments.

    Returns (column names, float64 array of shape (rows, columns)). Raises
    :class:`DataError` for a missing file, a ragged or non-numeric table (naming the
    line and column), or empty/NaN cells (naming the data rows, counted from 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    with path.open(newline="") as fh:
        lines = [(i + 1, row) for i, row in enumerate(csv.reader(fh)) if row and not row[0].startswith("#")]
    if not lines:
        raise DataError(f"{path}: no header row")
    header = [h.strip() for h in lines[0][1]]
    values = np.empty((len(lines) - 1, len(header)))
    missing = []
    for r, (lineno, row) in enumerate(lines[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}, line {lineno}: {len(row)} cells, but the header has {len(header)}")
        for c, cell in enumerate(row):
            cell = cell.strip()
            try:
                values[r, c] = float(cell) if cell else np.nan
            except ValueError:
                raise DataError(f"{path}, line {lineno}, column {header[c]!r}: {cell!r} is not a number") from None
        if not np.all(np.isfinite(values[r])):
            missing.append(r + 1)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{path}: missing, NaN or infinite cells in data rows {shown}")
    return header, values


def load_macrodata() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """US quarterly macro series 1959Q2-2009Q3 (public domain, from statsmodels' 'macrodata').

    Returns (time in years, Y of shape (202, 4), output names): real GDP growth
    (400·Δlog, % a year), unemployment rate, inflation and the 3-month T-bill rate,
    unstandardised. The first quarter is dropped because growth needs a previous one.
    """
    with resources.as_file(resources.files("kronlik") / "data" / "macrodata.csv") as path:
        header, table = read_csv(path)
    col = {name: table[:, i] for i, name in enumerate(header)}
    time = (col["year"] + (col["quarter"] - 1) / 4)[1:]
    growth = 400.0 * np.diff(np.log(col["realgdp"]))
    Y = np.column_stack([growth, col["unemp"][1:], col["infl"][1:], col["tbilrate"][1:]])
    return time, Y, ["gdp_growth", "unemp", "infl", "tbilrate"]
