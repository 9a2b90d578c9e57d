"""Truncation is real: the copy memory task learnt with TBPTT(K, K) for windows K shorter and longer than its lag.

conf/synthetic/copy_memory.yaml: each symbol must be output ``lag`` = L steps after it was
read (T = L + length steps per sequence). In split mode the engine cuts each sequence into
windows of ``task.k1`` = K steps and backpropagates within a window only (task.k2 unset:
TBPTT(K, K)); a symbol read at step i and recalled at step i + L fall in different windows
whenever K <= L, so no gradient ever asks the network to remember, and its validation loss
stays at the uniform guess ln(symbols). With K >= T every sequence is one window (full BPTT).

Runs the real command once per (K, seed), the same settings and training sequences otherwise:

    bptt fit --config conf/synthetic/copy_memory.yaml --task.k1 K --seed_everything S --data.seed S \
        --trainer.max_steps N*ceil(T/K)

Every run reads the same N batches (the config's max_steps, N = 4000); the engine takes one
optimizer step per window, so shorter windows get more optimizer steps, not fewer. It records the final
``val/loss`` against the baseline (target: below it by a clear margin for every K >= T, within 0.02 nats
of it for every K <= L).

    python benchmarks/truncation.py [--windows 10 20 40] [--seeds 0 1] [--out benchmarks/results/truncation.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
BPTT = str(Path(sys.executable).parent / "bptt")
CONFIG = "conf/synthetic/copy_memory.yaml"


def fit(window: int, seed: int, steps: int, extra: list[str], root: Path) -> dict[str, float]:
    """``bptt fit`` of the config with ``task.k1 = window`` for ``steps`` optimizer steps; its final
    validation loss and wall time."""
    run = root / f"k{window}-s{seed}"
    start = time.time()
    result = subprocess.run(
        [BPTT, "fit", "--config", str(PROJECT / CONFIG), "--task.k1", str(window), "--seed_everything", str(seed),
         "--data.seed", str(seed), "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(run),
         "--tracking.tracking_uri", f"sqlite:///{root}/mlflow.db", "--tracking.experiment_name", "truncation", *extra],
        check=False, capture_output=True, text=True, cwd=root,
    )
    if result.returncode != 0:
        sys.exit(f"bptt fit failed for k1={window}, seed={seed}:\n{result.stderr[-3000:]}")
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    return {"val_loss": metrics["val/loss"], "wall_seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20, 40], help="task.k1 values K")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `bptt fit` overrides, last")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/truncation.json"))
    args = parser.parse_args()
    config = yaml.safe_load((PROJECT / CONFIG).read_text())
    data, batches = config["data"]["init_args"], config["trainer"]["max_steps"]
    for i, value in enumerate(args.extra[:-1]):  # --data.lag 30 and the like change the task
        if value.startswith("--data.") and value[7:] in data:
            data[value[7:]] = type(data[value[7:]])(args.extra[i + 1])
    lag, length, baseline = data["lag"], data["length"], math.log(data["symbols"])
    assert config["task"]["init_args"]["k1"] >= lag + length, "the config's max_steps counts batches of one window"
    runs = []
    with tempfile.TemporaryDirectory(prefix="bptt-truncation-") as tmp:
        for window in args.windows:
            for seed in args.seeds:
                steps = batches * math.ceil((lag + length) / window)  # one optimizer step per window
                result = fit(window, seed, steps, args.extra, Path(tmp))
                runs.append({"k1": window, "seed": seed, "batches": batches, "optimizer_steps": steps, **result,
                             "beats_baseline_by": baseline - result["val_loss"]})
                print(f"k1={window:4d} seed={seed}  val/loss {result['val_loss']:.4f}  ({result['wall_seconds']} s)",
                      flush=True)
    print(f"\ncopy memory, lag L={lag}, length {length} (T={lag + length}); "
          f"baseline ln {data['symbols']} = {baseline:.4f}")
    print(f"{'K (task.k1)':>12} {'K vs L':>8} " + " ".join(f"{'seed ' + str(s):>10}" for s in args.seeds))
    for window in args.windows:
        losses = [r["val_loss"] for r in runs if r["k1"] == window]
        relation = ("K < L" if window < lag else "K = L" if window == lag
                    else "K >= T" if window >= lag + length else "K > L")
        print(f"{window:>12} {relation:>8} " + " ".join(f"{v:>10.4f}" for v in losses))
    short = [r for r in runs if r["k1"] <= lag]
    whole = [r for r in runs if r["k1"] >= lag + length]
    out = {
        "config": CONFIG, "overrides": args.extra, "task": "copy memory", "lag": lag, "length": length,
        "sequence_length": lag + length, "symbols": data["symbols"], "baseline_loss": baseline,
        "command": f"bptt fit --config {CONFIG} --task.k1 K --seed_everything S --data.seed S "
                   f"--trainer.max_steps {batches}*ceil({lag + length}/K) {' '.join(args.extra)}".strip(),
        "runs": runs,
        "claim": "val/loss within 0.02 nats of the baseline for every K <= L, "
                 "and at least 0.5 nats below it for every K >= T",
        "claim_holds": bool(short and whole) and all(abs(r["beats_baseline_by"]) < 0.02 for r in short)
        and all(r["beats_baseline_by"] > 0.5 for r in whole),
        "hardware": hardware(torch_threads="default (each bptt fit process)"),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"claim holds: {out['claim_holds']}  -> {args.out}")


if __name__ == "__main__":
    main()
