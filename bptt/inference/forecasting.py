"""``bptt forecast``: the next H values past the end of a series, from a forecasting checkpoint.

The checkpoint's model warms its state up over the whole series (the one it was trained on, or a
newer file with the same columns), then forecasts past the end: its own horizon at once, further
by feeding its forecasts back in as inputs (``ForecastTask.forecast_ahead``). Values come out in
the series' units, one row per future step and series, timestamps continuing its frequency.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bptt.errors import CheckpointError, ConfigError

# The most steps ``bptt forecast`` takes: past a model's own horizon each step is one more forecast fed
# back in (10,000 steps: about 10 s of CPU for conf/forecast/sunspots.yaml), and what such a long
# rollout says is the model's long-run behaviour rather than a forecast.
MAX_HORIZON = 10_000


@dataclass(frozen=True)
class Forecast:
    """A forecast and the history it continues, in the series' units.

    Attributes:
        table: one row per series and future step: ``series``, ``timestamp``, one column per target and,
            with quantiles, ``TARGET_qLEVEL`` per target and level.
        history: the same columns over the series read (gaps filled by the run's ``data.gaps``).
    """

    table: pd.DataFrame
    history: pd.DataFrame


def parse_quantiles(text: str) -> list[float]:
    """``0.1,0.5,0.9`` -> [0.1, 0.5, 0.9]: distinct levels strictly between 0 and 1."""
    try:
        levels = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--quantiles takes levels like 0.1,0.5,0.9, got {text!r}") from None
    if any(not 0 < q < 1 for q in levels) or len(set(levels)) != len(levels):
        raise ConfigError(f"--quantiles must be distinct levels strictly between 0 and 1, got {text!r}")
    return sorted(levels)


def forecast(
    checkpoints: str | Path | Sequence[str | Path],
    *,
    series: str | None = None,
    horizon: int | None = None,
    quantiles: Sequence[float] = (),
    overrides: Sequence[str] = (),
    trusted: bool = False,
) -> Forecast:
    """Forecast past the end of every series of a forecasting checkpoint's data; several checkpoints
    (runs of one config with other seeds, say) forecast as an ensemble: the mean of their point
    forecasts and, level by level, of their quantiles.

    Args:
        checkpoints: a ``.ckpt`` of a ``ForecastTask`` run, or several forecasting the same columns.
        series: a ``.csv``/``.parquet`` file with the run's columns to read instead of the run's
            ``data.source`` (e.g. the same series with later steps appended).
        horizon: steps ahead; default the model's horizon.
        quantiles: levels of the predictive distribution to add (probabilistic models only).
        overrides: dotted config overrides of the checkpoint's config (``--data.timestamp_column``).
        trusted: the checkpoint's config may name code outside the allow-list.

    Raises:
        ConfigError, CheckpointError, CorpusError: one line naming the problem and the fix: among them a
            ``horizon`` beyond ``MAX_HORIZON`` (before any checkpoint is read) or one whose timestamps would
            pass pandas' last date, 2262-04-11 (before any forecast).
    """
    from bptt.training.checkpointing import load_checkpoint

    if horizon is not None and horizon < 1:
        raise ConfigError(f"--horizon must be >= 1, got {horizon}")
    if horizon is not None and horizon > MAX_HORIZON:
        raise ConfigError(f"--horizon {horizon} is more than the {MAX_HORIZON} steps bptt forecast takes; ask for "
                          f"--horizon {MAX_HORIZON} or less")
    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    loaded = [load_checkpoint(path) for path in paths]  # read once each, all before any forecast
    members = [_forecast_one(path, checkpoint, series, horizon, list(quantiles), overrides, trusted)
               for path, checkpoint in zip(paths, loaded)]
    first = members[0]
    keys = ["series", "timestamp"]
    for path, member in zip(paths[1:], members[1:]):
        if list(member.table.columns) != list(first.table.columns) or not member.table[keys].equals(first.table[keys]):
            raise ConfigError(f"{path} forecasts {list(member.table.columns[2:])} over {len(member.table)} rows, "
                              f"{paths[0]} {list(first.table.columns[2:])} over {len(first.table)}: an ensemble "
                              "needs checkpoints of the same series, columns and horizon")
    if len(members) == 1:
        return first
    table = first.table.copy()
    values = list(table.columns[2:])
    table[values] = np.mean([member.table[values].to_numpy() for member in members], axis=0)
    return Forecast(table, first.history)


def _forecast_one(path: str | Path, loaded: dict, series: str | None, horizon: int | None, levels: list[float],
                  overrides: Sequence[str], trusted: bool) -> Forecast:
    """``forecast`` of one checkpoint, read already (``loaded``)."""
    from bptt.lightning_modules import ForecastTask
    from bptt.training.restore import restore

    args = [*(_series_args(loaded["bptt"]["config"], series, overrides) if series is not None else []), *overrides]
    _, init, checkpoint = restore(path, args, trusted, checkpoint=loaded)
    task = init.task
    if not isinstance(task, ForecastTask):
        raise CheckpointError(f"{path} is a {type(task).__name__} checkpoint; forecast needs a forecaster "
                              "(task: bptt.lightning_modules.ForecastTask)")
    if levels:
        task.predictive.check_levels(levels)
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    data = init.data
    data.load_statistics()  # the checkpoint's normalization, restored with its data state
    described = data.forecast_data()
    task.use_data(described)
    steps = horizon if horizon is not None else task.model.horizon
    task.check_horizon(steps)
    columns = list(described.target_names)
    in_inputs = [list(described.input_names).index(name) for name in columns]  # targets are value columns too
    mean, std = described.target_mean.double(), described.target_std.double()
    ahead, past = [], []
    for history in data.history(steps):
        normalized, spread = task.forecast_ahead(history.inputs, steps, levels)  # (H, C_out), (H, C_out, Q)
        frame = _frame(history.series, history.future, (normalized.double() * std + mean).numpy(), columns)
        for c, name in enumerate(columns):
            for q, level in enumerate(levels):
                frame[f"{name}_q{level:g}"] = (spread[:, c, q].double() * std[c] + mean[c]).numpy()
        ahead.append(frame)
        seen = history.inputs[:, in_inputs].double() * std + mean  # (N, C_out)
        past.append(_frame(history.series, history.timestamps, seen.numpy(), columns))
    return Forecast(pd.concat(ahead, ignore_index=True), pd.concat(past, ignore_index=True))


def _frame(series: str, timestamps: np.ndarray, values: np.ndarray, columns: list[str]) -> pd.DataFrame:
    if np.issubdtype(timestamps.dtype, np.floating) and np.all(timestamps == np.round(timestamps)):
        timestamps = timestamps.astype(np.int64)  # years as 2009, not 2009.0
    frame = pd.DataFrame(values, columns=columns)
    frame.insert(0, "timestamp", timestamps)
    frame.insert(0, "series", series)
    return frame


def _series_args(config_text: str, series: str, overrides: Sequence[str]) -> list[str]:
    """``--data.source FILE``, and the timestamp column a statsmodels dataset the run read (its config
    ``config_text``) brings with it."""
    import yaml

    from bptt.datamodules.series_sources import STATSMODELS

    config = yaml.safe_load(config_text) or {}
    trained_on = str(((config.get("data") or {}).get("init_args") or {}).get("source", ""))
    args = ["--data.source", str(Path(series).resolve())]
    name = trained_on.removeprefix("statsmodels:")
    if trained_on.startswith("statsmodels:") and name in STATSMODELS and "--data.timestamp_column" not in overrides:
        args += ["--data.timestamp_column", STATSMODELS[name][0]]
    return args


def plot(result: Forecast, path: Path) -> None:
    """History, forecast and the band between its lowest and highest quantile (when asked for) of the
    first target column, one panel per series (at most 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = result.table.columns[2]
    names = list(dict.fromkeys(result.table["series"]))[:6]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ahead = result.table[result.table["series"] == name]
        past = result.history[result.history["series"] == name].tail(max(5 * len(ahead), 200))  # the recent past
        ax.plot(past["timestamp"], past[column], color="black", linewidth=1, label="history")
        ax.plot(ahead["timestamp"], ahead[column], color="tab:red", linewidth=1.2,
                label=f"forecast ({len(ahead)} steps)")
        bands = [name for name in ahead.columns if name.startswith(f"{column}_q")]
        if len(bands) >= 2:
            ax.fill_between(ahead["timestamp"], ahead[bands[0]], ahead[bands[-1]], color="tab:red", alpha=0.2,
                            label=f"{bands[0].rsplit('_q', 1)[1]}-{bands[-1].rsplit('_q', 1)[1]} quantiles")
        ax.set_title(column if len(names) == 1 else f"{column}, series {name}")
        ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(result: Forecast, *, csv: Path | None = None, png: Path | None = None) -> None:
    """Write the table to ``csv`` and the plot to ``png`` (either may be None): both or neither. Each
    goes to a hidden file beside its destination first and is moved into place once both are written,
    so a failure leaves no file behind and an older file of that name as it was.

    Args:
        csv: where the table goes (``series,timestamp,TARGET...``), checked writable already.
        png: where ``plot`` draws, checked writable already.
    """
    writers = [(path, write) for path, write in ((csv, lambda to: result.table.to_csv(to, index=False)),
                                                 (png, lambda to: plot(result, to))) if path is not None]
    partial = [path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}") for path, _ in writers]
    try:
        for (_, write), to in zip(writers, partial):
            write(to)
        for (path, _), written in zip(writers, partial):
            os.replace(written, path)
    finally:
        for written in partial:
            written.unlink(missing_ok=True)
