"""Peak memory of CTC training on one 10-second against one 10-minute utterance.

The model, task and optimizer of conf/asr/fsdd_digits.yaml train for 3 steps on a single
utterance of random log-mel frames (100 per second) with random digit labels (2.5 per second),
under three settings: ``backprop: truncated`` and ``backprop: exact`` with windows of
``task.k1`` frames, and full BPTT (one window over the whole utterance, what a plain loop
does). Each case runs in a fresh process; the peak resident memory (VmHWM, reset through
/proc/self/clear_refs once the model and data are built) is read after training. Target: in
truncated mode the 10-minute peak within 1.5x of the 10-second one; full BPTT grows linearly.
With ``--accelerator gpu`` the figure is the CUDA allocator's peak during training instead.

    python benchmarks/memory_asr.py [--accelerator cpu | gpu] [--out benchmarks/results/memory_asr.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT / "conf/asr/fsdd_digits.yaml"
MODES = ("truncated", "exact", "full")
SECONDS = (10, 600)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(mode: str, seconds: int, accelerator: str) -> dict:
    """Train 3 steps on one utterance in this process; memory in MB."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from bptt.config.parser import build_parser, instantiate, parse_config

    overrides = ["--task.backprop", "exact" if mode == "exact" else "truncated"]
    if mode == "full":
        overrides += ["--task.k1", "null"]
    parser = build_parser()
    init = instantiate(parse_config(["--config", str(CONFIG), *overrides], parser), parser)
    pl.seed_everything(0, verbose=False)
    frames, labels = 100 * seconds, int(2.5 * seconds)
    features = init.data.num_features
    batch = {
        "inputs": torch.randn(1, frames, features),  # (B, T, F)
        "input_lengths": torch.tensor([frames]),
        "targets": torch.randint(1, init.data.vocab_size, (1, labels)),  # (B, S)
        "target_lengths": torch.tensor([labels]),
    }
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False)
    gpu = accelerator == "gpu"
    if gpu:  # the model's weights and optimizer state count as baseline
        init.task.cuda()
        baseline, peak = 0.0, lambda: torch.cuda.max_memory_allocated() / 2**20
    else:
        baseline, peak = _status_kb("VmRSS") / 1024, lambda: _status_kb("VmHWM") / 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    trainer.fit(init.task, train_dataloaders=DataLoader([batch] * 3, batch_size=None))
    out_frames = int(init.model.output_lengths(torch.tensor(frames)))
    return {
        "mode": mode, "seconds": seconds, "frames": frames, "k1": None if mode == "full" else init.task.k1,
        "accelerator": accelerator, "peak_mb": peak(), "baseline_mb": baseline, "above_baseline_mb": peak() - baseline,
        # what any mode holds for the whole utterance: its features, and the log-probabilities and their gradient
        "utterance_buffers_mb": (frames * features + 2 * out_frames * init.data.vocab_size) * 4 / 2**20,
        "seconds_per_step": (time.perf_counter() - start) / 3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/memory_asr.json"))
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--probe", nargs=2, metavar=("MODE", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]), args.accelerator)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cases = []
    for mode in MODES:
        for seconds in SECONDS:
            probe_args = ["--probe", mode, str(seconds), "--accelerator", args.accelerator]
            result = subprocess.run([sys.executable, __file__, *probe_args], check=True,
                                    capture_output=True, text=True, env=env)
            cases.append(json.loads(result.stdout.strip().splitlines()[-1]))
            c = cases[-1]
            print(f"{mode:9s} {seconds:4d} s: peak {c['peak_mb']:7.1f} MB, "
                  f"above baseline {c['above_baseline_mb']:7.1f} MB, {c['seconds_per_step']:.2f} s/step", flush=True)
    peak = {(c["mode"], c["seconds"]): c for c in cases}
    ratios = {mode: {
        "peak": peak[(mode, SECONDS[1])]["peak_mb"] / peak[(mode, SECONDS[0])]["peak_mb"],
        "above_baseline": peak[(mode, SECONDS[1])]["above_baseline_mb"] / peak[(mode, SECONDS[0])]["above_baseline_mb"],
    } for mode in MODES}
    out = {
        "config": str(CONFIG.relative_to(PROJECT)), "cases": cases, "ratio_10min_over_10s": ratios,
        "target_met": ratios["truncated"]["peak"] <= 1.5,
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for mode, r in ratios.items():
        print(f"{mode:9s} 10 min / 10 s: peak {r['peak']:.2f}x, above baseline {r['above_baseline']:.2f}x")


if __name__ == "__main__":
    main()
