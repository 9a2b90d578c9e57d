"""``trainer.precision: auto``: the precision this machine trains the run's own model fastest in, measured.

bf16 autocast is not faster everywhere: on one AMD EPYC it trains the char LSTM 1.85x faster than
fp32, on an Intel Xeon with AVX-512 BF16 slower. So ``auto`` times a few optimizer steps of the
run's own task, DataModule and batch shape in each precision the device supports (rounds
interleaved, the median step compared) and trains in the fastest::

    candidates:  CPU  32-true, bf16-mixed        GPU  32-true, bf16-mixed (if supported), 16-mixed

The choice and the measured steps per second are cached per device model, software and run shape
(``$BPTT_CACHE_DIR/precision.json``), so a second run of the same shape on the same kind of machine
does not measure again. The run records the precision it chose in its config (``config.yaml``, the
checkpoints, MLflow's ``trainer.precision``): a resume trains on in that precision, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy

from bptt.datamodules.sources import default_cache_dir
from bptt.errors import ConfigError
from bptt.hardware import device_model

AUTO = "auto"
# the choice of the process that measured, for the DDP processes Lightning starts from the same command
CHOSEN_ENV = "BPTT_AUTO_PRECISION_CHOSEN"
WARMUP_STEPS = 2  # per round: the first steps of a Trainer pay for allocation and autocast's caches
TIMED_STEPS = 6  # per round
ROUNDS = 2  # every other round in reverse order: no precision favoured by its position


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` chose and why.

    Attributes:
        precision: the Lightning precision the run trains in.
        steps_per_sec: optimizer steps per second of each candidate (median step), as measured.
        device: the device model the measurement ran on.
        cached: taken from an earlier measurement of the same shape on the same kind of device.
    """

    precision: str
    steps_per_sec: dict[str, float]
    device: str
    cached: bool = False

    def summary(self) -> str:
        if not self.steps_per_sec:
            return f"trainer.precision: auto chose {self.precision} on {self.device}"
        speeds = ", ".join(f"{p} {s:.2f}" for p, s in self.steps_per_sec.items())
        how = "cached measurement" if self.cached else "measured"
        return f"trainer.precision: auto chose {self.precision} on {self.device} ({how}, steps/s: {speeds})"


def candidates(accelerator: str) -> list[str]:
    """The precisions worth timing on this device: fp32 and the mixed precisions it supports."""
    if accelerator == "gpu":
        return ["32-true", *(["bf16-mixed"] if torch.cuda.is_bf16_supported() else []), "16-mixed"]
    return ["32-true", "bf16-mixed"]


def resolve(
    accelerator: str,
    shape: dict[str, Any],
    build: Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]],
    agree: Callable[[Callable[[], str]], str] | None = None,
) -> PrecisionChoice:
    """The precision for a run of ``shape`` on ``accelerator``: the one that a DDP parent chose
    (``CHOSEN_ENV``), else a cached measurement, else a new one of the task ``build`` returns.

    Args:
        accelerator: ``cpu`` or ``gpu``.
        shape: what the speed depends on besides the device (model, task and data settings); the cache key.
        build: makes a fresh task and DataModule to time (each trained for a few steps, then thrown away).
        agree: under Ray Train, makes every worker use rank 0's choice (``broadcast_from_rank_zero``).
    """
    inherited = os.environ.get(CHOSEN_ENV)
    if inherited:
        saved = json.loads(inherited)
        return PrecisionChoice(**{**saved, "cached": True})
    if agree is None:
        return _measured_or_cached(accelerator, shape, build)
    answer = agree(lambda: json.dumps(asdict(_measured_or_cached(accelerator, shape, build))))
    return PrecisionChoice(**json.loads(answer))


@contextmanager
def handed_to_child_processes(choice: PrecisionChoice) -> Iterator[None]:
    """While the run trains: the choice in the environment Lightning's DDP processes inherit."""
    os.environ[CHOSEN_ENV] = json.dumps(asdict(choice))
    try:
        yield
    finally:
        os.environ.pop(CHOSEN_ENV, None)


def _measured_or_cached(
    accelerator: str, shape: dict[str, Any], build: Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]]
) -> PrecisionChoice:
    device = device_model(accelerator)
    options = candidates(accelerator)
    key = hashlib.sha256(json.dumps([device, torch.__version__, torch.get_num_threads(), options, shape],
                                    sort_keys=True, default=str).encode()).hexdigest()[:20]
    cache = default_cache_dir() / "precision.json"
    known = _read(cache)
    if key in known:
        return PrecisionChoice(known[key]["precision"], known[key]["steps_per_sec"], device, cached=True)
    speeds = measure(accelerator, options, build)
    choice = PrecisionChoice(max(speeds, key=speeds.__getitem__), speeds, device)
    known[key] = {"precision": choice.precision, "steps_per_sec": speeds, "device": device,
                  "date": time.strftime("%Y-%m-%d")}
    _write(cache, known)
    return choice


