"""TimeSeriesDataModule: sources, gaps, train-only normalization, MASE scale, streams, sharding, resume, bad input."""

from __future__ import annotations

import itertools
import json
import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch

from bptt.cli import main
from bptt.datamodules import TimeSeriesDataModule
from bptt.datamodules.sources import CorpusError
from bptt.errors import BpttError, ConfigError

CO2_TRAIN_END, CO2_VAL_END, CO2_LENGTH = 1598, 1941, 2284  # floor(2284 * 0.7), floor(2284 * 0.85)


@pytest.fixture(scope="module")
def co2() -> np.ndarray:
    """(2284,) weekly CO2, NaN in the 59 missing weeks."""
    return sm.datasets.co2.load_pandas().data["co2"].to_numpy()


def _windows(dm: TimeSeriesDataModule, split: str) -> list[dict]:
    return list(dm._loader(split))


def _joined(windows: list[dict], key: str) -> torch.Tensor:
    """A split's windows concatenated along time: (B, L, ...)."""
    return torch.cat([w[key] for w in windows], dim=1)


def _original(dm: TimeSeriesDataModule, normalized: torch.Tensor) -> np.ndarray:
    return (normalized * dm.target_std + dm.target_mean).double().numpy()


def _linear_csv(tmp_path, gaps_at=(0, 10, 11, 19, 39), n=40) -> str:
    """value = t at numeric timestamps 0..n-1, missing at ``gaps_at``; split 20/10/10 with fractions 0.5/0.25/0.25."""
    values = np.arange(n, dtype=float)
    values[list(gaps_at)] = np.nan
    pd.DataFrame({"t": np.arange(n), "value": values}).to_csv(tmp_path / "line.csv", index=False)
    return "line.csv"


def _linear(tmp_path, gaps: str) -> TimeSeriesDataModule:
    source = _linear_csv(tmp_path)
    dm = TimeSeriesDataModule(source=source, data_dir=str(tmp_path), timestamp_column="t", gaps=gaps,
                              split_fractions=(0.5, 0.25, 0.25), batch_size=1, bptt=4)
    dm.setup("fit")
    return dm


def test_co2_loads_with_59_gaps_and_no_nan_in_any_batch(co2):
    for gaps in ("interpolate", "mask"):
        dm = TimeSeriesDataModule(source="statsmodels:co2", gaps=gaps, batch_size=8, bptt=52, horizon=4)
        dm.setup("fit")
        assert dm.gap_counts == {"co2": 59} and np.isnan(co2).sum() == 59
        data = dm.forecast_data()
        assert data.input_names == data.target_names == ("co2",) and data.horizon == 4
        assert dm.season == 52 and data.num_inputs == data.num_targets == 1
        assert len(data.timestamps) == CO2_LENGTH and str(data.timestamps[0])[:10] == "1958-03-29"
        assert torch.equal(data.target_mean, dm.target_mean) and torch.equal(data.mase_scale, dm.mase_scale)
        for split in ("train", "validation", "test"):
            for w in _windows(dm, split):
                assert w["inputs"].dtype == w["targets"].dtype == torch.float32
                assert w["target_mask"].dtype == w["mask"].dtype == w["reset"].dtype == torch.bool
                assert w["positions"].dtype == w["series"].dtype == torch.int64
                assert all(torch.isfinite(w[k]).all() for k in ("inputs", "targets"))
                assert torch.equal(w["mask"], w["target_mask"].any(dim=(2, 3)))
    assert TimeSeriesDataModule(source="statsmodels:sunspots").season == 11


def test_interpolate_fills_gaps_linearly_and_counts_only_interior_targets(tmp_path):
    dm = _linear(tmp_path, "interpolate")
    test = _windows(dm, "test")  # one stream over the whole series
    inputs = _original(dm, _joined(test, "inputs")[0, :, 0])
    expected = np.arange(40.0)
    expected[0], expected[39] = 1.0, 38.0  # leading/trailing gaps: the nearest observation
    np.testing.assert_allclose(inputs, expected, atol=1e-4)
    counted = _joined(test, "target_mask")[0, :, 0, 0].numpy()
    assert np.flatnonzero(counted).tolist() == list(range(29, 38))  # target times 30..38; 39 is a trailing gap
    train = _windows(dm, "train")
    train_inputs = _original(dm, _joined(train, "inputs")[0, :, 0])
    assert train_inputs[10:12].round(4).tolist() == [10.0, 11.0]
    assert round(train_inputs[19], 4) == 18.0  # 19: trailing in train
    train_counted = _joined(train, "target_mask")[0, :, 0, 0].numpy()
    assert np.flatnonzero(train_counted).tolist() == list(range(18))  # interpolated 10, 11 count; 19 does not
    val_inputs = _original(dm, _joined(_windows(dm, "validation"), "inputs")[0, :, 0])
    assert round(val_inputs[19], 4) == 19.0  # inside the validation cut the gap at 19 lies between observations


