"""Under DDP every logged training metric is the global one: two gloo processes, each on half of
the streams, log what one process logs on all of them, although the two halves' own losses differ."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pytorch_lightning.loggers import Logger

from bptt.lightning_modules import CTCSpeechTask, LanguageModelTask
from bptt.lightning_modules.tbptt import engine
from bptt.metric_names import TRAIN_LOSS
from bptt.models import RNNAcousticModel
from tests.engine_harness import run, sgd, stream_batches, tiny_model

ENGINE_METRICS = (TRAIN_LOSS, "train/grad_norm", "train/clip_fraction", "train/skipped_steps", "train/tokens_per_sec")


class MetricsFile(Logger):
    """Appends what this process logs to ``<directory>/rank<r>.jsonl``: the way out of a ddp_spawn child."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    @property
    def name(self) -> str:
        return "metrics-file"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(self.directory / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class LocalLoss:
    """Mixin: also log ``local/loss``, this process's own mean loss over the batch; and read a
    throughput clock that advances one second per reading, so that ``train/tokens_per_sec`` is the
    targets per logged step."""

    def on_train_start(self) -> None:
        engine.time = SimpleNamespace(perf_counter=itertools.count(0.0).__next__)  # type: ignore[assignment]
        self.local = [0.0, 0.0]
        super().on_train_start()

    def record(self, losses: torch.Tensor, counts: torch.Tensor) -> None:
        self.local[0] += losses.sum().item()
        self.local[1] += counts.sum().item()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.log("local/loss", self.local[0] / self.local[1], on_step=True, on_epoch=False)
        self.local = [0.0, 0.0]


class LocalLossLM(LocalLoss, LanguageModelTask):
    def window_step(self, window, state):
        losses, state = super().window_step(window, state)
        self.record(losses * window["mask"], window["mask"])
        return losses, state


class LocalLossCTC(LocalLoss, CTCSpeechTask):
    def sequence_losses(self, outputs, batch):
        losses, counts = super().sequence_losses(outputs, batch)
        if self.training:
            self.record(losses, counts)
        return losses, counts


def _lm_case() -> tuple[LocalLoss, list[dict[str, torch.Tensor]], list[int]]:
    """Stream mode, 4 streams, 2 batches of 4 steps, k1 = 2: two optimizer steps per batch; masked."""
    tokens = torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(1))
    batches = stream_batches(tokens, 4)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[0, :3] = False  # rank 0 (streams 0-1) has fewer targets than rank 1 (streams 2-3)
    for i, batch in enumerate(batches):
        batch["mask"] = mask[:, 4 * i : 4 * i + 4]
    task = LocalLossLM(model=tiny_model(), optimizer=sgd(0.5), k1=2, grad_clip=0.62)
    return task, batches, [int(b["mask"].sum()) for b in batches]


def _ctc_case() -> tuple[LocalLoss, list[dict[str, torch.Tensor]], list[int]]:
    """Split mode, 2 batches of 4 utterances run in windows of 4 frames; more labels on rank 1."""
    gen = torch.Generator().manual_seed(5)
    lengths, label_counts = torch.tensor([11, 8, 12, 9]), torch.tensor([2, 1, 3, 3])
    batches = []
    for _ in range(2):
        inputs = torch.randn(4, 12, 3, generator=gen, dtype=torch.float64)
        inputs[torch.arange(12) >= lengths[:, None]] = 0.0  # (B, T, F) zero-padded
        targets = torch.randint(1, 5, (4, 3), generator=gen) * (torch.arange(3) < label_counts[:, None])
        batches.append({"inputs": inputs, "input_lengths": lengths, "targets": targets, "target_lengths": label_counts})
    torch.manual_seed(0)
    model = RNNAcousticModel(vocab_size=5, num_features=3, hidden_size=5, num_layers=1, subsample=2)
    task = LocalLossCTC(model=model, optimizer=sgd(0.5), k1=4, backprop="exact", grad_clip=0.52)
    return task, batches, [int(label_counts.sum())] * 2


def _logged(directory: Path, rank: int) -> dict[int, dict[str, float]]:
    lines = (directory / f"rank{rank}.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


@pytest.mark.parametrize("case", [_lm_case, _ctc_case], ids=["per-step", "per-sequence"])
def test_two_ddp_processes_log_the_global_training_metrics(case, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "time", time)  # the parent's run swaps in a fake clock: put it back
    logged = {}
    for devices in (1, 2):
        task, batches, counts = case()
        (tmp_path / str(devices)).mkdir()
        run(task, batches, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
            logger=MetricsFile(tmp_path / str(devices)))
        logged[devices] = [_logged(tmp_path / str(devices), rank) for rank in range(devices)]

    one = logged[1][0]
    # the x-axis counts optimizer steps: 2 per batch of the language model (k1 = 2), the last one's index
    steps = [1, 3] if case is _lm_case else [0, 1]
    assert sorted(one) == steps
    assert set(ENGINE_METRICS) <= set(one[steps[1]])
    assert [one[s]["train/tokens_per_sec"] for s in steps] == [float(c) for c in counts]  # global targets
    assert 0 < one[steps[1]]["train/clip_fraction"] < 1  # some steps clipped, not all
    for step in one:  # a batch's loss: its windows' loss sums over their target counts (local/loss is float32)
        assert one[step][TRAIN_LOSS] == pytest.approx(one[step]["local/loss"], rel=1e-6)
    for rank, two in enumerate(logged[2]):
        assert sorted(two) == sorted(one), f"rank {rank}"
        for step in one:
            for name in (n for n in one[step] if n.startswith("train/")):
                assert two[step][name] == pytest.approx(one[step][name], rel=1e-9, abs=1e-12), (rank, step, name)
            # each rank's own loss, which rank 0 logged as train/loss before, is off by far more than that
            assert abs(two[step]["local/loss"] - one[step][TRAIN_LOSS]) > 1e-3, (rank, step)
