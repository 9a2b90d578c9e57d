"""Parallel in time: minGRU / minLSTM trained by a scan over each window against the same cores step by
step and against torch's LSTM, in tokens per second of forward + backward + SGD step.

Measured side by side in one process, rounds interleaved (every other round in reverse order), the
median step time over every round's steps after a warm-up step. Per window length T (batch 32):

  scan        the core's default evaluation: bptt.models.min_rnn.linear_scan (two levels, linear space)
  log_scan    the same parameters by Heinsen's log-space scan (logcumsumexp), the paper's choice
  sequential  the same parameters by a loop over the window's steps (the gates still one matmul)
  step        the core called once per time step with its carried state (T windows of 1, as
              generation and streaming inference run it): an RNN's step-by-step evaluation
  lstm        torch's nn.LSTM (oneDNN on a CPU, cuDNN on a GPU) at the same hidden size, and
  lstm_eq     torch's nn.LSTM whose hidden size gives the minGRU stack's parameter count
  newton      the diagonal GRU (bptt.models.DiagonalGRU, a nonlinear cell) by parallel Newton iterations,
              beside its sequential and step variants, with the iterations each layer took

The model is the core alone (input E = H, a squared-output loss), 2 layers of H = 256 by default.
Per variant and T it also records the activations the step saves for its backward (bytes of every
tensor autograd keeps: the window's memory, linear in T for a scan) and, on a CPU, the minor page
faults per step (fresh large allocations: glibc's malloc maps blocks over 32 MB afresh and unmaps
them on free, so a step touches them again; run with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
set to compare, see docs/parallel-in-time.md).

    python benchmarks/parallel_time.py [--rounds 2] [--windows 64 256 1024] [--accelerator gpu]
        [--cores MinGRU MinLSTM DiagonalGRU] [--out benchmarks/results/parallel_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bptt.hardware import hardware
from bptt.models import DiagonalGRU, MinGRU, MinLSTM

PROJECT = Path(__file__).resolve().parents[1]
# each core's evaluations, its parallel one first
EVALUATIONS = {"MinGRU": ("scan", "log_scan", "sequential"), "MinLSTM": ("scan", "log_scan", "sequential"),
               "DiagonalGRU": ("newton", "sequential")}
CLASSES = {"MinGRU": MinGRU, "MinLSTM": MinLSTM, "DiagonalGRU": DiagonalGRU}


class LSTMCore(nn.Module):
    """nn.LSTM with the cores' call: (y, state) from (x, state)."""

    def __init__(self, hidden_size: int, num_layers: int, input_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)

    def forward(self, x: torch.Tensor, state=None):
        return self.lstm(x, state)


def equal_parameter_lstm_width(params: int, layers: int, input_size: int) -> int:
    """The LSTM hidden size whose L-layer stack on ``input_size`` inputs has the closest parameter count."""
    def count(h: int) -> int:
        return 4 * h * (input_size + h + 2) + (layers - 1) * 4 * h * (2 * h + 2)
    return min(range(1, 4 * input_size), key=lambda h: abs(count(h) - params))