def test_mask_carries_the_last_value_forward_and_never_counts_a_gap(tmp_path):
    dm = _linear(tmp_path, "mask")
    train_mean = np.mean([t for t in range(20) if t not in (0, 10, 11, 19)])
    assert dm.target_mean.item() == pytest.approx(train_mean)
    test = _windows(dm, "test")
    inputs = _original(dm, _joined(test, "inputs")[0, :, 0])
    expected = np.arange(40.0)
    expected[[0, 10, 11, 19, 39]] = [train_mean, 9, 9, 18, 38]
    np.testing.assert_allclose(inputs, expected, atol=1e-4)
    train_counted = _joined(_windows(dm, "train"), "target_mask")[0, :, 0, 0].numpy()
    assert np.flatnonzero(train_counted).tolist() == [t - 1 for t in range(1, 19) if t not in (10, 11)]


def test_normalization_from_the_train_range_only_and_saved(tmp_path, co2):
    dm = TimeSeriesDataModule(source="statsmodels:co2", batch_size=8, bptt=52)
    dm.load()
    train = co2[:CO2_TRAIN_END]
    assert dm.target_mean.item() == pytest.approx(np.nanmean(train), rel=1e-6)
    assert dm.target_std.item() == pytest.approx(np.nanstd(train), rel=1e-6)
    assert abs(dm.target_mean.item() - np.nanmean(co2)) > 3 and abs(dm.target_std.item() - np.nanstd(co2)) > 1
    state = dm.state_dict()
    assert state["mean"] == pytest.approx([np.nanmean(train)]) and state["columns"] == ["co2"]
    [path] = dm.save_artifacts(tmp_path)
    saved = json.loads(path.read_text())
    assert path.name == "normalization.json" and saved["columns"]["co2"]["mean"] == pytest.approx(np.nanmean(train))
    assert saved["season"] == 52 and saved["gap_counts"] == {"co2": 59}
    assert saved["mase_scale"]["co2"] == pytest.approx(dm.mase_scale.item())
    stamps = dm.forecast_data().timestamps
    split = saved["splits"][0]
    assert split["train"] == [str(stamps[0])[:19], str(stamps[CO2_TRAIN_END - 1])[:19]]
    assert split["validation"][0] == str(stamps[CO2_TRAIN_END])[:19] and split["test"][1] == str(stamps[-1])[:19]


def test_mase_scale_is_the_seasonal_naive_error_on_train(co2):
    dm = TimeSeriesDataModule(source="statsmodels:co2", batch_size=8, bptt=52)
    train = co2[:CO2_TRAIN_END]
    expected = np.nanmean(np.abs(train[52:] - train[:-52]))  # NaN pairs (a gap at either end) are left out
    assert dm.mase_scale.item() == pytest.approx(expected, rel=1e-6)
    one = TimeSeriesDataModule(source="statsmodels:co2", season=1, batch_size=8, bptt=52)
    assert one.mase_scale.item() == pytest.approx(np.nanmean(np.abs(np.diff(train))), rel=1e-6)


def test_splits_are_chronological_and_eval_streams_start_at_the_series_start(co2):
    dm = TimeSeriesDataModule(source="statsmodels:co2", gaps="mask", horizon=2, batch_size=8, bptt=52)
    dm.setup("fit")
    assert dm.bounds == [(CO2_TRAIN_END, CO2_VAL_END, CO2_LENGTH)]
    assert dm.split_starts() == {"train": [0], "validation": [CO2_TRAIN_END], "test": [CO2_VAL_END]}
    for split, (lo, hi) in {"validation": (CO2_TRAIN_END, CO2_VAL_END), "test": (CO2_VAL_END, CO2_LENGTH)}.items():
        windows = _windows(dm, split)
        positions = _joined(windows, "positions")[0]
        assert positions.tolist() == list(range(hi))  # from the first step of the series to the range's end
        assert [bool(w["reset"].all()) for w in windows] == [True] + [False] * (len(windows) - 1)
        mask = _joined(windows, "target_mask")[0, :, :, 0]  # (L, H)
        for h in range(2):
            times = positions[mask[:, h]] + h + 1
            in_range = np.arange(lo, hi)
            assert times.tolist() == in_range[~np.isnan(co2[lo:hi])].tolist()  # every observed value in range, once
        assert not _joined(windows, "mask")[0, : lo - 2].any()  # the warm-up counts nothing