def measure(
    accelerator: str, options: list[str], build: Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]]
) -> dict[str, float]:
    """Optimizer steps per second of each precision in ``options``: the median step of ``ROUNDS``
    interleaved rounds of ``TIMED_STEPS`` steps, each after ``WARMUP_STEPS``, on one device."""
    times: dict[str, list[float]] = {p: [] for p in options}
    for round_ in range(ROUNDS):
        for precision in options if round_ % 2 == 0 else options[::-1]:
            task, data = build()  # fresh: no state carried over from another precision
            timer = StepTimer(accelerator)
            device = torch.device("cuda", 0) if accelerator == "gpu" else torch.device("cpu")
            with _quiet_lightning():
                trainer = pl.Trainer(
                    accelerator=accelerator, strategy=SingleDeviceStrategy(device), precision=precision,
                    max_steps=WARMUP_STEPS + TIMED_STEPS, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[timer], use_distributed_sampler=False,
                )
                trainer.fit(task, datamodule=data)
            times[precision] += timer.step_times()[WARMUP_STEPS:]
    return {p: 1.0 / statistics.median(t) for p, t in times.items()}


class StepTimer(pl.Callback):
    """Seconds from one training batch's start to the next one's (the whole step, the host's share
    included), the device synchronized at each mark; a batch of m windows counts as m steps."""

    def __init__(self, accelerator: str) -> None:
        self.gpu = accelerator == "gpu"
        self.marks: list[tuple[float, int]] = []

    def _mark(self, trainer: pl.Trainer) -> None:
        if self.gpu:
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), trainer.global_step))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._mark(trainer)

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._mark(trainer)

    def step_times(self) -> list[float]:
        out = []
        for (t0, s0), (t1, s1) in zip(self.marks, self.marks[1:]):
            out += [(t1 - t0) / max(s1 - s0, 1)] * max(s1 - s0, 1)
        return out


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """The timing Trainers' start-up lines ("GPU available: ...", tips) are not the run's."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("pytorch_lightning", "lightning",
                                                                                "lightning_fabric")]
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _read(path: Path) -> dict[str, Any]:
    try:
        known = json.loads(path.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _write(path: Path, known: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        partial.replace(path)  # atomic: a concurrent run reads the old cache or the new one
    except OSError:
        pass  # an unwritable cache only costs the next run a measurement


def choose(cfg: Any, parser: Any, checkpoint: dict[str, Any] | None, launch: Any) -> tuple[Any, PrecisionChoice]:
    """``cfg`` (a parsed run config) with ``trainer.precision: auto`` replaced by a precision, and the choice:
    a resumed run's own (its checkpoint's config), else the fastest measured on the run's task and data.

    Args:
        cfg: the run config.
        parser: its parser (``bptt.config.parser.build_parser``).
        checkpoint: the loaded checkpoint of a resumed run.
        launch: a ``bptt.training.trainer.Launch`` when Ray Train started the processes (its accelerator,
            and rank 0's answer for every rank), else None.

    Raises:
        ConfigError: an accelerator other than cpu or gpu.
    """
    import yaml

    from bptt.config.parser import instantiate
    from bptt.training.trainer import trainer_node

    cfg = cfg.clone()
    saved = yaml.safe_load(checkpoint["bptt"]["config"])["trainer"].get("precision") if checkpoint else None
    if saved not in (None, AUTO):
        cfg.trainer.precision = saved
        return cfg, PrecisionChoice(str(saved), {}, "the checkpoint's run", cached=True)
    accelerator = (launch.placement if launch else {}).get("accelerator") or str(cfg.trainer.accelerator)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator not in ("cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.precision: auto measures on cpu or gpu, not trainer.accelerator={accelerator}; "
                          "set trainer.precision")
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    shape = {k: v for k, v in yaml.safe_load(parser.dump(cfg)).items() if k in ("model", "task", "data")}

    def build() -> tuple[pl.LightningModule, pl.LightningDataModule]:
        probe = instantiate(cfg, parser)
        probe.data.prepare_data()
        trainer_node(probe)  # a batch of m windows: the task's k1, as the run will have it
        return probe.task, probe.data

    choice = resolve(accelerator, shape, build, launch.agree if launch else None)
    cfg.trainer.precision = choice.precision
    return cfg, choice
