"""What a sweep costs on top of its trials, and what a second data-parallel worker buys.

1. Overhead: the same N quickstart trials (one learning rate each, about a minute of training)
   run (a) by `bptt fit` one after another, each on as many CPU threads as a sweep worker gets,
   (b) by `bptt sweep` (FIFO, every trial a Ray Train job of one worker), C at a time, and
   (c) by `bptt fit`, C processes at a time, no Ray.
   overhead = sweep wall time / (sum of the fit wall times / C) - 1, as the issue defines it; all
   walls include process start, data loading and MLflow logging; the sweep's also Ray's start and
   the served MLflow store. (c) separates what C processes sharing this machine's cores cost
   (memory bandwidth, caches) from what the sweep machinery costs: sweep / (c) - 1.
   CPU seconds: the fits' against the sweep's whole process tree (Ray, the served MLflow store,
   the trials), by process name, read from /proc: on a machine whose cores the trials fill, every
   CPU second of the sweep machinery is wall time taken from the trials.
2. Scaling: tokens/s of one trial with 1 and with 2 workers (same global batch of streams, one CPU
   per worker), read from the trial's MLflow history (the median after the first fifth).

    python benchmarks/sweep_overhead.py [--trials 4] [--concurrency 2] [--steps 1500] [--skip-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bptt.hardware import hardware

PROJECT = Path(__file__).resolve().parents[1]
BPTT = str(Path(sys.executable).parent / "bptt")
QUICKSTART = PROJECT / "conf/lm/quickstart.yaml"
LRS = [0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009]


def _common(steps: int) -> dict:
    return {"trainer.max_steps": steps, "trainer.val_check_interval": max(steps // 6, 1),
            "trainer.log_every_n_steps": 20, "tracking.log_model": False}


class ProcessTreeCPU:
    """CPU seconds used by a process and every process below it (Ray's services, actors and
    workers, the MLflow server), by process name, read from Linux's /proc once a second while it
    runs (a process's last second before it exits can be missed). Ray names an actor's process
    after its class: ray::RayTrainWorker, ray::TrainController, ray::ImplicitFunc (a Tune trial)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.seen, self.tick = pid, {}, os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith("python"):  # a Python service: name it by its module or script
                argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:] if a]
                if "-m" in argv[:-1]:
                    name = argv[argv.index("-m") + 1]
                elif "-c" not in argv:
                    name = next((Path(a).stem for a in argv if not a.startswith("-")), name)
            self.seen[pid] = (name, (int(fields[11]) + int(fields[12])) / self.tick)
            todo += map(int, children)

    def by_name(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, cpu in self.seen.values():
            totals[name] = totals.get(name, 0.0) + cpu
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _run(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, dict[str, float]]:
    """Wall seconds of one `bptt` command, and the CPU seconds of its process tree by process name."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([BPTT, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        cpu = ProcessTreeCPU(proc.pid)
        while True:
            cpu.sample()
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"bptt {' '.join(args[:3])} failed:\n{log.read()[-3000:]}")
    return wall, cpu.by_name()


def _sweep_file(directory: Path, name: str, lrs: list[float], steps: int, workers: int, concurrency: int) -> Path:
    spec = {"name": name, "base": str(QUICKSTART), "overrides": _common(steps),
            "space": {"task.optimizer.init_args.lr": {"grid": lrs}}, "scheduler": {"type": "fifo"},
            "max_concurrent_trials": concurrency, "resources": {"num_workers": workers, "cpus_per_worker": 1},
            "tracking": {"experiment_name": name}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def overhead(trials: int, concurrency: int, steps: int) -> dict:
    lrs = LRS[:trials]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fits, fit_cpu = [], []

        def fit_args(lr: float, tag: str) -> list[str]:
            overrides = [a for k, v in {**_common(steps), "task.optimizer.init_args.lr": lr}.items()
                         for a in (f"--{k}", json.dumps(v))]
            return ["fit", "--config", str(QUICKSTART), *overrides, "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp / f"fit-{tag}-{lr}")]

        for lr in lrs:  # one CPU thread each: what a sweep worker with cpus_per_worker 1 gets
            wall, cpu = _run(fit_args(lr, "seq"), tmp, {"OMP_NUM_THREADS": "1"})
            fits.append(wall)
            fit_cpu.append(sum(cpu.values()))
            print(f"bptt fit lr={lr}: {wall:.1f} s, {fit_cpu[-1]:.1f} CPU s", flush=True)
        start = time.perf_counter()
        for first in range(0, len(lrs), concurrency):
            batch = [subprocess.Popen([BPTT, *fit_args(lr, "par")], cwd=tmp, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for lr in lrs[first : first + concurrency]]
            if any(p.wait() != 0 for p in batch):
                raise SystemExit("a concurrent bptt fit failed")
        parallel = time.perf_counter() - start
        print(f"bptt fit, {concurrency} processes at a time: {parallel:.1f} s", flush=True)
        sweep, sweep_cpu = _run(["sweep", "--config", str(_sweep_file(tmp, "overhead", lrs, steps, 1, concurrency)),
                                 "--storage-path", str(tmp / "results")], tmp)
        print(f"bptt sweep of {trials} trials, {concurrency} at a time: {sweep:.1f} s, "
              f"{sum(sweep_cpu.values()):.1f} CPU s", flush=True)
    ideal = sum(fits) / concurrency
    workers = sum(v for k, v in sweep_cpu.items() if k.startswith("ray::RayTrainWo"))
    return {"trials": trials, "concurrency": concurrency, "steps": steps, "fit_wall_s": fits,
            "sweep_wall_s": sweep, "ideal_wall_s": ideal, "overhead": sweep / ideal - 1,
            "concurrent_fits_wall_s": parallel, "overhead_vs_concurrent_fits": sweep / parallel - 1,
            "cpu_s": {"fits": sum(fit_cpu), "sweep": sum(sweep_cpu.values()), "sweep_train_workers": workers,
                      "sweep_everything_else": sum(sweep_cpu.values()) - workers,
                      "sweep_by_process": {k: round(v, 1) for k, v in sweep_cpu.items() if v >= 0.1}}}


def scaling(steps: int) -> dict:
    from mlflow.tracking import MlflowClient

    out = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            name = f"scaling{workers}"
            _run(["sweep", "--config", str(_sweep_file(tmp, name, [0.003], steps, workers, 1)),
                  "--storage-path", str(tmp / "results")], tmp)
            client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
            (trial,) = [r for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
                        if "bptt.trial_id" in r.data.tags]
            history = sorted((m.step, m.value) for m in client.get_metric_history(trial.info.run_id,
                                                                                   "train/tokens_per_sec"))
            values = [v for _, v in history[len(history) // 5 :]]
            out[f"{workers}_workers_tokens_per_sec"] = statistics.median(values)
            print(f"1 trial, {workers} worker(s): {out[f'{workers}_workers_tokens_per_sec']:,.0f} tokens/s", flush=True)
    out["speedup_2_over_1"] = out["2_workers_tokens_per_sec"] / out["1_workers_tokens_per_sec"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500, help="training steps per trial (1500: about a minute)")
    parser.add_argument("--skip-scaling", action="store_true", help="measure the overhead only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_overhead.json"))
    args = parser.parse_args()
    result = {
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d"),
        "overhead": overhead(args.trials, args.concurrency, args.steps),
    }
    if not args.skip_scaling:
        result["scaling"] = scaling(args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    o, cpu = result["overhead"], result["overhead"]["cpu_s"]
    print(f"sweep overhead: {o['overhead']:+.1%} ({o['sweep_wall_s']:.0f} s against {o['ideal_wall_s']:.0f} s), "
          f"{o['overhead_vs_concurrent_fits']:+.1%} against {o['concurrent_fits_wall_s']:.0f} s of concurrent fits; "
          f"CPU: {cpu['sweep']:.0f} s in the sweep ({cpu['sweep_train_workers']:.0f} s in its training workers) "
          f"against {cpu['fits']:.0f} s in the fits")
    if "scaling" in result:
        print(f"2 workers / 1 worker: {result['scaling']['speedup_2_over_1']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