def stepwise(core: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The core one time step at a time, its state carried: T calls on windows of 1."""
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = core(x[:, t : t + 1], state)
        ys.append(y)
    return torch.cat(ys, dim=1)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def time_steps(runs: dict[str, Callable[[], None]], names: list[str], rounds: int, steps: int,
               sync: Callable[[], None]) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each variant's step times (seconds) and minor page faults per step: a warm-up step each, then ``rounds``
    rounds of ``steps`` timed steps per variant, every other round in reverse order."""
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    for name in names:  # warm-up: one step each
        runs[name]()
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(steps):
                sync()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                runs[name]()
                sync()
                times[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times, faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024],
                        help="T = 4096 too: run it in a process of its own per core (--windows 4096 --cores MinGRU); "
                             "with every core in one process it ran out of 24 GB")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--step-max-window", type=int, default=4096,
                        help="the step-by-step variant only up to this T (it is T core calls)")
    parser.add_argument("--cores", nargs="+", choices=list(EVALUATIONS), default=list(EVALUATIONS))
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/parallel_time.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    H, L = args.hidden, args.layers

    cores: dict[str, nn.Module] = {}
    classes = [CLASSES[name] for name in args.cores]
    for cls in classes:
        for evaluation in EVALUATIONS[cls.__name__]:
            cores[f"{cls.__name__}/{evaluation}"] = cls(input_size=H, hidden_size=H, num_layers=L,
                                                        evaluation=evaluation)
    min_gru_params = sum(p.numel() for p in MinGRU(input_size=H, hidden_size=H, num_layers=L).parameters())
    lstm_eq_width = equal_parameter_lstm_width(min_gru_params, L, H)
    cores["lstm"] = LSTMCore(H, L, H)
    cores["lstm_eq"] = LSTMCore(lstm_eq_width, L, H)
    params = {name: sum(p.numel() for p in core.parameters()) for name, core in cores.items()}
    for core in cores.values():
        core.to(device)
    variants = {name: core for name, core in cores.items()}
    variants |= {f"{cls.__name__}/step": cores[f"{cls.__name__}/sequential"] for cls in classes}
    optimizers = {name: torch.optim.SGD(core.parameters(), lr=1e-4) for name, core in cores.items()}

    results = []
    for T in args.windows:
        x = torch.randn(args.batch, T, H, device=device)
        names = [n for n in variants if not (n.endswith("/step") and T > args.step_max_window)]
        runs = {}
        for name in names:
            core = variants[name]
            base = name.replace("/step", "/sequential")
            forward = partial(stepwise, core, x) if name.endswith("/step") else (lambda core=core, x=x: core(x)[0])

            def step(forward=forward, optimizer=optimizers[base]) -> None:
                forward().float().pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            runs[name] = step
        times, faults = time_steps(runs, names, args.rounds, args.steps, sync)
        for name in names:
            core = variants[name]
            forward = partial(stepwise, core, x) if name.endswith("/step") else (lambda core=core, x=x: core(x)[0])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            saved = saved_bytes(forward)
            median = statistics.median(times[name])
            row = {"variant": name, "T": T, "batch": args.batch,
                   "hidden_size": lstm_eq_width if name == "lstm_eq" else H, "layers": L,
                   "parameters": params[name.replace("/step", "/sequential")],
                   "median_step_ms": round(1000 * median, 2), "tokens_per_sec": round(args.batch * T / median),
                   "saved_activation_mb": round(saved / 2**20, 1),
                   "minor_page_faults_per_step": int(statistics.median(faults[name]))}
            if device.type == "cuda":
                row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if name.endswith("/newton"):
                row["newton_iterations_per_layer"] = list(core.iterations)  # the latest step's
            results.append(row)
            print(json.dumps(row), flush=True)
        write(args, results, lstm_eq_width, min_gru_params)

    table(write(args, results, lstm_eq_width, min_gru_params))


def write(args: argparse.Namespace, results: list[dict], lstm_eq_width: int, min_gru_params: int) -> list[dict]:
    """The results so far and their ratios to ``--out`` (after every window length: a run stopped early keeps
    what it measured); returns the ratios."""
    def speed(variant: str, T: int) -> float | None:
        return next((r["tokens_per_sec"] for r in results if r["variant"] == variant and r["T"] == T), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    ratios = []
    for T in sorted({r["T"] for r in results}):
        for cls in args.cores:  # "scan": the core's parallel evaluation (Newton's for the diagonal GRU)
            scan = speed(f"{cls}/{EVALUATIONS[cls][0]}", T)
            ratios.append({
                "core": cls, "T": T,
                "scan_over_step": ratio(scan, speed(f"{cls}/step", T)),
                "scan_over_sequential": ratio(scan, speed(f"{cls}/sequential", T)),
                "scan_over_log_scan": ratio(scan, speed(f"{cls}/log_scan", T)),
                "scan_over_lstm_equal_width": ratio(scan, speed("lstm", T)),
                "scan_over_lstm_equal_parameters": ratio(scan, speed("lstm_eq", T)),
            })
    out = {"results": results, "ratios": ratios, "lstm_equal_parameter_width": lstm_eq_width,
           "min_gru_parameters": min_gru_params, "rounds": args.rounds, "steps": args.steps,
           "accelerator": args.accelerator, "date": time.strftime("%Y-%m-%d"),
           "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "hardware": hardware(malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return ratios


def table(ratios: list[dict]) -> None:
    """README's table: one row per core and window length."""
    print("| core | T | scan / step-by-step | scan / sequential | scan / log_scan | scan / LSTM equal width "
          "| scan / LSTM equal parameters |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in ratios:
        cells = ["-" if r[k] is None else f"{r[k]:.2f}" for k in ("scan_over_step", "scan_over_sequential",
                 "scan_over_log_scan", "scan_over_lstm_equal_width", "scan_over_lstm_equal_parameters")]
        print(f"| {r['core']} | {r['T']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
