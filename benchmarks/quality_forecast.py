"""Forecast quality across horizons: an RNN config trained by `bptt fit` against the baselines forecasters use,
scored in one protocol on the same test targets.

Protocol (rolling origin): every origin t before the end of the series, the forecast of step t + h counted when
t + h lies in the test range and was observed (the RNN's own `test/mase_h{h}`, read from `bptt fit`'s
metrics; its state warmed up on the actuals up to t). Each baseline sees the same history: the series up to t,
gaps filled as the run fills them. Parameters are fitted once, on the training range only, then filtered
through the later data without refitting (what the RNN gets too). MASE: the mean absolute error over
those targets divided by the seasonal-naive error on the training range (`data.season`), per horizon.

Baselines: persistence (the last value), seasonal naive (the value a season back), drift (the last value
plus h times the mean step of the history), statsmodels ETS (additive error, trend and seasonality),
SARIMA (the order of a small grid with the lowest AIC on the training range) and Theta (statsmodels'
ThetaModel on the training range: SES with drift on the series deseasonalized by a classical
decomposition; its smoothing weight and drift then run through the later data). The fitting seconds of
each are recorded.

    python benchmarks/quality_forecast.py [--config conf/forecast/co2.yaml] [--horizons 1,4,13,52] [--seeds 0,1,2]
        [--out benchmarks/results/quality_forecast_co2.json] [any `bptt fit` argument]

``--seeds``: one `bptt fit` per seed; the RNN row is their ensemble (the mean of the members' forecasts, as
`bptt forecast CKPT CKPT ...` gives), each member's best checkpoint run over the series with the task's own
forward; each member's own MASE is recorded, and checked against its `test/mase_h{h}` from `bptt fit`.

`make bench-forecast` runs co2 (h = 1, 4, 13, 52 weeks: the RNN evaluated recursively, its one-week
forecasts fed back), co2_year (a direct head of 52 weeks), sunspots (h = 1, 3, 11 years: its direct head
widened to 11 years) and sunspots_cycle (an ensemble of 5 seeds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
BPTT = str(Path(sys.executable).parent / "bptt")


def test_targets(config: str, overrides: list[str]) -> dict:
    """The series as the run sees it, from the run's own DataModule: values y (N,) in the series' units
    (gaps filled), which forecasts count ``counted`` (N, H): origin t, h + 1 steps ahead, the training
    range's end, the season and the MASE scale."""
    from bptt.config.parser import build_parser, instantiate, parse_config

    parser = build_parser()
    data = instantiate(parse_config(["--config", config, *overrides], parser), parser).data
    data.prepare_data()
    data.setup("test")
    batches = list(data.test_dataloader())
    mean, std = float(data.target_mean[0]), float(data.target_std[0])
    values = np.concatenate([b["inputs"][0, :, 0].double().numpy() for b in batches]) * std + mean  # stream 0
    counted = np.concatenate([b["target_mask"][0, :, :, 0].numpy() for b in batches])  # (N, H)
    actual = np.concatenate([b["targets"][0, :, :, 0].double().numpy() for b in batches]) * std + mean  # (N, H)
    return {"y": values, "counted": counted, "actual": actual, "train_end": data.bounds[0][0], "season": data.season,
            "scale": float(data.mase_scale[0]), "horizon": counted.shape[1]}


def origins(counted: np.ndarray) -> np.ndarray:
    """The origins t with any counted forecast."""
    return np.flatnonzero(counted.any(axis=1))


def naive_forecasts(y: np.ndarray, ts: np.ndarray, horizon: int, season: int) -> dict[str, np.ndarray]:
    """Persistence, seasonal naive and drift from each origin: (len(ts), H) each."""
    h = np.arange(1, horizon + 1)
    back = h - season * np.ceil(h / season).astype(int)  # the same phase in the last season observed (<= 0)
    slope = (y[ts] - y[0]) / np.maximum(ts, 1)  # the mean step of the history
    return {"persistence": np.repeat(y[ts, None], horizon, axis=1), "seasonal_naive": y[ts[:, None] + back[None, :]],
            "drift": y[ts, None] + slope[:, None] * h[None, :]}


def ets_forecasts(y: np.ndarray, train_end: int, ts: np.ndarray, horizon: int, season: int) -> tuple[np.ndarray, float]:
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    seasonal = dict(seasonal="add", seasonal_periods=season) if season > 1 else {}
    start = time.time()
    fitted = ETSModel(pd.Series(y[:train_end]), error="add", trend="add", **seasonal).fit(disp=False)
    seconds = time.time() - start
    full = ETSModel(pd.Series(y), error="add", trend="add", **seasonal).smooth(fitted.params)  # no refit
    out = np.stack([full.get_prediction(start=t + 1, end=t + horizon, dynamic=0).predicted_mean.to_numpy()
                    for t in ts])
    return out, seconds


