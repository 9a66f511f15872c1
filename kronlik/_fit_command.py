"""``kronlik fit``: read a table, choose the model's size, fit, report, predict, plot.

Everything that can be wrong with the arguments or the data is found before any fitting starts
(exit 2, one message, nothing written); outputs are written at the end, each atomically.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .datasets import DataError, _decimal_year, from_decimal_year, load_macrodata, parse_times, read_csv, whole_days

# Above this many rows the default is the low-rank path: eigh of a T×T M at every step costs
# about T³/3·10 flops (0.3 s at T = 1000 on 2 cores; a fit takes ~100-500 steps).
DENSE_MAX_ROWS = 1000
DEFAULT_RANK = 200
# Refuse a masked fit whose missing entries alone cost more than this per evaluation (the
# Schur complement: m T D (r + D) + m² T D + m³ flops; 3e11 is about a minute on 2 cores).
MASKED_FLOP_LIMIT = 3e11
NUGGET = 1e-6  # added to the kernel matrix (whose diagonal is at least 1): M stays definite
DEFAULT_PREDICTIONS = "predictions.csv"  # where --forecast/--predict-at write without --predictions
# A period below this fraction of the time span leaves no digit of the phase π Δt / p (float64).
MIN_PERIOD_PER_SPAN = 1e-12
# Base kernels with an exact state-space form (kronlik.statespace): --method auto fits these by
# Kalman recursions at any T, O(T) per step, the same model as the dense T×T path.
STATE_SPACE_KERNELS = ("matern12", "matern32", "matern52")


class Table(NamedTuple):
    """The data as read: times (None: row numbers), Y with NaN where missing, what was done."""

    t: np.ndarray | None  # (T,) sorted
    Y: np.ndarray  # (T, D), NaN = missing
    names: list[str]
    M: np.ndarray | None  # given (npz)
    K: np.ndarray | None  # given (npz)
    time_label: str
    dates: bool
    notes: list[str]


def _fail(message: str) -> int:
    print(f"kronlik fit: error: {message}", file=sys.stderr)
    return 2


def _writable(path: str, flag: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{flag} {path}: is a directory")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise DataError(f"{flag} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK):
        raise DataError(f"{flag} {path}: directory {parent} is not writable")


def _write_all(outputs: list[tuple[str, str | None, object]]) -> None:
    """Write (path, text, figure) outputs all or none: each to a temporary file first, then renamed."""
    staged = []
    try:
        for path, text, figure in outputs:
            tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
            staged.append((tmp, path))
            if figure is not None:
                figure.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".").lower() or "png")
            else:
                tmp.write_text(text)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument, before any work: DataError naming the flag."""
    if args.steps < 1:
        raise DataError(f"--steps must be at least 1; got {args.steps}")
    for flag, value in (("--lr", args.lr), ("--tol", args.tol)):
        if not (math.isfinite(value) and value > 0):
            raise DataError(f"{flag} must be a positive number; got {value}")
    if args.rank is not None and args.rank < 1:
        raise DataError(f"--rank must be at least 1; got {args.rank}")
    if args.forecast is not None and args.forecast < 1:
        raise DataError(f"--forecast must be at least 1; got {args.forecast}")
    if args.period is not None and not (math.isfinite(args.period) and args.period > 0):
        raise DataError(f"--period must be a positive number; got {args.period}")
    predicting = args.forecast is not None or args.predict_at is not None
    if args.predict_at is not None and not Path(args.predict_at).is_file():
        raise DataError(f"--predict-at: no such file: {args.predict_at}")
    if args.data is not None and args.data.endswith(".npz"):
        for flag, given in (
            ("--forecast", args.forecast),
            ("--predict-at", args.predict_at),
            ("--kernel", args.kernel),
        ):
            if given is not None:
                raise DataError(f"{flag} needs a time axis: a CSV (or the built-in data), not an .npz with a fixed M")
    from . import kernels

    try:
        kernels.parse("rbf" if args.kernel is None else args.kernel)
    except ValueError as e:
        raise DataError(f"--kernel: {e}") from None
    outputs = [("--out", args.out), ("--plot", args.plot)]
    if predicting or args.predictions is not None:
        outputs.append(("--predictions", predictions_path(args)))
    outputs = [(flag, path) for flag, path in outputs if path]
    inputs = [Path(p).resolve() for p in (args.data, args.predict_at) if p]
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        _writable(path, flag)
        where = Path(path).resolve()
        if where in inputs:
            raise DataError(f"{flag} {path}: is an input file; it would be overwritten")
        if where in seen:
            raise DataError(f"{flag} and {seen[where]} name the same file {path}")
        seen[where] = flag
    if args.plot:
        try:
            import matplotlib
        except ImportError:
            raise DataError("--plot needs matplotlib (pip install 'kronlik[plot]')") from None
        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        supported = Figure().canvas.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix and suffix not in supported:
            raise DataError(
                f"--plot {args.plot}: unsupported image format {suffix!r}; use one of {', '.join(sorted(supported))}"
            )


