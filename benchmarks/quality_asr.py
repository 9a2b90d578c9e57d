"""Speech recognition quality in a fixed budget of training utterances: conf/asr/fsdd_digits.yaml trained
for 4,000 optimizer steps of 32 utterances (128,000 utterances, 32 epochs), whatever the machine.

Runs the real commands: `bptt fit ... --trainer.max_steps 4000`, then `bptt test` on the best
checkpoint: the digit error rate on 500 connected-digit utterances composed from the official
FSDD test recordings (index 0-4), beside the wall time (feature extraction included). Target: <= 5%.
Needs the FSDD under $BPTT_DATA_DIR (default here: ../shared/data).

    python benchmarks/quality_asr.py [--steps 4000] [--target 0.05] [--out benchmarks/results/quality_asr.json]
        [any `bptt fit` argument]

`make bench-asr-scan` runs it with a minGRU core trained by its parallel scan (target 4%).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
BPTT = str(Path(sys.executable).parent / "bptt")
CONFIG = "conf/asr/fsdd_digits.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps of data.batch_size utterances")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/quality_asr.json"))
    parser.add_argument("--target", type=float, default=0.05, help="digit error rate to reach")
    parser.add_argument("--run-dir", default=str(PROJECT / "runs/bench/quality_asr"))
    args, overrides = parser.parse_known_args()  # anything else goes to `bptt fit`, e.g. --task.backprop exact
    env = dict(os.environ)
    env.setdefault("BPTT_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
    start = time.time()
    subprocess.run([BPTT, "fit", "--config", str(PROJECT / CONFIG), "--trainer.max_steps", str(args.steps),
                    "--trainer.max_epochs", "1000", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", args.run_dir,
                    "--tracking.tracking_uri", f"sqlite:///{Path(args.run_dir).resolve()}/mlflow.db",
                    "--tracking.experiment_name", "quality_asr", *overrides], check=True, env=env)
    wall = time.time() - start
    rows = list(csv.DictReader(open(max(Path(args.run_dir).glob("logs/version_*/metrics.csv")))))  # the fit's
    result = subprocess.run([BPTT, "test", f"{args.run_dir}/checkpoints/best.ckpt", "--trainer.enable_progress_bar",
                             "false"], check=True, env=env, capture_output=True, text=True)
    test = json.loads(result.stdout.strip().splitlines()[-1])
    out = {
        "config": CONFIG, "overrides": overrides, "budget_steps": args.steps, "wall_seconds": round(wall),
        "test_digit_error_rate": test["test/ter"], "test_loss_nats_per_label": test["test/loss"],
        "optimizer_steps": max(int(r["step"]) for r in rows),
        "val_history": [(int(r["step"]), float(r["val/loss"]), float(r["val/ter"])) for r in rows if r.get("val/ter")],
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
        "target_digit_error_rate": args.target, "target_met": test["test/ter"] <= args.target,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"test digit error rate {test['test/ter']:.4f} after {out['optimizer_steps']} steps in {wall / 60:.1f} min "
          f"(target <= {args.target})")


if __name__ == "__main__":
    main()
