"""``TimeSeriesDataModule``: series laid out as contiguous streams for forecasting with TBPTT.

From source to batch: ``load_series`` reads and checks every series (gaps as NaN) ->
each series is split in time into train, validation and test ranges -> per-column mean and
std and the MASE scale are fitted on observed train values -> gaps are filled (separately
for each split, from the data before that split's end only) and the columns normalized ->
the streams below are cut out -> ``StreamWindows`` yields (B, T, ...) windows in order.

Layout, for each of the S series (k = batch_size / S training streams per series)::

    series s     |<----------------- train ----------------->|<-- validation -->|<-- test -->|
    train        | stream 0 | stream 1 |  ...  | stream k - 1 |   (rows s*k .. s*k + k - 1)
    validation   |====== warm-up: mask false ==================|## counted #####|
    test         |====== warm-up: mask false ====================================|# counted #|
                 |<- window 0 ->|<- window 1 ->| ...   (T = bptt steps; the last may be shorter)

Training streams are cut from the train range only and dealt out in contiguous blocks to
the ranks (``bptt.datamodules.sharding.shard``); row b of batch k + 1 continues row b of batch k. Validation
and test have one stream per series from its first step to the end of their range, the
same on every rank: the hidden state warms up on everything before the range, and only
targets whose time lies inside the range count. Streams shorter than the longest are padded
at the end (inputs 0, position -1, targets not counted).

Targets: ``targets[b, t, h]`` is the value h + 1 steps after step t; it counts when its
time lies inside the split's range (train: before the train end) and it was observed. With
``gaps: interpolate`` a gap between two observations is filled linearly in time (inputs and
targets; the fill looks ahead to the next observation in the split) and leading/trailing
gaps take the nearest observation as input and are not counted as targets; with
``gaps: mask`` inputs carry the last observation forward (before the first one: the train
mean) and no gap is ever a target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bptt.datamodules.resumable import ResumableDataModule, SplitReader
from bptt.datamodules.series_sources import SeriesTable, default_season, load_series
from bptt.datamodules.sharding import shard
from bptt.datamodules.sources import CorpusError
from bptt.datamodules.streams import StreamWindows
from bptt.errors import ConfigError


@dataclass(frozen=True, eq=False)
class ForecastData:
    """What a forecasting task needs from its data, handed over once (``ForecastTask.use_data``).

    Args:
        input_names: the input columns, C_in, in the order of the inputs' last dim.
        target_names: the target columns, C_out, in the order of the targets' last dim.
        horizon: H, the steps ahead each step forecasts.
        target_mean: (C_out,) the train mean of each target column; original = normalized * std + mean.
        target_std: (C_out,) the train std of each target column.
        mase_scale: (C_out,) the mean |y_t - y_(t - season)| over observed train pairs, in original units.
        timestamps: (N_0,) the timestamps of series 0 (row 0 of the evaluation streams), which its
            ``positions`` index.
    """

    input_names: tuple[str, ...]
    target_names: tuple[str, ...]
    horizon: int
    target_mean: Tensor
    target_std: Tensor
    mase_scale: Tensor
    timestamps: np.ndarray

    @property
    def num_inputs(self) -> int:
        """C_in."""
        return len(self.input_names)

    @property
    def num_targets(self) -> int:
        """C_out."""
        return len(self.target_names)


@dataclass(frozen=True, eq=False)
class SeriesHistory:
    """One series whole, ready to warm a forecaster's state up over it (``TimeSeriesDataModule.history``).

    Args:
        series: the series id.
        timestamps: (N,) its timestamps, datetime64 or numeric, strictly increasing.
        inputs: (N, C_in) normalized values, gaps filled by the run's ``data.gaps`` policy.
        future: (H,) the timestamps of the next H steps, continuing the series' frequency.
    """

    series: str
    timestamps: np.ndarray
    inputs: Tensor
    future: np.ndarray


_OUT_OF_RANGE = (OverflowError, pd.errors.OutOfBoundsDatetime, pd.errors.OutOfBoundsTimedelta)  # pandas, past 2262


def continue_timestamps(stamps: np.ndarray, frequency: str | None, steps: int) -> np.ndarray:
    """The ``steps`` timestamps after ``stamps[-1]``: ``frequency`` (a pandas offset alias) when the run
    has one, else the one pandas infers from the last timestamps, else their median step.

    Args:
        stamps: (N,) strictly increasing datetime64 or numeric timestamps.

    Raises:
        ConfigError: dates past pandas' last timestamp (2262-04-11), naming the most steps that fit.
    """
    if np.issubdtype(stamps.dtype, np.datetime64):
        offset = frequency
        if offset is None and len(stamps) >= 3:
            offset = pd.infer_freq(pd.DatetimeIndex(stamps[-min(len(stamps), 60):]))
        if offset is not None:
            last = stamps[-1].astype("datetime64[ns]")  # the resolution the series are read in, whatever came in
            try:
                return pd.date_range(last, periods=steps + 1, freq=offset)[1:].to_numpy()
            except _OUT_OF_RANGE:
                raise _past_last_timestamp(last, steps, offset, _dates_that_fit(last, offset, steps)) from None
    step = np.median(np.diff(stamps[-min(len(stamps), 60):])) if len(stamps) > 1 else 1
    if np.issubdtype(stamps.dtype, np.datetime64):  # numpy wraps around silently past the last int64 nanosecond
        last = int(stamps[-1].astype("datetime64[ns]").astype(np.int64))
        size = int(step.astype("timedelta64[ns]").astype(np.int64))
        fits = (pd.Timestamp.max.value - last) // size
        if fits < steps:
            raise _past_last_timestamp(stamps[-1], steps, f"{pd.Timedelta(size)}", fits)
    return stamps[-1] + step * np.arange(1, steps + 1)


def _dates_that_fit(last: np.datetime64, offset: str, steps: int) -> int:
    """The most steps of ``offset`` after ``last`` (fewer than ``steps``) that pandas' timestamps hold."""
    fits, beyond = 0, steps
    while beyond - fits > 1:  # bisection: ``fits`` steps fit, ``beyond`` do not
        middle = (fits + beyond) // 2
        try:
            pd.date_range(last, periods=middle + 1, freq=offset)
            fits = middle
        except _OUT_OF_RANGE:
            beyond = middle
    return fits


