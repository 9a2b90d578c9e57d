"""Throughput and memory of `bptt fit` against the bare kernel and a plain PyTorch TBPTT loop.

Measured side by side in one process, rounds interleaved (every other round in reverse
order). Throughput is tokens per step over the median step time after the warm-up (over every
round's steps): a median step is what the code costs, while a mean over a few steps also
carries whatever else this shared machine ran meanwhile.

  (a) bare kernel: the model's forward + loss + backward + SGD step on one preloaded window;
  (b) plain loop: pytorch/examples word_language_model's TBPTT loop (streams, carried and
      detached state, clip_grad_norm_, SGD, loss.item() per step);
  (c) `bptt fit`: bptt.training.run.fit on the same model, data, optimizer and clipping; also with
      ``data.windows_per_batch: 4`` (c_m4: four optimizer steps per Lightning batch), deciding skip
      and clip on the device (c_device: ``task.host_reads: logging_steps`` with fused SGD), and with
      ``trainer.precision: auto`` (measured afresh each round) beside fp32 and bf16-mixed.

Models (``--setups``), on the standard library's source code: 2 x 650 word LSTM (tied, dropout 0.5,
batch 20, bptt 35; vocabulary min count 3, about WikiText-2's 33k words), 2 x 512 char LSTM (batch 64,
bptt 128), the quick start's 1 x 256 char LSTM (embedding 64, batch 32, bptt 64) and pytorch/examples'
default word model (2 x 200, tied, dropout 0.2, batch 20, bptt 35, SGD lr 20, clip 0.25; min count 5,
about 18.6k words on Python 3.11's library). With ``--examples-main DIR`` (e) runs pytorch/examples'
own, unmodified ``main.py`` beside them on the same token stream. Then the peak memory of stream mode
on a corpus 1x, 10x and 100x as long: each size trains in a fresh process from the token cache.

    python benchmarks/throughput.py [--rounds 2] [--out benchmarks/results/throughput.json]
    python benchmarks/throughput.py --skip-memory --setups word_2x200 --examples-main ../examples/word_language_model
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

from bptt.config.parser import parse_config
from bptt.datamodules import TextStreamDataModule
from bptt.datamodules.streams import stream_layout
from bptt.hardware import hardware
from bptt.models import RNNLanguageModel
from bptt.training.precision import StepTimer
from bptt.training.run import fit

SETUPS = {
    "word_2x650": dict(level="word", min_count=3, embedding=650, hidden=650, layers=2, dropout=0.5, tie=True, batch=20,
                       bptt=35, lr=20.0, clip=0.25, warmup=5, steps=30),
    "char_2x512": dict(level="char", min_count=1, embedding=128, hidden=512, layers=2, dropout=0.0, tie=False, batch=64,
                       bptt=128, lr=1.0, clip=0.25, warmup=2, steps=20),
    # the quick start's size (conf/lm/quickstart.yaml): the host's share of a step is largest here
    "char_1x256": dict(level="char", min_count=1, embedding=64, hidden=256, layers=1, dropout=0.0, tie=False, batch=32,
                       bptt=64, lr=1.0, clip=1.0, warmup=10, steps=100),
    # pytorch/examples word_language_model's defaults (main.py --tied): 2 x 200 LSTM, dropout 0.2, batch 20, bptt 35,
    # SGD lr 20, clip 0.25; min count 5 gives the standard library a vocabulary of about 25k words
    "word_2x200": dict(level="word", min_count=5, embedding=200, hidden=200, layers=2, dropout=0.2, tie=True, batch=20,
                       bptt=35, lr=20.0, clip=0.25, warmup=10, steps=100),
}
STDLIB = "**/*.py"


DEVICE = torch.device("cpu")  # --accelerator gpu: cuda


def _model(setup: dict, vocab: int) -> RNNLanguageModel:
    torch.manual_seed(0)
    return RNNLanguageModel(vocab_size=vocab, embedding_size=setup["embedding"], hidden_size=setup["hidden"],
                            num_layers=setup["layers"], dropout=setup["dropout"], tie_weights=setup["tie"]).to(DEVICE)


def _autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _now() -> float:
    """The clock, once the GPU has finished what was queued."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def bare_kernel(setup: dict, data: TextStreamDataModule, precision: str) -> list[float]:
    """Seconds of each step after the warm-up."""
    model = _model(setup, data.vocab_size).train()
    opt = torch.optim.SGD(model.parameters(), lr=setup["lr"])
    streams = stream_layout(data.ids["train"], setup["batch"]).to(DEVICE)  # (B, L)
    x, y = streams[:, : setup["bptt"]].long(), streams[:, 1 : setup["bptt"] + 1].long()  # preloaded (B, T)
    times = []
    for _ in range(setup["warmup"] + setup["steps"]):
        start = _now()
        with _autocast(precision):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(_now() - start)
    return times[setup["warmup"] :]


