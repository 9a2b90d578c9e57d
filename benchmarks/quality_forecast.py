"""Forecast quality: conf/forecast/co2.yaml trained by `bptt fit`, MASE on the test range against baselines.

`bptt fit` ends with the test split on the best checkpoint (``task.test_after_fit``); its
test MASE (target: < 1, better than the seasonal-naive forecast) is recorded next to the
MASE of two baselines on the same test targets, computed here from the same DataModule:
seasonal naive (the value 52 weeks earlier) and persistence (the last value). A MASE is a
mean absolute error divided by the seasonal-naive error on the training range.

    python benchmarks/quality_forecast.py [--config conf/forecast/co2.yaml] [--out benchmarks/results/quality_forecast.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
BPTT = str(Path(sys.executable).parent / "bptt")


def baselines(config: str) -> dict[str, float]:
    """Test-range MASE of seasonal naive and persistence, on the targets the model is scored on (one step ahead)."""
    import torch

    from bptt.config import build_parser, instantiate, parse_config

    parser = build_parser()
    data = instantiate(parse_config(["--config", config], parser), parser).data
    data.prepare_data()
    data.setup("test")
    batches = list(data.test_dataloader())
    mean, std = data.target_mean, data.target_std
    series = torch.cat([b["inputs"][0, :, 0] for b in batches]) * std[0] + mean[0]  # stream 0, filled, series units
    actual = torch.cat([b["targets"][0, :, 0, 0] for b in batches]) * std[0] + mean[0]  # the value after each step
    counted = torch.cat([b["target_mask"][0, :, 0, 0] for b in batches])
    steps = torch.nonzero(counted).flatten()  # t: its target is x(t + 1)
    season = data.season
    scale = float(data.mase_scale[0])
    seasonal = (actual[steps] - series[steps + 1 - season]).abs().mean() / scale
    persistence = (actual[steps] - series[steps]).abs().mean() / scale
    return {"seasonal_naive": float(seasonal), "persistence": float(persistence), "targets": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(PROJECT / "conf/forecast/co2.yaml"))
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/quality_forecast.json"))
    parser.add_argument("--run-dir", default=str(PROJECT / "runs/bench/quality_forecast"))
    args = parser.parse_args()
    start = time.time()
    result = subprocess.run([BPTT, "fit", "--config", args.config, "--trainer.enable_progress_bar", "false",
                             "--trainer.default_root_dir", args.run_dir,
                             "--tracking.tracking_uri", f"sqlite:///{Path(args.run_dir).resolve()}/mlflow.db"],
                            check=True, capture_output=True, text=True)
    wall = time.time() - start
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    reference = baselines(args.config)
    out = {
        "config": str(Path(args.config).resolve().relative_to(PROJECT)), "wall_seconds": round(wall),
        "test": {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("test/")},
        "baseline_mase": reference,
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
        "target_met": metrics["test/mase"] < 1.0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"test MASE {metrics['test/mase']:.3f} (seasonal naive {reference['seasonal_naive']:.3f}, persistence "
          f"{reference['persistence']:.3f}); MAE {metrics['test/mae']:.3f}, RMSE {metrics['test/rmse']:.3f}; {wall:.0f} s")


if __name__ == "__main__":
    main()
