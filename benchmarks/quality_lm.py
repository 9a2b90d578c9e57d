"""Model quality in a fixed budget of training characters: conf/lm/tinyshakespeare_char.yaml trained on
32,768,000 characters (4,000 optimizer steps of 64 streams x 128), whatever the machine.

Runs the real command, `bptt fit ... --trainer.max_steps N` (N = the budget over the characters of one
step: data.batch_size x data.bptt), then `bptt validate` on the best checkpoint, and records the
validation loss in nats per character beside the wall time it took (target: <= 1.50; a plain fp32
PyTorch loop with a 2 x 512 LSTM and Adam reached about 1.53 in 30 minutes of a 2-core AMD EPYC, about
this budget). Needs tiny Shakespeare under $BPTT_DATA_DIR (default here: ../shared/data).

    python benchmarks/quality_lm.py [--tokens 32768000] [--config conf/lm/tinyshakespeare_char.yaml]
        [--out benchmarks/results/quality_lm.json] [any `bptt fit` argument]

The scan-core recipe: `--config conf/lm/tinyshakespeare_char_scan.yaml --out
benchmarks/results/quality_lm_scan.json` (`make bench-quality-scan`).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32_768_000, help="training characters (all streams)")
    parser.add_argument("--config", default="conf/lm/tinyshakespeare_char.yaml", help="relative to the project")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/quality_lm.json"))
    parser.add_argument("--target", type=float, default=1.50, help="nats per character to reach")
    parser.add_argument("--run-dir", default=str(PROJECT / "runs/bench/quality_lm"))
    args, overrides = parser.parse_known_args()  # anything else goes to `bptt fit`
    env = dict(os.environ)
    env.setdefault("BPTT_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
    config = str(PROJECT / args.config)
    steps = budget_steps(args.tokens, [config, *overrides])
    start = time.time()
    subprocess.run([BPTT, "fit", "--config", config, "--trainer.max_steps", str(steps), "--trainer.max_epochs", "1000",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", args.run_dir,
                    "--tracking.tracking_uri", f"sqlite:///{Path(args.run_dir).resolve()}/mlflow.db",
                    "--tracking.experiment_name", "quality_lm", *overrides],
                   check=True, env=env)
    wall = time.time() - start
    result = subprocess.run([BPTT, "validate", f"{args.run_dir}/checkpoints/best.ckpt",
                             "--trainer.enable_progress_bar", "false"],
                            check=True, env=env, capture_output=True, text=True)
    val = json.loads(result.stdout.strip().splitlines()[-1])
    rows = list(csv.DictReader(open(next(Path(args.run_dir).glob("logs/version_*/metrics.csv")))))
    speeds = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    out = {
        "config": args.config, "overrides": overrides, "budget_tokens": args.tokens, "wall_seconds": round(wall),
        "val_loss_nats_per_char": val["val/loss"], "val_bpc": val["val/bpc"], "optimizer_steps": steps,
        "precision": _chosen_precision(Path(args.run_dir)),
        "median_tokens_per_sec": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "val_history": [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")],
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
        "target_nats_per_char": args.target, "target_met": val["val/loss"] <= args.target,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"val loss {val['val/loss']:.4f} nats/char after {steps} steps ({args.tokens:,} characters) in "
          f"{wall / 60:.1f} min (target <= {args.target})")


def budget_steps(tokens: int, config_args: list[str]) -> int:
    """Optimizer steps that train on ``tokens`` characters: one step reads data.batch_size x data.bptt."""
    from bptt.config.parser import parse_config

    cfg = parse_config(["--config", *config_args])
    data = cfg.data.init_args
    return -(-tokens // (data.batch_size * data.bptt))


def _chosen_precision(run_dir: Path) -> str:
    """The run's precision as its config.yaml records it (``auto`` writes what it chose)."""
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["precision"]


if __name__ == "__main__":
    main()