def plain_loop(setup: dict, data: TextStreamDataModule, precision: str) -> list[float]:
    """Seconds of each step after the warm-up."""
    model = _model(setup, data.vocab_size).train()
    opt = torch.optim.SGD(model.parameters(), lr=setup["lr"])
    streams = stream_layout(data.ids["train"], setup["batch"]).to(DEVICE)  # (B, L)
    state, total_loss, bptt, times = None, 0.0, setup["bptt"], []
    for step in range(setup["warmup"] + setup["steps"]):
        start = _now()
        i = step * bptt
        x, y = streams[:, i : i + bptt].long(), streams[:, i + 1 : i + 1 + bptt].long()  # (B, T)
        state = None if state is None else tuple(s.detach() for s in state)
        with _autocast(precision):
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), setup["clip"])
        opt.step()
        total_loss += loss.item()
        times.append(_now() - start)
    return times[setup["warmup"] :]


def _fit_args(setup: dict, precision: str, root: str, max_steps: int) -> list[str]:
    return [
        "--model.class_path", "bptt.models.RNNLanguageModel",
        "--model.embedding_size", str(setup["embedding"]), "--model.hidden_size", str(setup["hidden"]),
        "--model.num_layers", str(setup["layers"]), "--model.dropout", str(setup["dropout"]),
        "--model.tie_weights", str(setup["tie"]),
        "--task.class_path", "bptt.lightning_modules.LanguageModelTask",
        "--task.optimizer.class_path", "torch.optim.SGD", "--task.optimizer.init_args.lr", str(setup["lr"]),
        "--task.grad_clip", str(setup["clip"]),
        "--data.class_path", "bptt.datamodules.TextStreamDataModule", "--data.corpus", "stdlib",
        "--data.stdlib_glob", STDLIB, "--data.level", setup["level"], "--data.min_count", str(setup["min_count"]),
        "--data.batch_size", str(setup["batch"]), "--data.bptt", str(setup["bptt"]),
        "--trainer.max_steps", str(max_steps), "--trainer.precision", precision,
        "--trainer.accelerator", "gpu" if DEVICE.type == "cuda" else "cpu",
        "--trainer.devices", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", root,
        "--tracking.tracking_uri", f"sqlite:///{root}/mlflow.db", "--tracking.log_model", "false",
    ]


CHOSEN: dict[str, list[str]] = {}  # setup name -> what trainer.precision: auto chose, each round