def _past_last_timestamp(last: np.datetime64, steps: int, every: str, fits: int) -> ConfigError:
    return ConfigError(f"{steps} steps of {every} after the series' end ({np.datetime_as_string(last, unit='D')}) "
                       f"pass {pd.Timestamp.max:%Y-%m-%d}, the last date pandas' timestamps hold; ask for --horizon "
                       f"{fits} or less")


def fill_gaps(values: np.ndarray, times: np.ndarray, gaps: Literal["interpolate", "mask"],
              mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill the NaNs of one series (cut at a split's end).

    Args:
        values: (N, C) raw values, NaN where missing.
        times: (N,) float time of each step (interpolation is linear in it).
        gaps: ``interpolate`` or ``mask`` (see the module docstring).
        mean: (C,) train means, the fill where a column has no earlier observation.

    Returns:
        (N, C) filled values and (N, C) bool: which of them count as targets.
    """
    observed = ~np.isnan(values)
    if gaps == "mask":
        filled = pd.DataFrame(values).ffill().to_numpy()
        return np.where(np.isnan(filled), mean, filled), observed
    filled = np.empty_like(values)
    counted = np.zeros_like(observed)
    for c in range(values.shape[1]):
        seen = np.flatnonzero(observed[:, c])
        if seen.size == 0:
            filled[:, c] = mean[c]
            continue
        filled[:, c] = np.interp(times, times[seen], values[seen, c])  # ends: the nearest observation
        counted[seen[0] : seen[-1] + 1, c] = True
    return filled, counted


CALENDAR_PERIODS = ("year", "week", "day")


def calendar_phase(stamps: np.ndarray, period: str) -> np.ndarray:
    """(n,) the fraction of ``period`` (one of ``CALENDAR_PERIODS``) gone at each datetime64 stamp, in [0, 1)."""
    index = pd.DatetimeIndex(stamps)
    day = (index - index.normalize()).total_seconds().to_numpy() / 86400.0  # the fraction of the day gone
    if period == "day":
        return day
    if period == "week":
        return (index.dayofweek.to_numpy() + day) / 7.0
    return (index.dayofyear.to_numpy() - 1 + day) / np.where(index.is_leap_year, 366.0, 365.0)


class TimeSeriesDataModule(ResumableDataModule):
    """Series as windows of contiguous streams with multi-step targets, for forecasting.

    Args:
        source: ``statsmodels:co2``, ``statsmodels:sunspots`` or a ``.csv``/``.parquet`` file
            under the data root; see ``bptt.datamodules.series_sources``.
        timestamp_column: the time column of a file: dates, or numbers.
        value_columns: the input columns, C_in; default every column but the timestamp and
            series ones.
        target_columns: the columns to forecast, C_out; default all value columns.
        series_column: a column of series ids; each series becomes its own streams.
        frequency: a pandas offset alias (``W-SAT``, ``D``, ``h``): each series is reindexed
            to the full regular grid, so missing timestamps become gaps; None: rows are
            consecutive steps.
        gaps: ``interpolate`` (linear in time) or ``mask`` (carry the last value forward as
            input, never a target).
        split_fractions: train/validation/test fractions of each series, in time order.
        horizon: H, the steps ahead each step forecasts.
        differences: lags L whose differences x_t - x_(t - L) of every value column are added as input
            columns (``COLUMN_diffL``, after the value columns), each normalized by its own train mean and
            std (0 before step L). [1, 52] gives weekly data its week-on-week and year-on-year changes,
            which the levels' normalization squeezes to a sliver of the input range. Targets stay levels.
        calendar: periods of the calendar whose phase at each timestamp is added as two input columns
            (``calendar_P_sin``, ``calendar_P_cos``, after the differences): ``year`` (the fraction of the
            year gone), ``week`` (of the week, from Monday) or ``day`` (of the day). ``[year]`` tells weekly
            data where in the seasonal cycle each step lies, however the weeks fall; it needs dates.
        season: the seasonal period of the MASE scale; default 52 for co2, 11 for sunspots,
            else 1 (the naive last-value forecast).
        batch_size: B_global, the number of training streams over all ranks; a multiple of
            the number of series.
        bptt: window length T: time steps per optimizer step (and per batch, unless
            ``windows_per_batch`` says otherwise).
        windows_per_batch: m, training windows of T steps in one batch of m * T steps: m optimizer
            steps per batch (the engine's ``task.k1`` is T); trains bit for bit as m = 1, with every
            interval counted in optimizer steps.
        data_dir: the data root; default ``$BPTT_DATA_DIR``, else ``./data``.
    """

    # streams, window length and windows per batch: batch k of the training streams
    READ_LAYOUT = ("batch_size", "bptt", "windows_per_batch")

    def __init__(
        self,
        *,
        source: str = "statsmodels:co2",
        timestamp_column: str = "timestamp",
        value_columns: list[str] | None = None,
        target_columns: list[str] | None = None,
        series_column: str | None = None,
        frequency: str | None = None,
        gaps: Literal["interpolate", "mask"] = "interpolate",
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        horizon: int = 1,
        differences: list[int] | None = None,
        calendar: list[str] | None = None,
        season: int | None = None,
        batch_size: int = 8,
        bptt: int = 52,
        windows_per_batch: int = 1,
        data_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.check_at_least(1, horizon=horizon, batch_size=batch_size, bptt=bptt,
                            season=1 if season is None else season, windows_per_batch=windows_per_batch)
        fractions = tuple(split_fractions)
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(f"data.split_fractions must be three positive numbers summing to 1 (train, validation, "
                              f"test), got {list(fractions)}")
        lags = list(differences or [])
        if any(isinstance(L, bool) or not isinstance(L, int) or L < 1 for L in lags) or len(set(lags)) != len(lags):
            raise ConfigError(f"data.differences must be distinct lags >= 1 (e.g. [1, 52]), got {lags}")
        periods = list(calendar or [])
        if any(p not in CALENDAR_PERIODS for p in periods) or len(set(periods)) != len(periods):
            raise ConfigError(f"data.calendar must be distinct periods of {list(CALENDAR_PERIODS)} (e.g. [year]), "
                              f"got {periods}")
        if gaps not in ("interpolate", "mask"):
            raise ConfigError(f"data.gaps must be interpolate or mask, got {gaps!r}")
        if frequency is not None:
            try:
                pd.tseries.frequencies.to_offset(frequency)
            except ValueError:
                raise ConfigError(f"data.frequency={frequency!r} is not a pandas offset alias; use e.g. W-SAT, D, h, "
                                  "or null for consecutive rows") from None
        self.source = source
        self.timestamp_column = timestamp_column
        self.value_columns = value_columns
        self.target_columns = target_columns
        self.series_column = series_column
        self.frequency = frequency
        self.gaps = gaps
        self.split_fractions = fractions
        self.horizon = horizon
        self.differences = lags
        self.calendar = periods
        self.season = season if season is not None else default_season(source)
        self.batch_size = batch_size
        self.bptt = bptt
        self.windows_per_batch = windows_per_batch
        self.data_dir = data_dir
        self.table: SeriesTable | None = None
        self._targets: list[int] = []  # the target columns' indices among the value columns
        self.bounds: list[tuple[int, int, int]] = []  # per series: (train end, validation end, length)
        self.mean = self.std = self.scale = np.zeros(0)
        self.diff_mean = self.diff_std = np.zeros(0)  # (len(differences) * C,): lag-major, as the input columns
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------ reading and fitting

    def load(self) -> None:
        """Read and check the source, split every series and fit the normalization; idempotent.

        Raises:
            CorpusError: the source fails a check (see ``bptt.datamodules.series_sources``).
            ConfigError: the settings do not fit the data (window longer than a range, ...).
        """
        if self.table is not None:
            return
        table = self._read()
        targets = self.target_columns if self.target_columns is not None else table.columns
        for column in targets:
            if column not in table.columns:
                raise CorpusError(f"target column {column!r} is not one of the value columns {table.columns} of "
                                  f"{table.origin}; set data.target_columns to some of them")
        self._targets = [table.columns.index(c) for c in targets]
        f_train, f_val, _ = self.split_fractions
        cuts = [(int(len(ts) * f_train + 1e-9), int(len(ts) * (f_train + f_val) + 1e-9)) for ts in table.timestamps]
        self.bounds = [(a, b, len(ts)) for (a, b), ts in zip(cuts, table.timestamps)]  # floor; 1e-9: 0.7 * 100 = 70
        self.table = table
        self._check_lengths()
        self._fit()

    def _read(self) -> SeriesTable:
        """``data.source``, read and checked with this DataModule's column and frequency settings."""
        table = load_series(self.source, data_dir=self.data_dir, timestamp_column=self.timestamp_column,
                            value_columns=self.value_columns, series_column=self.series_column,
                            frequency=self.frequency)
        if self.calendar and not all(np.issubdtype(ts.dtype, np.datetime64) for ts in table.timestamps):
            raise ConfigError(f"data.calendar={self.calendar} needs dates, but the timestamps of {table.origin} are "
                              "numbers; drop data.calendar or give data.timestamp_column dates")
        return table

    def _check_lengths(self) -> None:
        assert self.table is not None
        window = self.bptt + self.horizon
        for sid, (train_end, val_end, length) in zip(self.table.ids, self.bounds):
            ranges = {"train": train_end, "validation": val_end - train_end, "test": length - val_end}
            for split, steps in ranges.items():
                if steps < window:
                    name = f"series {sid!r} of {self.table.origin}" if len(self.table.ids) > 1 else self.table.origin
                    raise CorpusError(
                        f"the {split} range of {name} has {steps} of its {length} steps, fewer than one window "
                        f"(data.bptt + data.horizon = {window}); lower data.bptt or data.horizon, or change "
                        "data.split_fractions"
                    )
        streams = len(self.table.ids)
        if self.batch_size % streams:
            raise ConfigError(f"data.batch_size={self.batch_size} training streams cannot be split evenly over "
                              f"{streams} series; make it a multiple of {streams}")
        per_series = self.batch_size // streams
        shortest = min(train_end // per_series for train_end, _, _ in self.bounds)
        if shortest < window:
            raise ConfigError(
                f"data.batch_size={self.batch_size} cuts the train range into streams of {shortest} steps, fewer "
                f"than one window (data.bptt + data.horizon = {window}); lower data.batch_size or data.bptt"
            )

    def _fit(self) -> None:
        """Mean and std per column and the MASE scale per target, from observed train values."""
        assert self.table is not None
        train = np.concatenate([v[:end] for v, (end, _, _) in zip(self.table.values, self.bounds)])  # (N_train, C)
        empty = [c for c, n in zip(self.table.columns, (~np.isnan(train)).sum(axis=0)) if n == 0]
        if empty:
            raise CorpusError(f"value column {empty[0]!r} of {self.table.origin} has no value in the train range; "
                              "drop it from data.value_columns or raise the train fraction of data.split_fractions")
        self.mean = np.nanmean(train, axis=0)
        std = np.nanstd(train, axis=0)
        self.std = np.where(std > 1e-12 * np.maximum(np.abs(self.mean), 1.0), std, 1.0)  # a constant column stays as is
        lag = self.season
        diffs = [np.abs(v[min(lag, end) : end] - v[: max(end - lag, 0)])[:, self._targets]  # (end - season, C_out)
                 for v, (end, _, _) in zip(self.table.values, self.bounds)]
        pairs = np.concatenate(diffs)
        counts = (~np.isnan(pairs)).sum(axis=0)
        for name, count in zip(self._target_names(), counts):
            if count == 0:
                raise CorpusError(f"target column {name!r} has no two observed train values data.season="
                                  f"{self.season} steps apart, so the MASE scale is undefined; lower data.season")
        self.scale = np.nansum(pairs, axis=0) / counts
        self._fit_differences()
        if self._restored is not None:
            self._apply_restored()

    def _fit_differences(self) -> None:
        """Mean and std of each ``differences`` lag of each value column, over observed train pairs."""
        assert self.table is not None
        means, stds = [], []
        for lag in self.differences:
            pairs = np.concatenate([v[lag:end] - v[: max(end - lag, 0)]  # (end - lag, C)
                                    for v, (end, _, _) in zip(self.table.values, self.bounds)])
            for name, count in zip(self.table.columns, (~np.isnan(pairs)).sum(axis=0)):
                if count < 2:
                    raise CorpusError(f"value column {name!r} has fewer than two observed train pairs {lag} steps "
                                      f"apart, so its data.differences column is undefined; drop {lag} from "
                                      "data.differences")
            means.append(np.nanmean(pairs, axis=0))
            std = np.nanstd(pairs, axis=0)
            stds.append(np.where(std > 1e-12, std, 1.0))
        self.diff_mean = np.concatenate(means) if means else np.zeros(0)
        self.diff_std = np.concatenate(stds) if stds else np.zeros(0)

    def input_names(self) -> list[str]:
        """The input columns, C_in: the value columns, ``COLUMN_diffL`` per lag of ``differences``, then
        ``calendar_P_sin`` and ``calendar_P_cos`` per period of ``calendar``."""
        assert self.table is not None
        return [*self.table.columns, *(f"{c}_diff{lag}" for lag in self.differences for c in self.table.columns),
                *(f"calendar_{p}_{f}" for p in self.calendar for f in ("sin", "cos"))]

    def _apply_restored(self) -> None:
        assert self.table is not None and self._restored is not None
        if self._restored["columns"] != self.table.columns:
            raise ConfigError(f"the checkpoint was trained on columns {self._restored['columns']}, but the data has "
                              f"{self.table.columns}; set data.value_columns to match the checkpoint")
        self.mean, self.std, self.scale = (np.asarray(self._restored[k], dtype=np.float64)
                                           for k in ("mean", "std", "mase_scale"))
        if self.differences:
            if self._restored.get("differences") != self.differences:
                raise ConfigError(f"the checkpoint's inputs were built with data.differences="
                                  f"{self._restored.get('differences') or []}; keep that setting")
            self.diff_mean, self.diff_std = (np.asarray(self._restored[k], dtype=np.float64)
                                             for k in ("diff_mean", "diff_std"))
        if (self._restored.get("calendar") or []) != self.calendar:
            raise ConfigError(f"the checkpoint's inputs were built with data.calendar="
                              f"{self._restored.get('calendar') or []}; keep that setting")

    # ------------------------------------------------------------ public API

    def forecast_data(self) -> ForecastData:
        """What ``ForecastTask`` needs from the series; loads them first."""
        self.load()
        assert self.table is not None
        return ForecastData(input_names=tuple(self.input_names()), target_names=tuple(self._target_names()),
                            horizon=self.horizon, target_mean=self.target_mean, target_std=self.target_std,
                            mase_scale=self.mase_scale, timestamps=self.table.timestamps[0])

    def _target_names(self) -> list[str]:
        assert self.table is not None
        return [self.table.columns[i] for i in self._targets]

    @property
    def series_ids(self) -> list[str]:
        """The id of each series (row ``series`` of a batch indexes this list)."""
        self.load()
        assert self.table is not None
        return list(self.table.ids)

    @property
    def mase_scale(self) -> Tensor:
        """(C_out,) mean |y_t - y_(t - season)| over observed train pairs, in original units."""
        self.load()
        return torch.tensor(self.scale, dtype=torch.float32)

    @property
    def target_mean(self) -> Tensor:
        """(C_out,) the train mean of each target column; original = normalized * std + mean."""
        self.load()
        return torch.tensor(self.mean[self._targets], dtype=torch.float32)

    @property
    def target_std(self) -> Tensor:
        """(C_out,) the train std of each target column."""
        self.load()
        return torch.tensor(self.std[self._targets], dtype=torch.float32)

    @property
    def gap_counts(self) -> dict[str, int]:
        """Missing values per value column over every series, after reindexing to ``frequency``."""
        self.load()
        assert self.table is not None
        return self.table.gap_counts()

    def split_starts(self) -> dict[str, list[int]]:
        """Per split, the step where its range starts in each series."""
        self.load()
        return {"train": [0] * len(self.bounds), "validation": [b[0] for b in self.bounds],
                "test": [b[1] for b in self.bounds]}

    def save_artifacts(self, directory: Path) -> list[Path]:
        """Write ``normalization.json``: mean/std per column, season, MASE scale, split boundaries, gaps."""
        self.load()
        assert self.table is not None

        def stamp(value: Any) -> str | float:
            return str(np.datetime_as_string(value, unit="s")) if isinstance(value, np.datetime64) else value.item()

        splits = []
        for sid, ts, (train_end, val_end, length) in zip(self.table.ids, self.table.timestamps, self.bounds):
            ranges = {"train": (0, train_end), "validation": (train_end, val_end), "test": (val_end, length)}
            splits.append({"series": sid, **{s: [stamp(ts[a]), stamp(ts[b - 1])] for s, (a, b) in ranges.items()}})
        report = {
            "source": self.table.origin,
            "columns": {c: {"mean": float(m), "std": float(s)}
                        for c, m, s in zip(self.table.columns, self.mean, self.std)},
            "targets": self._target_names(),
            "horizon": self.horizon,
            "differences": {name: {"mean": float(m), "std": float(s)} for name, m, s in
                            zip(self.input_names()[len(self.table.columns):], self.diff_mean, self.diff_std)},
            "season": self.season,
            "mase_scale": dict(zip(self._target_names(), map(float, self.scale))),
            "gaps": self.gaps,
            "splits": splits,
            "gap_counts": self.table.gap_counts(),
        }
        path = directory / "normalization.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        return [path]

    # ------------------------------------------------------------ streams and loaders

    def _series_arrays(self, cut: list[int], table: SeriesTable | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per series of ``table`` (default: the run's), cut at ``cut[s]``: normalized filled inputs
        (n, C_in), targets (n, C_out) and which targets count (n, C_out)."""
        table = table if table is not None else self.table
        assert table is not None
        out = []
        for values, stamps, end in zip(table.values, table.timestamps, cut):
            times = stamps[:end].astype(np.int64 if np.issubdtype(stamps.dtype, np.datetime64) else np.float64)
            filled, counted = fill_gaps(values[:end], times.astype(np.float64), self.gaps, self.mean)
            levels = ((filled - self.mean) / self.std).astype(np.float32)  # (n, C)
            changes = []
            for lag in self.differences:  # (n, C) each: x_t - x_(t - lag), 0 (the train mean) before step lag
                change = np.zeros_like(filled)
                change[lag:] = filled[lag:] - filled[:-lag]
                changes.append(change)
            derived = []
            if changes:
                scaled = (np.concatenate(changes, axis=1) - self.diff_mean) / self.diff_std  # (n, D * C)
                first = np.arange(len(filled))[:, None] < np.repeat(self.differences, len(self.mean))[None, :]
                scaled[first] = 0.0
                derived.append(scaled.astype(np.float32))
            for period in self.calendar:  # (n, 2) each: where in the period each step lies
                angle = 2 * np.pi * calendar_phase(stamps[:end], period)
                derived.append(np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32))
            normalized = np.concatenate([levels, *derived], axis=1)  # (n, C_in)
            out.append((normalized, levels[:, self._targets], counted[:, self._targets]))
        return out

    def _streams(self, rows: list[tuple[int, int, int, int, int]], length: int,
                 arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Tensor]:
        """Stack streams, padded at the end to ``length`` steps.

        Args:
            rows: per stream (series, first step, steps, first counted target time, end of counted times).
            length: L, the steps of the longest stream.
            arrays: ``_series_arrays`` of the split.

        Returns:
            ``inputs`` (B, L, C_in), ``targets`` (B, L, H, C_out), ``target_mask`` (B, L, H, C_out),
            ``mask`` (B, L) (any target counts) and ``positions`` (B, L), -1 on padding.
        """
        assert self.table is not None
        batch, horizon, c_in, c_out = len(rows), self.horizon, len(self.input_names()), len(self._targets)
        inputs = np.zeros((batch, length, c_in), np.float32)
        targets = np.zeros((batch, length, horizon, c_out), np.float32)
        target_mask = np.zeros((batch, length, horizon, c_out), bool)
        positions = np.full((batch, length), -1, np.int64)
        for b, (s, first, steps, lo, hi) in enumerate(rows):
            x, y, counted = arrays[s]
            pos = np.arange(first, first + steps)  # (n,)
            ahead = pos[:, None] + np.arange(1, horizon + 1)  # (n, H) the time of each target
            inside = (ahead >= lo) & (ahead < hi)
            ahead = np.minimum(ahead, len(y) - 1)
            inputs[b, :steps] = x[pos]
            targets[b, :steps] = y[ahead]  # (n, H, C_out)
            target_mask[b, :steps] = inside[:, :, None] & counted[ahead]
            positions[b, :steps] = pos
        mask = target_mask.reshape(batch, length, -1).any(axis=2)  # (B, L, H, C_out) -> (B, L)
        return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
                "target_mask": torch.from_numpy(target_mask), "positions": torch.from_numpy(positions),
                "mask": torch.from_numpy(mask)}

    def _train_windows(self, rank: int, world: int) -> StreamWindows:
        per_series = self.batch_size // len(self.bounds)
        rows = []
        for s, (train_end, _, _) in enumerate(self.bounds):
            steps = train_end // per_series  # the last train_end mod k steps are only targets
            rows += [(s, j * steps, steps, 0, train_end) for j in range(per_series)]
        length = max(r[2] for r in rows)  # every rank windows the same length: the same number of batches
        self.check_batch_fits(length, self.bptt, self.windows_per_batch)
        mine = shard(rows, rank, world)  # B_local of the B_global streams
        arrays = self._series_arrays([b[0] for b in self.bounds])
        return StreamWindows(self._streams(mine, length, arrays), rows={"series": torch.tensor([r[0] for r in mine])},
                             bptt=self.bptt * self.windows_per_batch)

    def _eval_windows(self, split: str) -> StreamWindows:
        ranges = [(b[0], b[1]) if split == "validation" else (b[1], b[2]) for b in self.bounds]
        rows = [(s, 0, hi, lo, hi) for s, (lo, hi) in enumerate(ranges)]
        arrays = self._series_arrays([hi for _, hi in ranges])
        streams = self._streams(rows, max(hi for _, hi in ranges), arrays)
        return StreamWindows(streams, rows={"series": torch.arange(len(rows))}, bptt=self.bptt)

    def readers(self, rank: int, world_size: int) -> dict[str, SplitReader]:
        self.check_divides(world_size, "streams", batch_size=self.batch_size)
        return {"train": SplitReader(self._train_windows(rank, world_size)),
                "validation": SplitReader(self._eval_windows("validation")),
                "test": SplitReader(self._eval_windows("test"))}

    def history(self, horizon: int) -> list[SeriesHistory]:
        """Every series of ``data.source`` whole (a newer file with the run's columns: its later steps
        too), normalized by the run's statistics (a checkpoint's, once ``load_state_dict`` gave them),
        and the timestamps of the ``horizon`` steps after each one's end.

        Raises:
            CorpusError: the source fails a check, or a series ends in a gap (nothing to start from).
            ConfigError: the source's columns are not the ones the checkpoint was trained on.
        """
        self.load_statistics()
        table = self.table
        assert table is not None
        for sid, values in zip(table.ids, table.values):
            missing = np.isnan(values).any(axis=1)  # (N,): a step with any column missing
            if missing[-1]:
                trailing = len(missing) if missing.all() else int(np.argmin(missing[::-1]))
                where = f" (series {sid!r})" if len(table.ids) > 1 else ""
                raise CorpusError(f"{table.origin}{where} ends in {trailing} step(s) with missing values; "
                                  "a forecast starts after the last observed step: drop the trailing rows")
        arrays = self._series_arrays([len(ts) for ts in table.timestamps], table)
        return [SeriesHistory(sid, ts, torch.from_numpy(x), continue_timestamps(ts, self.frequency, horizon))
                for sid, ts, (x, _, _) in zip(table.ids, table.timestamps, arrays)]

    def load_statistics(self) -> None:
        """The normalization: fitted on the train range of ``data.source``, or the checkpoint's; unlike
        ``load``, the source need not hold whole split ranges (a forecast reads any length)."""
        if self.table is not None:
            return
        if self._restored is None:
            self.load()
            return
        self.table = self._read()
        self._apply_restored()  # the checkpoint's columns: its target columns are among them
        targets = self.target_columns if self.target_columns is not None else self.table.columns
        self._targets = [self.table.columns.index(c) for c in targets]

    def data_state(self) -> dict[str, Any]:
        """The normalization and the MASE scale; the skeleton adds the read position (epoch, next window)."""
        self.load()
        assert self.table is not None
        return {"columns": list(self.table.columns), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "mase_scale": self.scale.tolist(), "differences": self.differences,
                "diff_mean": self.diff_mean.tolist(), "diff_std": self.diff_std.tolist(), "calendar": self.calendar}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self._restored = {k: state[k] for k in ("columns", "mean", "std", "mase_scale")}
        later = ("differences", "diff_mean", "diff_std", "calendar")  # absent from checkpoints written before them
        self._restored.update({k: state.get(k) for k in later})
        if self.table is not None:
            self._apply_restored()
        if self._readers:
            self._build_readers()  # normalized with the checkpoint's statistics