def test_training_windows_are_contiguous_streams_with_targets_h_plus_1_ahead(co2):
    dm = TimeSeriesDataModule(source="statsmodels:co2", gaps="mask", horizon=3, batch_size=8, bptt=52)
    dm.setup("fit")
    windows = _windows(dm, "train")
    assert len(windows) == -(-(CO2_TRAIN_END // 8) // 52) and windows[0]["inputs"].shape == (8, 52, 1)
    for prev, nxt in itertools.pairwise(windows):
        assert torch.equal(nxt["positions"][:, 0], prev["positions"][:, -1] + 1)
    assert [bool(w["reset"].all()) for w in windows] == [True] + [False] * (len(windows) - 1)
    positions = _joined(windows, "positions")  # (8, 199)
    steps = CO2_TRAIN_END // 8
    assert torch.equal(positions, torch.arange(8 * steps).view(8, steps))  # stream b = train steps b*199 ...
    inputs = _original(dm, _joined(windows, "inputs")[..., 0])
    observed = ~np.isnan(co2[positions.numpy()])
    np.testing.assert_allclose(inputs[observed], co2[positions.numpy()][observed], atol=1e-3)
    targets = _original(dm, _joined(windows, "targets")[..., 0])  # (8, 199, 3)
    counted = _joined(windows, "target_mask")[..., 0].numpy()
    for h in range(3):
        ahead = positions.numpy() + h + 1
        expect = co2[np.minimum(ahead, CO2_TRAIN_END - 1)]
        np.testing.assert_allclose(targets[..., h][counted[..., h]], expect[counted[..., h]], atol=1e-3)
        assert np.array_equal(counted[..., h], (ahead < CO2_TRAIN_END) & ~np.isnan(expect))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_own_disjoint_blocks_of_streams_and_share_the_eval_streams(world):
    seen, lengths, evals = [], set(), []
    for rank in range(world):
        dm = TimeSeriesDataModule(source="statsmodels:co2", batch_size=8, bptt=40)
        dm.trainer = types.SimpleNamespace(global_rank=rank, world_size=world)
        dm.setup("fit")
        windows = _windows(dm, "train")
        assert windows[0]["inputs"].shape == (8 // world, 40, 1)
        lengths.add(len(windows))
        seen.append(_joined(windows, "positions"))
        evals.append(_joined(_windows(dm, "validation"), "inputs"))
    assert len(lengths) == 1  # every rank steps the same number of times
    steps = CO2_TRAIN_END // 8
    assert torch.equal(torch.cat(seen), torch.arange(8 * steps).view(8, steps))  # disjoint, complete, in order
    assert all(torch.equal(e, evals[0]) for e in evals)


def test_series_column_gives_each_series_its_own_streams(tmp_path):
    rows = [("a", t, 100.0 + t) for t in range(60)] + [("b", t, -float(t)) for t in range(40)]
    frame = pd.DataFrame(rows, columns=["id", "t", "y"]).sort_values("t", kind="stable")  # a0 b0 a1 b1 ...
    frame.to_parquet(tmp_path / "two.parquet")
    dm = TimeSeriesDataModule(source="two.parquet", data_dir=str(tmp_path), timestamp_column="t",
                              series_column="id", batch_size=4, bptt=5, horizon=2, split_fractions=(0.5, 0.25, 0.25))
    dm.setup("fit")
    assert dm.series_ids == ["a", "b"]  # in order of first appearance
    windows = _windows(dm, "train")
    assert windows[0]["series"].tolist() == [0, 0, 1, 1]
    positions, inputs = _joined(windows, "positions"), _original(dm, _joined(windows, "inputs")[..., 0])
    targets, counted = _original(dm, _joined(windows, "targets")[..., 0]), _joined(windows, "target_mask")[..., 0]
    for row in range(4):
        s = windows[0]["series"][row].item()
        real = positions[row] >= 0
        t = positions[row][real].numpy()
        value = (lambda x: 100.0 + x) if s == 0 else (lambda x: -x)
        np.testing.assert_allclose(inputs[row][real.numpy()], value(t), atol=1e-3)
        ahead = t[:, None] + np.arange(1, 3)
        np.testing.assert_allclose(targets[row][real.numpy()][counted[row][real].numpy()],
                                   value(ahead)[counted[row][real].numpy()], atol=1e-3)
        assert not counted[row][~real].any()
    assert sorted(positions[2:][positions[2:] >= 0].tolist()) == list(range(20))  # the shorter series: 2 x 10 steps
    val = _windows(dm, "validation")
    assert val[0]["series"].tolist() == [0, 1] and _joined(val, "positions").shape[1] == 45  # the longer one


def test_resume_from_the_saved_position_gives_the_remaining_batches():
    kwargs = {"source": "statsmodels:co2", "batch_size": 4, "bptt": 20}
    dm = TimeSeriesDataModule(**kwargs)
    dm.setup("fit")
    full = _windows(dm, "train")
    dm._position = (0, 5)  # as after five consumed training windows
    state = dm.state_dict()
    resumed = TimeSeriesDataModule(**kwargs)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    rest = _windows(resumed, "train")
    assert len(resumed._readers["train"].batches) == len(full) and len(rest) == len(full) - 5
    assert all(torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
               for a, b in zip(rest, full[5:]))
    assert [w["window"] for w in _windows(resumed, "train")] == list(range(len(full)))  # then a whole epoch


def test_the_epoch_advances_when_lightning_stops_after_len_windows():
    dm = TimeSeriesDataModule(source="statsmodels:co2", batch_size=4, bptt=100)
    dm.setup("fit")
    windows = dm._readers["train"].batches
    for epoch in range(3):  # Lightning takes len() items and drops the generator unexhausted
        taken = list(itertools.islice(iter(windows), len(windows)))
        assert [(w["epoch"], w["window"]) for w in taken] == [(epoch, i) for i in range(len(windows))]
    windows.start_at(3, len(windows))  # a checkpoint after the last window of epoch 3
    assert next(iter(windows))["epoch"] == 4


def test_frequency_reindexing_turns_missing_timestamps_into_gaps(tmp_path):
    days = pd.date_range("2024-01-01", periods=60, freq="D")
    keep = np.ones(60, bool)
    keep[[7, 30, 31]] = False
    pd.DataFrame({"day": days[keep].strftime("%Y-%m-%d"), "sales": np.arange(60.0)[keep]}).to_csv(
        tmp_path / "daily.csv", index=False)
    kwargs = {"source": "daily.csv", "data_dir": str(tmp_path), "timestamp_column": "day", "batch_size": 2, "bptt": 5}
    plain = TimeSeriesDataModule(**kwargs)
    plain.load()
    assert len(plain.forecast_data().timestamps) == 57 and plain.gap_counts == {"sales": 0}
    daily = TimeSeriesDataModule(frequency="D", **kwargs)
    daily.setup("fit")
    assert np.array_equal(daily.forecast_data().timestamps, days.to_numpy(dtype="datetime64[ns]"))
    assert daily.gap_counts == {"sales": 3}
    inputs = _original(daily, _joined(_windows(daily, "test"), "inputs")[0, :, 0])
    np.testing.assert_allclose(inputs, np.arange(60.0), atol=1e-4)  # interpolated: sales = day number


def _bad_csv(tmp_path, name: str, frame: pd.DataFrame) -> str:
    frame.to_csv(tmp_path / name, index=False)
    return name


def test_bad_series_fail_with_one_line_before_training(tmp_path):
    t = np.arange(50)
    good = pd.DataFrame({"t": t, "y": np.sin(t), "z": np.cos(t)})
    text = good.astype({"y": object})
    text.loc[17, "y"] = "n.a."
    unsorted = good.copy()
    unsorted.loc[23, "t"] = 3
    repeated = pd.DataFrame({"id": ["a"] * 50 + ["b"] * 50, "t": np.r_[t, t], "y": np.r_[t, t] * 1.0})
    two = repeated.copy()
    repeated.loc[60, "t"] = 9
    empty = good.assign(z=np.nan)
    dates = pd.DataFrame({"d": pd.date_range("2024-01-01", periods=50, freq="D").strftime("%Y-%m-%d"), "y": t * 1.0})
    dates.loc[4, "d"] = "yesterday"
    weekly = pd.DataFrame({"d": pd.date_range("2024-01-06", periods=50, freq="W-SAT").strftime("%Y-%m-%d"),
                           "y": t * 1.0})
    weekly.loc[10, "d"] = "2024-03-17"  # a Sunday
    files = {name: _bad_csv(tmp_path, f"{name}.csv", frame) for name, frame in
             {"good": good, "text": text, "unsorted": unsorted, "repeated": repeated, "empty": empty,
              "dates": dates, "weekly": weekly, "two": two}.items()}
    (tmp_path / "notes.txt").write_text("t,y\n")
    cases = [
        ({"source": "missing.csv"}, CorpusError, r"missing.csv' not found: .* does not exist; set \$BPTT_DATA_DIR"),
        ({"source": "notes.txt"}, CorpusError, "neither .csv nor .parquet"),
        ({"source": "statsmodels:nile"}, CorpusError, "unknown source 'statsmodels:nile'"),
        ({"source": files["good"], "timestamp_column": "time"}, CorpusError,
         r"no timestamp column 'time' \(columns: \['t', 'y', 'z'\]\); set data.timestamp_column"),
        ({"source": files["good"], "value_columns": ["y", "w"]}, CorpusError, "no value columns 'w'"),
        ({"source": files["good"], "target_columns": ["w"]}, CorpusError, "target column 'w' is not one of"),
        ({"source": files["good"], "series_column": "id"}, CorpusError, "no series column 'id'"),
        ({"source": files["text"]}, CorpusError, r"column 'y' has the non-numeric value 'n.a.' at row 17 \(line 19\)"),
        ({"source": files["unsorted"]}, CorpusError, r"not sorted: row 23 \(line 25\) .*; sort the file by 't'"),
        ({"source": files["repeated"], "series_column": "id"}, CorpusError,
         r"timestamp 9 appears twice in series 'b', at row 60 \(line 62\) and the row above; "
         r"keep one row per time step"),
        ({"source": files["empty"]}, CorpusError, "value column 'z' has no values"),
        ({"source": files["dates"], "timestamp_column": "d"}, CorpusError, "timestamp 'yesterday' at row 4"),
        ({"source": files["weekly"], "timestamp_column": "d", "frequency": "W-SAT"}, CorpusError,
         "2024-03-17.* is not on the 'W-SAT' grid"),
        ({"source": files["good"], "frequency": "D"}, CorpusError, "needs dates, but column 't' is numeric"),
        ({"source": files["good"], "bptt": 10}, CorpusError,
         r"the validation range of .* has 7 of its 50 steps, fewer than one window \(data.bptt \+ data.horizon = 11\)"),
        ({"source": files["good"], "bptt": 4, "batch_size": 8}, ConfigError,
         "cuts the train range into streams of 4 steps"),
        ({"source": files["two"], "series_column": "id", "batch_size": 3, "bptt": 4}, ConfigError,
         "data.batch_size=3 .* over 2 series"),
        ({"source": files["good"], "bptt": 4, "season": 40}, CorpusError,
         "no two observed train values data.season=40"),
    ]
    for kwargs, error, message in cases:
        dm = TimeSeriesDataModule(data_dir=str(tmp_path), **{"timestamp_column": "t", "bptt": 4, "batch_size": 2,
                                                              **kwargs})
        with pytest.raises(error, match=message) as err:
            dm.load()
        assert "\n" not in str(err.value), str(err.value)
    dm = TimeSeriesDataModule(source=files["good"], data_dir=str(tmp_path), timestamp_column="t", bptt=4, batch_size=2)
    dm.trainer = types.SimpleNamespace(global_rank=0, world_size=4)
    with pytest.raises(ConfigError, match="data.batch_size=2 streams cannot be split evenly over 4 processes"):
        dm.setup("fit")


@pytest.mark.parametrize("kwargs, message", [
    ({"split_fractions": (0.7, 0.2, 0.2)}, "three positive numbers summing to 1"),
    ({"split_fractions": (0.9, 0.1, 0.0)}, "three positive numbers summing to 1"),
    ({"horizon": 0}, "data.horizon must be >= 1"),
    ({"bptt": 0}, "data.bptt must be >= 1"),
    ({"batch_size": 0}, "data.batch_size must be >= 1"),
    ({"season": 0}, "data.season must be >= 1"),
    ({"frequency": "fortnightly"}, "'fortnightly' is not a pandas offset alias"),
    ({"calendar": ["month"]}, re.escape("data.calendar must be distinct periods of ['year', 'week', 'day']")),
    ({"calendar": ["year", "year"]}, "data.calendar must be distinct periods"),
])
def test_bad_settings_are_config_errors_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        TimeSeriesDataModule(**kwargs)
    assert isinstance(err.value, BpttError) and "\n" not in str(err.value)


def _series_with(tmp_path, cell: str, *, row: int = 17, column: str = "y", suffix: str = "csv") -> str:
    """Daily values from 2024-01-01 in columns y and z, one cell replaced by ``cell`` (as text in a CSV)."""
    frame = pd.DataFrame({"d": pd.date_range("2024-01-01", periods=50, freq="D").strftime("%Y-%m-%d"),
                          "y": np.sin(np.arange(50.0)), "z": np.cos(np.arange(50.0))}).astype({column: object})
    frame.loc[row, column] = cell
    if suffix == "parquet":
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
        frame.to_parquet(tmp_path / "series.parquet")
    else:
        frame.to_csv(tmp_path / "series.csv", index=False)
    return f"series.{suffix}"


@pytest.mark.parametrize(
    ("cell", "where", "message"),
    [
        ("inf", {}, r"value column 'y' has the value inf at row 17 \(line 19\), timestamp 2024-01-18: not a finite "
                    r"number of at most 3.4e\+38 in magnitude; fix it, or empty the cell to make it a gap"),
        ("-inf", {"column": "z", "row": 0},
         r"value column 'z' has the value -inf at row 0 \(line 2\), timestamp 2024-01-01"),
        ("Infinity", {"row": 49}, r"value column 'y' has the value inf at row 49 \(line 51\), timestamp 2024-02-19"),
        ("1e39", {}, r"value column 'y' has the value 1e\+39 at row 17 \(line 19\)"),  # overflows float32
        ("-4e38", {}, r"value column 'y' has the value -4e\+38 at row 17"),
        ("inf", {"suffix": "parquet"}, r"value column 'y' has the value inf at row 17, timestamp 2024-01-18"),
    ],
    ids=["inf", "-inf", "Infinity", "1e39", "-4e38", "parquet-inf"],
)
def test_values_must_be_finite_in_float32(cell, where, message, tmp_path):
    source = _series_with(tmp_path, cell, **where)
    dm = TimeSeriesDataModule(source=source, data_dir=str(tmp_path), timestamp_column="d", bptt=4, batch_size=2)
    with pytest.raises(CorpusError, match=f"^{re.escape(str(tmp_path / source))}: {message}") as err:
        dm.load()
    assert "\n" not in str(err.value)


def test_the_first_non_finite_value_of_a_multi_series_file_is_named_by_its_row(tmp_path):
    t = np.arange(30)
    frame = pd.DataFrame({"id": ["a"] * 30 + ["b"] * 30, "t": np.r_[t, t], "y": np.r_[t, t] * 1.0})
    frame.loc[[40, 55], "y"] = [np.inf, -np.inf]
    frame.to_csv(tmp_path / "two.csv", index=False)
    dm = TimeSeriesDataModule(source="two.csv", data_dir=str(tmp_path), timestamp_column="t", series_column="id",
                              bptt=2, batch_size=2)
    with pytest.raises(CorpusError, match=r"value column 'y' has the value inf at row 40 \(line 42\), timestamp 10:"):
        dm.load()


def test_a_numeric_timestamp_must_be_finite(tmp_path):
    (tmp_path / "t.csv").write_text("t,y\n" + "".join(f"{'inf' if k == 5 else k},{k}\n" for k in range(40)))
    dm = TimeSeriesDataModule(source="t.csv", data_dir=str(tmp_path), timestamp_column="t", bptt=2, batch_size=2)
    with pytest.raises(CorpusError, match=r"timestamp inf at row 5 \(line 7\) of column 't' is not a finite number"):
        dm.load()


@pytest.mark.parametrize("cell", ["", "nan", "NaN"])
def test_missing_values_stay_gaps(cell, tmp_path):
    source = _series_with(tmp_path, cell)
    dm = TimeSeriesDataModule(source=source, data_dir=str(tmp_path), timestamp_column="d", bptt=4, batch_size=2)
    dm.load()
    assert dm.gap_counts == {"y": 1, "z": 0}


SUNSPOTS = str(Path(__file__).resolve().parents[2] / "conf/forecast/sunspots.yaml")


@pytest.mark.parametrize(("cell", "shown"), [("inf", "inf"), ("-inf", "-inf"), ("1e39", "1e+39")])
def test_bptt_fit_on_a_non_finite_value_stops_with_one_line_and_exit_2(cell, shown, tmp_path, capsys, monkeypatch):
    source = _series_with(tmp_path, cell)
    monkeypatch.setenv("BPTT_DATA_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    code = main(["fit", "--config", SUNSPOTS, "--data.source", source, "--data.timestamp_column", "d",
                 "--data.value_columns", "[y]", "--data.bptt", "4", "--data.horizon", "1", "--data.batch_size", "2",
                 "--model.horizon", "1", "--trainer.default_root_dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"bptt: error: {tmp_path / source}: value column 'y' has the value {shown} at row 17 (line 19), "
                      "timestamp 2024-01-18: not a finite number of at most 3.4e+38 in magnitude; fix it, or empty "
                      "the cell to make it a gap")
    assert not run_dir.exists()


def test_future_timestamps_continue_the_series_frequency():
    from bptt.datamodules.timeseries import continue_timestamps

    weekly = pd.date_range("2001-11-03", periods=10, freq="W-SAT").to_numpy()
    assert list(continue_timestamps(weekly, None, 3)) == list(pd.date_range("2002-01-12", periods=3, freq="W-SAT"))
    months = pd.date_range("2020-01-01", periods=5, freq="MS").to_numpy()  # 29 to 31 days apart: pandas infers MS
    assert list(continue_timestamps(months, None, 2)) == list(pd.to_datetime(["2020-06-01", "2020-07-01"]))
    assert list(continue_timestamps(months, "D", 2)) == list(pd.to_datetime(["2020-05-02", "2020-05-03"]))  # the run's
    years = np.array([2005.0, 2006.0, 2007.0, 2008.0])
    assert list(continue_timestamps(years, None, 3)) == [2009.0, 2010.0, 2011.0]


def test_future_timestamps_past_pandas_last_date_fail_in_one_line_naming_the_most_steps():
    """pandas' timestamps end on 2262-04-11: 13,512 weeks after 2003-04-19 fit (the last on 2262-04-05),
    13,513 do not; a step pandas cannot name (7.5 days, the median of uneven steps) stops there too."""
    from bptt.datamodules.timeseries import continue_timestamps

    weekly = pd.date_range("2001-01-06", periods=120, freq="W-SAT").to_numpy()  # ends 2003-04-19
    assert continue_timestamps(weekly, None, 13_512)[-1] == np.datetime64("2262-04-05")
    for steps in (13_513, 20_000, 1_000_000_000):
        with pytest.raises(ConfigError) as err:
            continue_timestamps(weekly, None, steps)
        assert str(err.value) == (f"{steps} steps of W-SAT after the series' end (2003-04-19) pass 2262-04-11, the "
                                  "last date pandas' timestamps hold; ask for --horizon 13512 or less")
    uneven = np.array(["2003-04-04", "2003-04-12", "2003-04-19"], dtype="datetime64[ns]")  # 8 and 7 days
    assert continue_timestamps(uneven, None, 2)[-1] == np.datetime64("2003-05-04")
    with pytest.raises(ConfigError, match=r"^20000 steps of 7 days 12:00:00 after the series' end \(2003-04-19\) pass "
                                          r"2262-04-11, .* ask for --horizon 12612 or less$"):
        continue_timestamps(uneven, None, 20_000)


def test_differences_are_added_as_inputs_normalized_by_their_train_pairs(tmp_path, co2):
    """data.differences [1, 52] on co2: inputs (levels, 1-week change, 52-week change), each change
    normalized by the mean and std of its observed train pairs, 0 before its lag; targets stay levels."""
    dm = TimeSeriesDataModule(source="statsmodels:co2", gaps="interpolate", differences=[1, 52], bptt=52)
    plain = TimeSeriesDataModule(source="statsmodels:co2", gaps="interpolate", bptt=52)
    for m in (dm, plain):
        m.setup("test")
    assert dm.forecast_data().input_names == ("co2", "co2_diff1", "co2_diff52")
    inputs = _joined(_windows(dm, "test"), "inputs")[0].double().numpy()  # (2284, 3): series 0, all of it
    expected_levels = _joined(_windows(plain, "test"), "inputs")[0, :, 0].double().numpy()
    np.testing.assert_array_equal(inputs[:, 0], expected_levels.astype(np.float32))
    filled = expected_levels * float(plain.std[0]) + float(plain.mean[0])  # the series as the run fills it
    for column, lag in ((1, 1), (2, 52)):
        pairs = co2[lag:CO2_TRAIN_END] - co2[: CO2_TRAIN_END - lag]  # observed train pairs only
        mean, std = np.nanmean(pairs), np.nanstd(pairs)
        expected = np.zeros(len(filled))
        expected[lag:] = (filled[lag:] - filled[:-lag] - mean) / std
        np.testing.assert_allclose(inputs[:, column], expected, atol=2e-4)
        assert np.all(inputs[:lag, column] == 0)
    np.testing.assert_array_equal(_joined(_windows(dm, "test"), "targets"), _joined(_windows(plain, "test"), "targets"))

    state = dm.state_dict()  # the checkpoint keeps the changes' statistics: a restored run builds the same inputs
    again = TimeSeriesDataModule(source="statsmodels:co2", gaps="interpolate", differences=[1, 52], bptt=52)
    again.load_state_dict(state)
    again.setup("test")
    assert torch.equal(_joined(_windows(again, "test"), "inputs"), _joined(_windows(dm, "test"), "inputs"))
    other = TimeSeriesDataModule(source="statsmodels:co2", gaps="interpolate", differences=[52], bptt=52)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match=re.escape("data.differences=[1, 52]; keep that setting")):
        other.setup("test")
    with pytest.raises(ConfigError, match="distinct lags >= 1"):
        TimeSeriesDataModule(differences=[0, 1])


def test_calendar_phases_are_added_as_sine_and_cosine_inputs(tmp_path):
    """data.calendar [year, week, day]: sin and cos of the fraction of each period gone at each timestamp,
    against the fraction worked out with datetime (leap years, mid-day stamps, Monday-based weeks)."""
    import datetime as dt

    stamps = pd.date_range("2019-12-30 05:00", periods=400, freq="31h")  # across a year end and a leap year's Feb 29
    pd.DataFrame({"timestamp": stamps, "y": np.arange(400.0)}).to_csv(tmp_path / "hours.csv", index=False)
    dm = TimeSeriesDataModule(source="hours.csv", data_dir=str(tmp_path), calendar=["year", "week", "day"],
                              batch_size=1, bptt=8)
    dm.setup("test")
    assert dm.forecast_data().input_names == ("y", "calendar_year_sin", "calendar_year_cos", "calendar_week_sin",
                                              "calendar_week_cos", "calendar_day_sin", "calendar_day_cos")
    inputs = _joined(_windows(dm, "test"), "inputs")[0].double().numpy()  # (400, 7)
    for t, row in zip(stamps.to_pydatetime(), inputs):
        year = dt.datetime(t.year, 1, 1)
        midnight = dt.datetime(t.year, t.month, t.day)
        monday = midnight - dt.timedelta(days=t.weekday())
        phases = [(t - year) / (dt.datetime(t.year + 1, 1, 1) - year), (t - monday) / dt.timedelta(days=7),
                  (t - midnight) / dt.timedelta(days=1)]
        expected = [f(2 * np.pi * p) for p in phases for f in (np.sin, np.cos)]
        np.testing.assert_allclose(row[1:], expected, atol=1e-6)

    state = dm.state_dict()  # a restored run must build the same inputs
    other = TimeSeriesDataModule(source="hours.csv", data_dir=str(tmp_path), calendar=["year"], batch_size=1, bptt=8)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match=re.escape("data.calendar=['year', 'week', 'day']; keep that setting")):
        other.setup("test")


def test_calendar_needs_dates():
    dm = TimeSeriesDataModule(source="statsmodels:sunspots", calendar=["year"], bptt=11)  # years as numbers
    with pytest.raises(ConfigError, match=r"data.calendar=\['year'\] needs dates, but the timestamps .* are numbers"):
        dm.setup("fit")