def sarima_forecasts(y: np.ndarray, train_end: int, ts: np.ndarray, horizon: int, season: int
                     ) -> tuple[np.ndarray, float, str]:
    """The grid: (p, 1, q) x seasonal (0, 1, 1) for long seasons (weekly data; each fit takes minutes),
    (p, 0, q) x seasonal (0, 0, 0) or (1, 0, 0) for short ones; p in 0..2 (1..3 for short seasons), q in 0..1."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    if season >= 24:
        grid = [((p, 1, q), (0, 1, 1, season)) for p, q in [(0, 1), (1, 1), (2, 0)]]
    else:
        grid = [((p, 0, q), seasonal) for p, q, seasonal in itertools.product(
            (1, 2, 3), (0, 1), ((0, 0, 0, 0), (1, 0, 0, season) if season > 1 else (0, 0, 0, 0)))]
        grid = list(dict.fromkeys(grid))
    start = time.time()
    best = min((SARIMAX(y[:train_end], order=o, seasonal_order=s).fit(disp=False) for o, s in grid),
               key=lambda r: r.aic)
    seconds = time.time() - start
    full = best.apply(y)  # the training range's parameters, filtered through everything
    out = np.stack([full.get_prediction(start=t + 1, end=t + horizon, dynamic=True).predicted_mean for t in ts])
    order = f"{best.model.order}x{best.model.seasonal_order}"
    return out, seconds, order


def theta_forecasts(
    y: np.ndarray, train_end: int, ts: np.ndarray, horizon: int, season: int
) -> tuple[np.ndarray, float]:
    """statsmodels' ThetaModel (theta 2) fitted on the training range; its forecast from origin t,
    b0 / 2 (h - 1 + 1/alpha - (1 - alpha)^n / alpha) + the SES level at t (n: the observations read),
    on the series deseasonalized by the training range's seasonal indices, then reseasonalized."""
    from statsmodels.tsa.forecasting.theta import ThetaModel
    from statsmodels.tsa.seasonal import seasonal_decompose

    start = time.time()
    multiplicative = bool((y[:train_end] > 0).all())
    if season > 1:
        index = seasonal_decompose(y[:train_end], period=season, model="mul" if multiplicative else "add").seasonal
        index = index[:season]  # the seasonal index of each phase t mod season
    else:
        index = np.array([1.0 if multiplicative else 0.0])
    phase = np.arange(len(y) + horizon) % season
    adjust = index[phase]
    plain = y / adjust[: len(y)] if multiplicative else y - adjust[: len(y)]
    fitted = ThetaModel(plain[:train_end], deseasonalize=False).fit(disp=False)
    seconds = time.time() - start
    alpha, b0 = float(fitted.params["alpha"]), float(fitted.params["b0"])
    level = np.empty(len(y))
    level[0] = plain[0]
    for t in range(1, len(y)):  # SES through everything, the fitted weight kept
        level[t] = alpha * plain[t] + (1 - alpha) * level[t - 1]
    h = np.arange(1, horizon + 1)
    n = ts + 1
    trend = 0.5 * b0 * (h[None, :] - 1 + 1 / alpha - ((1 - alpha) ** n / alpha)[:, None])
    out = level[ts, None] + trend  # (len(ts), H) deseasonalized
    future = adjust[ts[:, None] + h[None, :]]
    out = out * future if multiplicative else out + future
    # from the training range's end this is statsmodels' own Theta forecast: checked, not assumed
    own = ThetaModel(y[:train_end], period=season if season > 1 else None).fit(disp=False).forecast(horizon)
    mine = level[train_end - 1] + 0.5 * b0 * (h - 1 + 1 / alpha - (1 - alpha) ** train_end / alpha)
    mine = mine * adjust[train_end - 1 + h] if multiplicative else mine + adjust[train_end - 1 + h]
    np.testing.assert_allclose(mine, np.asarray(own), rtol=1e-6)
    return out, seconds


def rnn_forecasts(checkpoint: Path) -> np.ndarray:
    """(N, H) a checkpoint's point forecasts from every step of series 0, in the series' units: the
    task's own forward over the whole series, the state carried from its first step (what the test
    stream does: its first windows warm up)."""
    import torch

    from bptt.training.checkpointing import load_checkpoint
    from bptt.training.restore import restore

    _, init, loaded = restore(checkpoint, [], False, checkpoint=load_checkpoint(checkpoint))
    task, data = init.task, init.data
    task.load_state_dict(loaded["state_dict"])
    task.eval()
    data.load_statistics()
    described = data.forecast_data()
    task.use_data(described)
    history = data.history(1)[0]
    with torch.no_grad():
        raw, _ = task.forecast(history.inputs[None], None)  # (1, N, H, C_out[, P])
    point = task.predictive.point(raw)[0, :, :, 0].double()  # (N, H), normalized
    return (point * described.target_std[0].double() + described.target_mean[0].double()).numpy()


