"""Gap filling on a real gappy series, scored on held-out cells: joint model vs independent GPs vs complete cases.

The data: monthly log prices of five stocks, 2000-2010 (Vega's ``stocks.csv`` from the
``vega_datasets`` package, written by ``examples/stocks_with_gaps.py``; GOOG starts in August 2004,
so 55 of 615 cells are missing to begin with). For each seed a fraction (--hold-out, 20 %) of the
OBSERVED cells is hidden at random, and three fits by ``kronlik fit --kernel matern32`` (the exact
state-space path, float64) predict them:

* ``joint``: the table with the held-out cells (and GOOG's gap) empty: the multi-output GP with a
  free K and per-output noise, through the joint-state Kalman filter; the held-out cells are read
  from ``--predictions``' ``gap`` rows (the posterior given the observed cells only);
* ``independent``: each stock alone (D = 1, its own kernel, amplitude and noise), the same way;
* ``complete cases``: the joint model fitted to the rows with no missing cell only (what a method
  without missing-data support does), predicting the held-out times with ``--predict-at``.

Scores over the held-out cells, in the data's units (log price): RMSE of the posterior mean and
NLPD = mean of ½ log(2π sd²) + (y - μ)² / (2 sd²) with sd the sd of a new observation. Run:

    python benchmarks/gap_filling.py --seeds 0 1 2 --json benchmarks/results_gap_filling.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _table():
    from stocks_with_gaps import stocks_table

    symbols, dates, prices = stocks_table()
    Y = np.array([[math.log(prices[s, d]) if (s, d) in prices else np.nan for s in symbols] for d in dates])
    return symbols, dates, Y


def _write(path: Path, dates, names, Y) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["date", *names])
        for d, row in zip(dates, Y):
            w.writerow([d] + ["" if np.isnan(v) else f"{v:.10g}" for v in row])


def _fit(csv_path: Path, pred: Path, *extra) -> tuple[list[list[str]], list[str]]:
    from kronlik.__main__ import main

    argv = ["fit", "--data", str(csv_path), "--time-column", "date", "--kernel", "matern32", "--float64"]
    argv += ["--predictions", str(pred), *extra]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    if code != 0:
        raise RuntimeError(err.getvalue())
    lines = pred.read_text().splitlines()
    return [line.split(",") for line in lines[1:]], lines[0].split(",")


def _cells(rows, header, names):
    """{(date, name): (mean, sd of a new observation)} from a predictions table."""
    out = {}
    for r in rows:
        for n in names:
            out[r[1], n] = (float(r[header.index(f"{n}_mean")]), float(r[header.index(f"{n}_sd_observation")]))
    return out


def _score(truth: dict, pred: dict) -> dict:
    err, nlpd = [], []
    for key, y in truth.items():
        mu, sd = pred[key]
        err.append(y - mu)
        nlpd.append(0.5 * math.log(2 * math.pi * sd * sd) + 0.5 * ((y - mu) / sd) ** 2)
    return {"rmse": float(np.sqrt(np.mean(np.square(err)))), "nlpd": float(np.mean(nlpd)), "cells": len(err)}


def run(seed: int, hold_out: float, work: Path) -> dict:
    symbols, dates, Y = _table()
    names = [f"log_{s}" for s in symbols]
    rng = np.random.default_rng(seed)
    held = np.isfinite(Y) & (rng.uniform(size=Y.shape) < hold_out)
    Yh = np.where(held, np.nan, Y)
    truth = {(dates[i], names[j]): float(Y[i, j]) for i, j in zip(*np.nonzero(held))}
    scores = {}

    csv_path = work / f"joint{seed}.csv"
    _write(csv_path, dates, names, Yh)
    scores["joint"] = _score(truth, _cells(*_fit(csv_path, work / f"joint{seed}_pred.csv"), names))

    independent = {}
    for j, n in enumerate(names):
        one = work / f"one{seed}_{j}.csv"
        _write(one, dates, [n], Yh[:, [j]])
        independent.update(_cells(*_fit(one, work / f"one{seed}_{j}_pred.csv"), [n]))
    scores["independent"] = _score(truth, independent)

    complete = np.isfinite(Yh).all(axis=1)
    cc = work / f"cc{seed}.csv"
    _write(cc, [d for d, k in zip(dates, complete) if k], names, Yh[complete])
    at = work / f"at{seed}.csv"
    at.write_text("date\n" + "\n".join(sorted({d for d, _ in truth})) + "\n")
    cc_pred = _cells(*_fit(cc, work / f"cc{seed}_pred.csv", "--predict-at", str(at)), names)
    scores["complete cases"] = _score(truth, cc_pred)
    scores["complete cases"]["rows used"] = int(complete.sum())
    row = {"seed": seed, "hold_out": hold_out, "rows": len(dates), "held_out_cells": len(truth), **scores}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python benchmarks/gap_filling.py")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--hold-out", type=float, default=0.2)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(s, a.hold_out, Path(tmp)) for s in a.seeds]
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