def bptt_fit(setup: dict, data: TextStreamDataModule, precision: str, windows_per_batch: int = 1,
             extra: tuple[str, ...] = ()) -> list[float]:
    """Seconds of each optimizer step after the warm-up; with ``windows_per_batch`` m a timed batch
    holds m optimizer steps, each counted as a batch's time / m. ``precision`` auto measures afresh
    each time (an empty cache; the measuring steps are not timed) and records its choice in ``CHOSEN``."""
    m = windows_per_batch
    timer = StepTimer("gpu" if DEVICE.type == "cuda" else "cpu")
    batches = -(-setup["warmup"] // m) + -(-setup["steps"] // m)
    with tempfile.TemporaryDirectory() as root:
        args = [*_fit_args(setup, precision, root, batches * m), "--data.windows_per_batch", str(m), *extra]
        with _environ(BPTT_CACHE_DIR=str(Path(root) / "cache")) if precision == "auto" else contextlib.nullcontext():
            fit(parse_config(args), callbacks=[timer])
        if precision == "auto":
            chosen = yaml.safe_load((Path(root) / "config.yaml").read_text())["trainer"]["precision"]
            CHOSEN.setdefault(setup["name"], []).append(chosen)
    return timer.step_times()[-(-setup["warmup"] // m) * m :]


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def bptt_fit_m4(setup: dict, data: TextStreamDataModule, precision: str) -> list[float]:
    """`bptt fit` with 4 windows (optimizer steps) per Lightning batch: Lightning's per-batch work paid once
    per 4 steps."""
    return bptt_fit(setup, data, precision, windows_per_batch=4)


def bptt_fit_device(setup: dict, data: TextStreamDataModule, precision: str) -> list[float]:
    """`bptt fit` deciding skip and clip on the device (``task.host_reads: logging_steps``, SGD with
    ``fused: true``): no host read between logging steps, the setting that keeps a GPU busy."""
    return bptt_fit(setup, data, precision, extra=("--task.host_reads", "logging_steps",
                                                   "--task.optimizer.init_args.fused", "true"))


EXAMPLES: Path | None = None  # --examples-main: pytorch/examples' word_language_model directory
LOG_INTERVAL = 10  # main.py's --log-interval: it prints the mean ms/batch of each 10 batches


def examples_main(setup: dict, data: TextStreamDataModule, precision: str) -> list[float]:
    """(e) pytorch/examples' own ``main.py``, unmodified, in a subprocess on the same token stream: the
    benchmark writes the first (warm-up + steps) windows of the training streams as words ``w<id>``
    (one line, so main.py's ``batchify`` lays out the same streams) and every id once in valid.txt, so
    its vocabulary, and with it the softmax, has the same size. Returns the mean seconds per batch of
    each 10-batch interval main.py prints (the first, which holds the warm-up, left out), each counted
    for its 10 batches."""
    assert precision == "32-true", "main.py trains in fp32 only"
    n = (setup["warmup"] + setup["steps"]) // LOG_INTERVAL * LOG_INTERVAL + 1  # batches: prints at 10, 20, ..
    ids = stream_layout(data.ids["train"], setup["batch"])[:, : n * setup["bptt"] + 1]  # (B, L): the streams (b) reads
    with tempfile.TemporaryDirectory() as root:
        corpus = Path(root) / "corpus"
        corpus.mkdir()
        (corpus / "train.txt").write_text(" ".join(f"w{i}" for i in ids.flatten().tolist()) + "\n")
        everything = " ".join(f"w{i}" for i in range(data.vocab_size)) + "\n"
        (corpus / "valid.txt").write_text(everything)
        (corpus / "test.txt").write_text(everything)
        args = ["--data", str(corpus), "--emsize", str(setup["embedding"]), "--nhid", str(setup["hidden"]),
                "--nlayers", str(setup["layers"]), "--dropout", str(setup["dropout"]), "--lr", str(setup["lr"]),
                "--clip", str(setup["clip"]), "--batch_size", str(setup["batch"]), "--bptt", str(setup["bptt"]),
                "--epochs", "1", "--log-interval", str(LOG_INTERVAL), "--save", str(Path(root) / "model.pt"),
                *(["--tied"] if setup["tie"] else []), *(["--accel"] if DEVICE.type == "cuda" else [])]
        out = subprocess.run([sys.executable, "main.py", *args], cwd=EXAMPLES, check=True, capture_output=True,
                             text=True).stdout
    per_batch = [float(line.split("ms/batch")[1].split("|")[0]) / 1000
                 for line in out.splitlines() if "ms/batch" in line]
    assert len(per_batch) == n // LOG_INTERVAL, out[-2000:]
    return [t for t in per_batch[1:] for _ in range(LOG_INTERVAL)]


VARIANTS = {
    "a_bare_fp32": (bare_kernel, "32-true"),
    "b_plain_fp32": (plain_loop, "32-true"),
    "c_bptt_fp32": (bptt_fit, "32-true"),
    "c_bptt_m4_fp32": (bptt_fit_m4, "32-true"),
    "c_bptt_device_fp32": (bptt_fit_device, "32-true"),
    "a_bare_bf16": (bare_kernel, "bf16-mixed"),
    "c_bptt_bf16": (bptt_fit, "bf16-mixed"),
    "c_bptt_auto": (bptt_fit, "auto"),
}


def throughput(rounds: int, names: list[str]) -> dict:
    results = {}
    for name in names:
        setup = {**SETUPS[name], "name": name}
        data = TextStreamDataModule(corpus="stdlib", stdlib_glob=STDLIB, level=setup["level"],
                                    min_count=setup["min_count"], batch_size=setup["batch"], bptt=setup["bptt"])
        data.load()
        tokens = setup["batch"] * setup["bptt"]
        variants = {**VARIANTS, **({"e_examples_main_fp32": (examples_main, "32-true")} if EXAMPLES else {})}
        steps: dict[str, list[float]] = {v: [] for v in variants}  # seconds per step, every round
        runs: dict[str, list[float]] = {v: [] for v in variants}  # tokens/s of each round's median step
        for round_ in range(rounds):
            order = list(variants.items())
            for variant, (measure, precision) in order if round_ % 2 == 0 else order[::-1]:  # no position favoured
                times = measure(setup, data, precision)
                steps[variant] += times
                runs[variant].append(tokens / statistics.median(times))
                print(f"{name} {variant}: {runs[variant][-1]:,.0f} tokens/s", flush=True)
        med = {v: tokens / statistics.median(t) for v, t in steps.items()}
        results[name] = {
            "vocab_size": data.vocab_size, "tokens_per_sec": med, "runs": runs,
            "steps_timed": {v: len(t) for v, t in steps.items()},
            "c_over_a": med["c_bptt_fp32"] / med["a_bare_fp32"],
            "c_over_b": med["c_bptt_fp32"] / med["b_plain_fp32"],
            "c_m4_over_b": med["c_bptt_m4_fp32"] / med["b_plain_fp32"],
            "c_device_over_b": med["c_bptt_device_fp32"] / med["b_plain_fp32"],
            "c_bf16_over_b_fp32": med["c_bptt_bf16"] / med["b_plain_fp32"],
            "bare_bf16_over_bare_fp32": med["a_bare_bf16"] / med["a_bare_fp32"],
            "c_bf16_over_c_fp32": med["c_bptt_bf16"] / med["c_bptt_fp32"],
            # trainer.precision: auto against the faster of the two precisions it chooses between
            "auto_chose": CHOSEN.get(name, []),
            "auto_over_best": med["c_bptt_auto"] / max(med["c_bptt_fp32"], med["c_bptt_bf16"]),
        }
        if EXAMPLES:  # main.py prints means of 10 batches, not steps: compared by the mean step, all three
            b, c, e = (tokens / statistics.fmean(steps[v])
                       for v in ("b_plain_fp32", "c_bptt_fp32", "e_examples_main_fp32"))
            results[name].update(tokens_per_sec_mean={"b_plain_fp32": b, "c_bptt_fp32": c, "e_examples_main_fp32": e},
                                 c_over_e_mean=c / e, b_over_e_mean=b / e, c_over_b_mean=c / b)
    return results


# ---- memory -----------------------------------------------------------------------------------
def _rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class AnonPeak(pl.Callback):
    """The largest anonymous (process-owned, not page-cache) resident memory seen after each step."""

    def __init__(self) -> None:
        self.peak_kb = 0

    def on_train_batch_end(self, *args) -> None:
        self.peak_kb = max(self.peak_kb, _rss_anon_kb())


def memory_probe(corpus: Path, steps: int) -> dict:
    """Train the quickstart model for ``steps`` windows on ``corpus`` (run in a fresh process)."""
    peak = AnonPeak()
    with tempfile.TemporaryDirectory() as root:
        args = ["--config", str(Path(__file__).parents[1] / "conf/lm/quickstart.yaml"), "--data.corpus", corpus.name,
                "--data.data_dir", str(corpus.parent), "--trainer.max_steps", str(steps),
                "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", root, "--tracking.tracking_uri", f"sqlite:///{root}/mlflow.db",
                "--tracking.log_model", "false"]
        fit(parse_config(args), callbacks=[peak])
    return {"peak_rss_anon_mb": peak.peak_kb / 1024}


def memory(multiples: tuple[int, ...], base_chars: int, steps: int) -> dict:
    from bptt.datamodules.text_corpus import stdlib_text

    base = stdlib_text("*.py")[0][:base_chars]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in multiples:
            corpus = Path(tmp) / f"corpus_{k}x.txt"
            corpus.write_text(base * k)
            env = {**os.environ, "BPTT_CACHE_DIR": str(Path(tmp) / "cache")}
            probe = [sys.executable, __file__, "--memory-probe", str(corpus), "--probe-steps", str(steps)]
            subprocess.run([*probe, "--prepare-only"], check=True, env=env, capture_output=True)  # tokenize, cache
            result = subprocess.run(probe, check=True, env=env, capture_output=True, text=True)
            out[f"{k}x"] = {"chars": len(base) * k, **json.loads(result.stdout.strip().splitlines()[-1])}
            print(f"memory {k}x ({len(base) * k:,} chars): {out[f'{k}x']['peak_rss_anon_mb']:.0f} MB", flush=True)
    first = out[f"{multiples[0]}x"]["peak_rss_anon_mb"]
    return {"corpora": out, "max_over_1x": max(v["peak_rss_anon_mb"] for v in out.values()) / first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: every variant on CUDA (the memory part is CPU-only: use --skip-memory)")
    parser.add_argument("--steps", type=int, help="timed steps per measure (default: 30 word, 20 char)")
    parser.add_argument("--examples-main", type=Path, metavar="DIR",
                        help="pytorch/examples' word_language_model directory (a checkout's): its main.py runs beside "
                             "the other variants (e)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE, EXAMPLES
    DEVICE = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    if args.examples_main is not None:
        if not (args.examples_main / "main.py").is_file():
            parser.error(f"--examples-main {args.examples_main}: no main.py there; give pytorch/examples' "
                         "word_language_model directory")
        EXAMPLES = args.examples_main.resolve()
    if args.steps is not None:
        for setup in SETUPS.values():
            setup["steps"] = args.steps
    if args.memory_probe:
        corpus = Path(args.memory_probe)
        if args.prepare_only:
            TextStreamDataModule(corpus=corpus.name, data_dir=str(corpus.parent), batch_size=32, bptt=64).load()
        else:
            print(json.dumps(memory_probe(corpus, args.probe_steps)))
        return
    result = {
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if EXAMPLES:
        main_py = (EXAMPLES / "main.py").read_bytes()
        result["examples_main"] = {"dir": str(EXAMPLES), "main_py_sha256": hashlib.sha256(main_py).hexdigest()}
    if not args.skip_throughput:
        result["throughput"] = throughput(args.rounds, args.setups)
    if not args.skip_memory:
        result["memory"] = memory((1, 10, 100), base_chars=200_000, steps=30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary(result)


def summary(result: dict) -> None:
    """The ratios of ``result`` in a few lines."""
    for name, r in result.get("throughput", {}).items():
        print(f"{name}: c/a {r['c_over_a']:.3f}  c/b {r['c_over_b']:.3f}  c_m4/b {r['c_m4_over_b']:.3f}  "
              f"c_device/b {r['c_device_over_b']:.3f}  auto/best {r['auto_over_best']:.3f} ({r['auto_chose']})  "
              f"c_bf16/b_fp32 {r['c_bf16_over_b_fp32']:.3f}")
        if "c_over_e_mean" in r:
            print(f"{name}, mean steps: c/e {r['c_over_e_mean']:.3f}  b/e {r['b_over_e_mean']:.3f}  "
                  f"c/b {r['c_over_b_mean']:.3f}")
    if "memory" in result:
        print(f"memory: max peak / 1x peak = {result['memory']['max_over_1x']:.3f}")


if __name__ == "__main__":
    main()