def mase_by_horizon(forecasts: np.ndarray, target: dict, ts: np.ndarray, horizons: list[int]) -> dict[str, float]:
    errors = np.abs(forecasts - target["actual"][ts]) / target["scale"]  # (len(ts), H)
    counted = target["counted"][ts]
    return {f"h{h}": float(errors[:, h - 1][counted[:, h - 1]].mean()) for h in horizons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(PROJECT / "conf/forecast/co2.yaml"))
    parser.add_argument("--horizons", default="1,4,13,52")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/quality_forecast_<config>.json")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--seeds", default=None, help="e.g. 0,1,2: an ensemble of one run per seed")
    parser.add_argument("--no-baselines", action="store_true", help="the RNN only (e.g. to read its intervals)")
    args, overrides = parser.parse_known_args()  # anything else goes to `bptt fit`
    name = Path(args.config).stem
    out_path = Path(args.out or PROJECT / f"benchmarks/results/quality_forecast_{name}.json")
    run_dir = Path(args.run_dir or PROJECT / f"runs/bench/quality_forecast_{name}")
    horizons = [int(h) for h in args.horizons.split(",")]
    longest = max(horizons)
    target = test_targets(args.config, ["--data.horizon", str(longest), *overrides])
    ts = origins(target["counted"])
    y, train_end, season = target["y"], target["train_end"], target["season"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    members, member_forecasts, walls = [], [], []
    for seed in seeds:
        where = run_dir if seed is None else run_dir / f"seed{seed}"
        start = time.time()
        result = subprocess.run([BPTT, "fit", "--config", args.config, "--data.horizon", str(longest), *overrides,
                                 *([] if seed is None else ["--seed_everything", str(seed)]),
                                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(where),
                                 "--tracking.tracking_uri", f"sqlite:///{where.resolve()}/mlflow.db"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"bptt fit failed:\n{result.stderr[-3000:]}")
        walls.append(time.time() - start)
        metrics = json.loads(result.stdout.strip().splitlines()[-1])
        members.append(metrics)
        if seed is not None:
            forecasts = rnn_forecasts(where / "checkpoints/best.ckpt")[ts]  # (len(ts), H)
            own = mase_by_horizon(forecasts, target, ts, horizons)
            for h in horizons:  # the same protocol as the run's own test: checked, not assumed
                assert abs(own[f"h{h}"] - metrics[f"test/mase_h{h}"]) <= 1e-4 * metrics[f"test/mase_h{h}"], (h, own)
            member_forecasts.append(forecasts)
    if member_forecasts:
        rnn = mase_by_horizon(np.mean(member_forecasts, axis=0), target, ts, horizons)
    else:
        rnn = {f"h{h}": members[0][f"test/mase_h{h}"] for h in horizons}
    table = {"rnn": {"mase": rnn, "fit_seconds": round(sum(walls), 1)}}
    if not args.no_baselines:
        for method, forecasts in naive_forecasts(y, ts, longest, season).items():
            table[method] = {"mase": mase_by_horizon(forecasts, target, ts, horizons), "fit_seconds": 0.0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels' convergence and frequency notes
            forecasts, seconds = ets_forecasts(y, train_end, ts, longest, season)
            table["ets"] = {"mase": mase_by_horizon(forecasts, target, ts, horizons),
                            "fit_seconds": round(seconds, 1)}
            forecasts, seconds, order = sarima_forecasts(y, train_end, ts, longest, season)
            table["sarima"] = {"mase": mase_by_horizon(forecasts, target, ts, horizons),
                               "fit_seconds": round(seconds, 1), "order": order}
            forecasts, seconds = theta_forecasts(y, train_end, ts, longest, season)
            table["theta"] = {"mase": mase_by_horizon(forecasts, target, ts, horizons),
                              "fit_seconds": round(seconds, 1)}
    out = {
        "config": str(Path(args.config).resolve().relative_to(PROJECT)), "overrides": overrides, "horizons": horizons,
        "test_targets": {f"h{h}": int(target["counted"][:, h - 1].sum()) for h in horizons},
        "table": table, "seeds": seeds if args.seeds else None,
        "rnn_members": [{"seed": seed, "mase": {f"h{h}": m[f"test/mase_h{h}"] for h in horizons},
                         "test": {k.split("/")[1]: v for k, v in m.items() if k.startswith("test/")}}
                        for seed, m in zip(seeds, members)],
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))
    print(f"{name}: test MASE by horizon ({', '.join(f'h={h}' for h in horizons)}), fitting seconds")
    for method, row in table.items():
        print(f"  {method:15s} " + "  ".join(f"{row['mase'][f'h{h}']:.3f}" for h in horizons)
              + f"   {row['fit_seconds']:.1f} s" + (f"  {row['order']}" if "order" in row else ""))


if __name__ == "__main__":
    main()
