"""Time series as checked per-series arrays: read, parse, validate, reindex.

Sources (the ``source`` argument of ``TimeSeriesDataModule``):

- ``statsmodels:co2``: weekly CO2 at Mauna Loa, 1958-2001, 2284 weeks, 59 of them missing
  (season 52); ships with statsmodels, so it needs no network;
- ``statsmodels:sunspots``: yearly sunspot activity, 1700-2008 (column ``SUNACTIVITY``,
  timestamps from ``YEAR``; season 11);
- a ``.csv`` or ``.parquet`` file under the data root (``data_dir``, else ``$BPTT_DATA_DIR``,
  else ``./data``; absolute paths work too): one row per time step, a timestamp column,
  numeric value columns and optionally a series-id column (many series in one file).

Nothing is sorted or deduplicated silently: unsorted or repeated timestamps, text in a
value column, a value that is not finite in float32 (``inf``, ``-inf``, ``1e39``: they would
train to NaN losses) or a column without a single value stop with a one-line ``CorpusError``
that names the file, column and row. A missing value (an empty cell, ``NaN``) is a gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bptt.datamodules.sources import CorpusError, data_root

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the batches hold float32: larger values become inf

STATSMODELS = {  # name -> (timestamp column after loading, its default season)
    "co2": ("date", 52),
    "sunspots": ("YEAR", 11),
}


@dataclass
class SeriesTable:
    """Every series of a source, checked, with gaps as NaN.

    Attributes:
        origin: where it came from, for messages.
        columns: the value columns, C.
        ids: the series ids, S (one ``"0"`` without a series column).
        timestamps: per series, (N_s,) datetime64 or numeric timestamps, strictly increasing.
        values: per series, (N_s, C) float64; NaN where a value is missing.
        default_season: the source's seasonal period (1 for files).
    """

    origin: str
    columns: list[str]
    ids: list[str]
    timestamps: list[np.ndarray]
    values: list[np.ndarray]
    default_season: int

    def gap_counts(self) -> dict[str, int]:
        """Missing values per column, over every series."""
        missing = sum(np.isnan(v).sum(axis=0) for v in self.values)
        return {c: int(n) for c, n in zip(self.columns, missing)}


def default_season(source: str) -> int:
    """The seasonal period a source comes with: 52 for co2, 11 for sunspots, else 1."""
    name = source.removeprefix("statsmodels:")
    return STATSMODELS[name][1] if source.startswith("statsmodels:") and name in STATSMODELS else 1


def load_series(
    source: str,
    *,
    data_dir: str | None = None,
    timestamp_column: str = "timestamp",
    value_columns: list[str] | None = None,
    series_column: str | None = None,
    frequency: str | None = None,
) -> SeriesTable:
    """Read and check a source.

    Args:
        source: ``statsmodels:co2``, ``statsmodels:sunspots`` or a ``.csv``/``.parquet`` path.
        data_dir: the data root of relative paths.
        timestamp_column: the time column of a file (statsmodels sources bring their own).
        value_columns: the numeric columns; default every column but the timestamp and series ones.
        series_column: a column of series ids: each id is its own series.
        frequency: a pandas offset alias (``W-SAT``, ``D``, ``h``): each series is reindexed to the
            full regular grid, so missing timestamps become gaps; None: rows are consecutive steps.

    Returns:
        the checked series.

    Raises:
        CorpusError: the source cannot be read or fails a check; the message names the fix.
    """
    if source.startswith("statsmodels:"):
        frame, origin, lines, timestamp_column = _statsmodels_frame(source)
    else:
        frame, origin, lines = _read_file(source, data_dir)
    reader = _Checks(frame.reset_index(drop=True), origin, lines)
    columns = reader.value_columns(timestamp_column, value_columns, series_column)
    stamps = reader.timestamps(timestamp_column)
    values = np.stack([reader.numeric(c, timestamp_column) for c in columns], axis=1)  # (N, C)
    if series_column is None:
        groups = {"0": np.arange(len(frame))}
    else:
        groups = reader.groups(series_column)
    ids, all_stamps, all_values = [], [], []
    for sid, rows in groups.items():
        reader.check_order(stamps, rows, sid if series_column else None, timestamp_column)
        ts, vs = stamps[rows], values[rows]
        if frequency is not None:
            ts, vs = reader.reindex(ts, vs, frequency, rows, timestamp_column)
        ids.append(sid)
        all_stamps.append(ts)
        all_values.append(vs)
    return SeriesTable(origin, columns, ids, all_stamps, all_values, default_season(source))


def _statsmodels_frame(source: str) -> tuple[pd.DataFrame, str, None, str]:
    name = source.removeprefix("statsmodels:")
    if name not in STATSMODELS:
        raise CorpusError(f"unknown source {source!r}; "
                          "use statsmodels:co2, statsmodels:sunspots or a .csv/.parquet path")
    from importlib import import_module

    data = import_module(f"statsmodels.datasets.{name}").load_pandas().data  # not statsmodels.api: 1 s to import
    if name == "co2":
        data = data.rename_axis("date").reset_index()
    return data, source, None, STATSMODELS[name][0]


def _read_file(source: str, data_dir: str | None) -> tuple[pd.DataFrame, str, int | None]:
    """The file's rows, its name, and the line of its first row (CSV) for messages."""
    path = data_root(data_dir) / source
    if not path.is_file():
        raise CorpusError(
            f"series file {source!r} not found: {path.resolve()} does not exist; set $BPTT_DATA_DIR or "
            "data.data_dir to the directory that holds it, or use source: statsmodels:co2"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path), str(path), 2  # line 1 is the header
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path), str(path), None
    except (ValueError, OSError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise CorpusError(f"cannot read {path} ({type(err).__name__}: {detail}); "
                          f"check that it is a valid {suffix[1:]} file") from None
    raise CorpusError(f"{path} is neither .csv nor .parquet; convert it, or use source: statsmodels:co2")


class _Checks:
    """The checks of one table; every failure is a one-line ``CorpusError`` naming the row."""

    def __init__(self, frame: pd.DataFrame, origin: str, first_line: int | None) -> None:
        self.frame = frame
        self.origin = origin
        self.first_line = first_line

    def row(self, index: int) -> str:
        """``row i`` (0-based, as pandas counts), plus the line number in a CSV file."""
        return f"row {index}" + (f" (line {index + self.first_line})" if self.first_line is not None else "")

    def require(self, column: str, role: str) -> None:
        if column not in self.frame.columns:
            raise CorpusError(f"{self.origin} has no {role} {column!r} (columns: {list(self.frame.columns)}); "
                              f"set data.{role.replace(' ', '_')} to one of them")

    def value_columns(self, timestamp: str, values: list[str] | None, series: str | None) -> list[str]:
        self.require(timestamp, "timestamp column")
        if series is not None:
            self.require(series, "series column")
        if values is None:
            values = [str(c) for c in self.frame.columns if c not in (timestamp, series)]
            if not values:
                raise CorpusError(f"{self.origin} has no value column besides {timestamp!r}; add one")
        for column in values:
            self.require(column, "value columns")
        return list(values)

    def timestamps(self, column: str) -> np.ndarray:
        """(N,) datetime64 or numeric timestamps (whole numbers as int64)."""
        raw = self.frame[column]
        missing = np.flatnonzero(raw.isna().to_numpy())
        if missing.size:
            raise CorpusError(f"{self.origin}: {self.row(int(missing[0]))} has no timestamp in column {column!r}; "
                              "fill it in or drop the row")
        if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
            stamps = raw.to_numpy(dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(stamps))
            if bad.size:
                i = int(bad[0])
                raise CorpusError(f"{self.origin}: timestamp {stamps[i]:g} at {self.row(i)} of column {column!r} is "
                                  "not a finite number; fix it or drop the row")
            return stamps.astype(np.int64) if np.all(stamps == np.round(stamps)) else stamps
        if pd.api.types.is_datetime64_any_dtype(raw):
            return raw.to_numpy(dtype="datetime64[ns]")
        parsed = pd.to_datetime(raw, errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy())
        if bad.size:
            i = int(bad[0])
            raise CorpusError(f"{self.origin}: timestamp {raw.iloc[i]!r} at {self.row(i)} of column {column!r} is "
                              "neither a date nor a number; fix it, or write every timestamp in one format")
        return parsed.to_numpy(dtype="datetime64[ns]")

    def numeric(self, column: str, timestamp: str) -> np.ndarray:
        """(N,) float64 values of a value column, finite in float32; NaN where missing.

        Args:
            column: the value column.
            timestamp: the timestamp column, to name the time of a bad value.
        """
        raw = self.frame[column]
        if pd.api.types.is_bool_dtype(raw) or not (
            pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_object_dtype(raw) or pd.api.types.is_string_dtype(raw)
        ):
            raise CorpusError(f"{self.origin}: value column {column!r} has type {raw.dtype}, not numbers; "
                              "drop it from data.value_columns")
        values = pd.to_numeric(raw, errors="coerce")
        bad = np.flatnonzero((values.isna() & raw.notna()).to_numpy())
        if bad.size:
            i = int(bad[0])
            raise CorpusError(f"{self.origin}: value column {column!r} has the non-numeric value {raw.iloc[i]!r} at "
                              f"{self.row(i)}; fix it (an empty cell is a gap) "
                              "or drop the column from data.value_columns")
        out = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.flatnonzero(np.abs(out) > FLOAT32_MAX)  # inf, -inf and what float32 cannot hold; NaN is a gap
        if bad.size:
            i = int(bad[0])
            raise CorpusError(f"{self.origin}: value column {column!r} has the value {out[i]:g} at {self.row(i)}, "
                              f"timestamp {self.frame[timestamp].iloc[i]}: not a finite number of at most "
                              f"{FLOAT32_MAX:.3g} in magnitude; fix it, or empty the cell to make it a gap")
        if np.isnan(out).all():
            raise CorpusError(f"{self.origin}: value column {column!r} has no values (all missing); "
                              "drop it from data.value_columns")
        return out

    def groups(self, column: str) -> dict[str, np.ndarray]:
        """Series id -> its row indices in file order; ids in order of first appearance."""
        ids = self.frame[column]
        missing = np.flatnonzero(ids.isna().to_numpy())
        if missing.size:
            raise CorpusError(f"{self.origin}: {self.row(int(missing[0]))} has no id in series column {column!r}; "
                              "fill it in or drop the row")
        codes, uniques = pd.factorize(ids)
        return {str(u): np.flatnonzero(codes == i) for i, u in enumerate(uniques)}

    def check_order(self, stamps: np.ndarray, rows: np.ndarray, series: str | None, column: str) -> None:
        ts = stamps[rows]
        where = f" in series {series!r}" if series is not None else ""
        step = np.diff(ts)
        zero = np.zeros((), dtype=step.dtype)
        back = np.flatnonzero(step < zero)
        if back.size:
            i = int(rows[back[0] + 1])
            raise CorpusError(f"{self.origin}: timestamps{where} are not sorted: {self.row(i)} ({ts[back[0] + 1]}) "
                              f"comes before the row above it ({ts[back[0]]}); sort the file by {column!r}")
        same = np.flatnonzero(step == zero)
        if same.size:
            i = int(rows[same[0] + 1])
            raise CorpusError(f"{self.origin}: timestamp {ts[same[0] + 1]} appears twice{where}, "
                              f"at {self.row(i)} and the row above; "
                              "keep one row per time step (aggregate or drop duplicates)")

    def reindex(self, stamps: np.ndarray, values: np.ndarray, frequency: str, rows: np.ndarray,
                column: str) -> tuple[np.ndarray, np.ndarray]:
        """The series on the full regular grid from its first to its last timestamp; new steps are NaN."""
        if not np.issubdtype(stamps.dtype, np.datetime64):
            raise CorpusError(f"{self.origin}: data.frequency={frequency!r} needs dates, but column {column!r} is "
                              "numeric; drop data.frequency (rows are then consecutive steps)")
        grid = pd.date_range(stamps[0], stamps[-1], freq=frequency)
        at = grid.get_indexer(pd.DatetimeIndex(stamps))
        off = np.flatnonzero(at < 0)
        if off.size:
            i = int(off[0])
            raise CorpusError(f"{self.origin}: timestamp {stamps[i]} at {self.row(int(rows[i]))} is not on the "
                              f"{frequency!r} grid that starts at {stamps[0]}; fix data.frequency or the timestamp")
        full = np.full((len(grid), values.shape[1]), np.nan)  # (N_grid, C)
        full[at] = values
        return grid.to_numpy(dtype="datetime64[ns]"), full