def predictions_path(args: argparse.Namespace) -> str:
    return args.predictions or DEFAULT_PREDICTIONS


def _span(table: Table) -> float:
    """The time span that fit_table scales lengthscales and periods by (1 for a single time)."""
    if table.t is None:
        return float(table.Y.shape[0] - 1) or 1.0
    return float(table.t[-1] - table.t[0]) or 1.0


def check_periods(args: argparse.Namespace, table: Table) -> None:
    """Fixed periods of --kernel and --period against the time span, before any work."""
    if table.M is not None:
        return
    from . import kernels

    span = _span(table)
    given = [(f"--kernel: periodic({p:g})", p) for p in kernels.parse(args.kernel or "rbf").fixed_periods()]
    if args.period is not None:
        given.append((f"--period {args.period:g}", args.period))
    for what, period in given:
        if period < MIN_PERIOD_PER_SPAN * span:
            raise DataError(
                f"{what}: the period is below {MIN_PERIOD_PER_SPAN:g} × the time span ({span:.6g} in "
                f"{table.time_label}): the phase π·Δt/period is lost to round-off; periods are in those units"
            )


def load_table(args: argparse.Namespace) -> Table:
    if args.data is None:
        t, Y, names = load_macrodata()
        return Table(t, Y, names, None, None, "time (years)", False, [])
    if args.data.endswith(".npz"):
        try:
            with np.load(args.data) as z:
                arrays = {k: np.asarray(z[k], np.float64) for k in z.files}
        except FileNotFoundError:
            raise DataError(f"no such file: {args.data}") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{args.data}: cannot read as .npz ({e})") from None
        if not {"Y", "M", "K"} <= set(arrays):
            raise DataError(f"{args.data}: an .npz needs arrays Y, M and K; it has {sorted(arrays)}")
        Y, M, K = arrays["Y"], arrays["M"], arrays["K"]
        if Y.ndim != 2 or M.shape != (Y.shape[0],) * 2 or K.shape != (Y.shape[1],) * 2:
            raise DataError(
                f"{args.data}: need Y (T, D), M (T, T), K (D, D); got Y {Y.shape}, M {M.shape}, K {K.shape}"
            )
        if not (np.all(np.isfinite(M)) and np.all(np.isfinite(K)) and not np.any(np.isinf(Y))):
            raise DataError(f"{args.data}: M and K must be finite, and Y finite or NaN (missing)")
        names = [f"y{j}" for j in range(Y.shape[1])]
        return Table(None, Y, names, M, K, "row", False, ["M and K as given: Σ fitted in the data's units"])
    text = (args.time_column,) if args.time_column else ()
    header, table, texts = read_csv(args.data, text)
    notes = []
    if args.time_column is None:
        t, dates, label = None, False, "row"
    else:
        i = header.index(args.time_column)
        t, dates = parse_times(texts[args.time_column], f"{args.data}, column {args.time_column!r}")
        table, header = np.delete(table, i, axis=1), header[:i] + header[i + 1 :]
        label = f"{args.time_column} (decimal years)" if dates else args.time_column
        if dates:
            notes.append(f"column {args.time_column!r}: ISO dates converted to decimal years")
        if np.any(np.diff(t) < 0):
            order = np.argsort(t, kind="stable")
            t, table = t[order], table[order]
            notes.append(f"rows sorted by {args.time_column!r} (they were not in time order)")
    return Table(t, table, header, None, None, label, dates, notes)


class Standardised(NamedTuple):
    Y: np.ndarray  # (T, D) zero-filled where missing
    mask: np.ndarray | None  # (T, D) or None when complete
    mean: np.ndarray
    scale: np.ndarray


