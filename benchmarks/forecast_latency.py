"""How long `bptt forecast` takes from the command line to the CSV, start-up included.

A checkpoint of a forecasting config (default conf/forecast/co2.yaml: the one-week model, so that
--horizon 104 feeds its forecasts back 103 times) is trained for a few steps (the forecast's cost does
not depend on how well it was trained), then `bptt forecast CHECKPOINT --horizon H --out F.csv` runs
--repeats times as a fresh process each. Beside it, the time of a process that only imports what the
command imports (`bptt.inference.forecasting` and `bptt.training.run`, which bring torch and Lightning): the share of
the wall time that is start-up. Median and every run recorded.

    python benchmarks/forecast_latency.py [--config conf/forecast/co2.yaml] [--horizon 104] [--repeats 5]
        [--out benchmarks/results/forecast_latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
BPTT = str(Path(sys.executable).parent / "bptt")


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(PROJECT / "conf/forecast/co2.yaml"))
    parser.add_argument("--horizon", type=int, default=104)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/forecast_latency.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timed([BPTT, "fit", "--config", args.config, "--trainer.max_steps", "20", "--task.test_after_fit", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / "run"),
               "--tracking.tracking_uri", f"sqlite:///{work}/mlflow.db"], work)
        checkpoint = str(work / "run/checkpoints/last.ckpt")
        forecast = [BPTT, "forecast", checkpoint, "--horizon", str(args.horizon), "--out", str(work / "f.csv")]
        imports = [sys.executable, "-c", "import bptt.inference.forecasting, bptt.training.run"]
        walls, starts = [], []
        for _ in range(args.repeats):  # interleaved: both see the same moments of a shared machine
            walls.append(timed(forecast, work))
            starts.append(timed(imports, work))
        rows = sum(1 for _ in open(work / "f.csv")) - 1
    out = {"config": str(Path(args.config).resolve().relative_to(PROJECT)), "horizon": args.horizon, "rows": rows,
           "forecast_seconds": {"median": round(statistics.median(walls), 2), "runs": [round(w, 2) for w in walls]},
           "import_seconds": {"median": round(statistics.median(starts), 2), "runs": [round(s, 2) for s in starts]},
           "hardware": hardware(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"bptt forecast --horizon {args.horizon}: {out['forecast_seconds']['median']} s (median of {args.repeats}), "
          f"of which importing bptt.inference.forecasting + bptt.training.run {out['import_seconds']['median']} s")


if __name__ == "__main__":
    main()