def standardise(table: Table) -> Standardised:
    """Column means and standard deviations over the observed entries; refuses what cannot be fitted."""
    Y = table.Y
    T, D = Y.shape
    if T < 2:
        raise DataError(f"need at least 2 rows to fit; got {T}")
    if D < 1:
        raise DataError("need at least one output column")
    observed = np.isfinite(Y)
    counts = observed.sum(axis=0)
    few = [n for n, c in zip(table.names, counts) if c < 2]
    if few:
        raise DataError(f"columns with fewer than 2 observed values: {few}")
    if table.M is not None:  # the given M and K are in the data's units: fit there
        mean, scale = np.zeros(D), np.ones(D)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            mean = np.nanmean(Y, axis=0)
            scale = np.nanstd(Y, axis=0)
        for j, n in enumerate(table.names):
            if not (np.isfinite(mean[j]) and np.isfinite(scale[j])):
                big = np.nanmax(np.abs(Y[:, j]))
                raise DataError(
                    f"column {n!r}: values as large as {big:.3g} overflow when standardised; rescale the column"
                )
            if scale[j] == 0:
                raise DataError(f"column {n!r} is constant")
    mask = None if observed.all() else observed
    return Standardised(np.where(observed, (Y - mean) / scale, 0.0), mask, mean, scale)


def _memory_available() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def state_space_kernel(spec: str | None) -> bool:
    """Whether every base kernel of the --kernel expression has a state-space form (the Matérns)."""
    from . import kernels

    return all(c.name in STATE_SPACE_KERNELS for c in kernels.parse(spec or "rbf").components())


def choose_path(args, T: int, D: int, n_missing: int, given_m: bool) -> tuple[str, int, str]:
    """("statespace", "dense" or "lowrank", rank, what to tell the user), or DataError with the options.

    A kernel of Matérns only (--kernel matern12/32/52, sums and products of them) takes the exact
    state-space path at any T when --method is auto, missing cells or not (a Kalman filter on the
    joint state of the outputs where cells are missing); another kernel keeps the dense path up to
    DENSE_MAX_ROWS rows and the low-rank one above.
    """
    method = args.method
    state_space = not given_m and state_space_kernel(getattr(args, "kernel", None))
    if given_m:
        if method == "lowrank":
            raise DataError("--method lowrank needs a kernel over time; an .npz gives M itself")
        method = "dense"
    elif method == "auto":
        if state_space:
            method = "statespace"
        else:
            method = "dense" if T <= DENSE_MAX_ROWS else "lowrank"
    rank = T if method in ("dense", "statespace") else min(args.rank or DEFAULT_RANK, T)
    why = ""
    if method == "statespace":
        joint = (
            f"; {n_missing} missing cells: one filter on the joint state of the {D} outputs, exact whatever the "
            "fraction missing"
            if n_missing
            else ""
        )
        from .statespace import scan_method

        # the joint filter of missing cells is sequential on every backend
        parallel = not n_missing and scan_method() == "parallel"
        scans = "associative scans (O(log T) depth)" if parallel else "a sequential scan"
        return (
            method,
            rank,
            (
                f"exact state-space (Kalman) likelihood, O(T): {T} steps of the kernel's linear SDE by {scans}, "
                "no T×T matrix "
                f"(the dense path's model, M = k(t, t) + {NUGGET:g} I; --method dense for the eigh engine){joint}"
            ),
        )
    if method == "lowrank":
        why = (
            f"low-rank M: Nyström with {rank} inducing points evenly spaced in time"
            + (f" (T = {T} > {DENSE_MAX_ROWS} rows)" if args.method == "auto" else "")
            + "; --rank to change, --method dense for the exact T×T kernel"
        )
    else:
        why = ""
        need = 12.0 * T * T * 8  # M, its eigenvectors, ∂L/∂M and temporaries, float64
        avail = _memory_available()
        if need > 0.7 * avail:
            raise DataError(
                f"T = {T} rows: the dense path needs about {need / 1e9:.1f} GB and {avail / 1e9:.1f} GB is available; "
                f"use --method lowrank (--rank R, default {DEFAULT_RANK}) or fewer rows"
                + ("; --method auto fits this kernel exactly in O(T) (state space)" if state_space else "")
            )
    if n_missing:
        flops = n_missing * T * D * (rank + D) + n_missing**2 * T * D + n_missing**3
        if flops > MASKED_FLOP_LIMIT:
            raise DataError(
                f"{n_missing} missing cells in a {T}×{D} table: the exact likelihood with missing entries "
                f"costs about {flops:.1e} flops per evaluation here (limit {MASKED_FLOP_LIMIT:.0e}); "
                "drop the rows or columns that are mostly missing, or fit a shorter stretch"
            )
    return method, rank, why


def run(args: argparse.Namespace) -> int:
    """The whole job; returns the exit code."""
    try:
        check_arguments(args)
        table = load_table(args)
        data = standardise(table)
        T, D = table.Y.shape
        n_missing = 0 if data.mask is None else int((~data.mask).sum())
        method, rank, why = choose_path(args, T, D, n_missing, table.M is not None)
        if args.predictions is not None and args.forecast is None and args.predict_at is None and not n_missing:
            raise DataError(
                "--predictions needs --forecast or --predict-at, or a table with missing cells (gap filling): "
                "without them there is nothing to predict"
            )
        check_periods(args, table)
        new_t = _new_times(args, table)
        if table.M is not None:
            from . import validate

            validate(data.Y, table.M, table.K, log_var=np.zeros(D))
    except (DataError, ValueError) as e:
        return _fail(str(e))

    import jax

    # This process's choice (a program, not a library import): x64 on, so that float64 is
    # available for --float64, for the float32 fit's eigendecompositions (mixed precision) and
    # for the float64 evaluation of what is reported.
    jax.config.update("jax_enable_x64", True)
    from ._fit_model import fit_table

    source = args.data or "built-in US macro data (statsmodels macrodata, public domain)"
    dtype = "float64" if args.float64 or method == "statespace" else "float32"
    notes = table.notes + ([why] if why else [])
    if method == "statespace" and not args.float64:
        notes.append(
            "computed in float64 on this path: in float32 the differences of long time series lose digits "
            "(relative error up to T·eps) and the recursion's running sums accumulate round-off"
        )
    print(f"fitting {source}: T={T} rows, D={D} outputs, {n_missing} missing cells, {dtype}", file=sys.stderr)
    for note in notes:
        print(f"  {note}", file=sys.stderr)
    try:
        report = fit_table(args, table, data, method, rank, new_t)
    except DataError as e:
        return _fail(str(e))
    print(report.text)
    for warning in report.warnings:
        print(f"kronlik fit: warning: {warning}", file=sys.stderr)
    outputs = []
    if args.out:
        outputs.append((args.out, json.dumps(report.json, indent=2), None))
    if report.predictions is not None:
        outputs.append((predictions_path(args), report.predictions, None))
    if args.plot:
        outputs.append((args.plot, None, report.figure()))
    _write_all(outputs)
    return 0


def _new_times(args, table: Table) -> np.ndarray | None:
    """The times to predict at (--forecast or --predict-at), in the table's time units."""
    if args.forecast is None and args.predict_at is None:
        return None
    if table.M is not None:
        raise DataError("--forecast and --predict-at need a time axis (a CSV or the built-in data)")
    t = np.arange(table.Y.shape[0], dtype=float) if table.t is None else table.t
    parts = []
    if args.forecast is not None:
        steps = np.diff(t)
        if not np.any(steps > 0):
            raise DataError("--forecast needs at least two distinct times to set a spacing; give --predict-at instead")
        step = float(np.median(steps[steps > 0]))
        ahead = t[-1] + step * np.arange(1, args.forecast + 1)
        if table.dates and whole_days(t):  # dates without a time of day: forecast whole days too
            ahead = np.array([_decimal_year(datetime.fromisoformat(from_decimal_year(y, True))) for y in ahead])
        parts.append(ahead)
    if args.predict_at is not None:
        # the header first, every column as text (a date column must not be parsed as a number)
        with open(args.predict_at, newline="", encoding="utf-8-sig") as fh:
            header = next((r for r in csv.reader(fh) if r and not r[0].startswith("#")), [""])
        header = [h.strip() for h in header]
        column = args.time_column if args.time_column in header else header[0]
        _, _, texts = read_csv(args.predict_at, tuple(h for h in header if h))
        new, dates = parse_times(texts[column], f"{args.predict_at}, column {column!r}")
        if table.t is not None and dates != table.dates:
            raise DataError(
                f"{args.predict_at}: times are {'dates' if dates else 'numbers'} but the data's are "
                f"{'dates' if table.dates else 'numbers'}"
            )
        parts.append(new)
    return np.sort(np.concatenate(parts))
