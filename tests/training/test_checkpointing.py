"""Checkpoints carry a checksum that every load verifies; ``bptt resume DIR`` falls back past
damaged files to the newest intact one; ``last.ckpt`` holds the state training ended in, and a
finished run resumed with more steps continues as an uninterrupted run; partial files of killed
writes go away, but never a live writer's."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import bptt.training.checkpointing as checkpointing
from bptt.cli import main
from bptt.config.parser import parse_config
from bptt.errors import CheckpointError
from bptt.training.checkpointing import (
    CHECKSUM_KEY,
    AtomicCheckpointIO,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_partials,
)
from bptt.training.run import fit, resume
from tests.bptt_command import SMALL

# validation at step 6 only, step checkpoints at 4 and 8: training ends at 10, between validations and long
# before the epoch's end, which would halve the learning rate
SHORT = [*SMALL, "--trainer.max_steps", "10", "--checkpoint.every_n_steps", "4", "--checkpoint.keep_last", "3",
         "--task.lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR", "--task.lr_scheduler.init_args.step_size",
         "1", "--task.lr_scheduler.init_args.gamma", "0.5", "--task.lr_scheduler_interval", "epoch"]


def _fit(root: Path, *overrides: str, callbacks: list[pl.Callback] | None = None) -> Path:
    """``bptt fit`` of SHORT in this process (no interpreter start-up); returns the checkpoint directory."""
    tracking = ["--tracking.tracking_uri", f"sqlite:///{root.parent}/mlflow.db"]
    fit(parse_config([*SHORT, *tracking, "--trainer.default_root_dir", str(root), *overrides]), callbacks=callbacks)
    return root / "checkpoints"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The checkpoint directory of a SHORT run."""
    return _fit(tmp_path_factory.mktemp("finished") / "run")


def _flip_64_bytes(path: Path, tensor: torch.Tensor) -> None:
    """Invert 64 bytes in the middle of ``tensor``'s bytes inside the checkpoint file."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    start = data.find(raw)
    assert start > 0 and data.find(raw, start + 1) == -1, "the tensor's bytes are not in the file exactly once"
    middle = start + len(raw) // 2 - 32
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _weight(checkpoint: dict) -> torch.Tensor:
    return checkpoint["state_dict"]["model.rnn.weight_ih_l0"]  # (4H, E) = (128, 64)


def _adam_second_moment(checkpoint: dict) -> torch.Tensor:
    return checkpoint["optimizer_states"][0]["state"][1]["exp_avg_sq"]  # of weight_ih_l0


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_between_validations(finished):
    steps = {p.name: torch.load(p, weights_only=True)["global_step"] for p in finished.glob("*.ckpt")}
    assert steps == {"step-0000004.ckpt": 4, "step-0000008.ckpt": 8, "best.ckpt": 6, "last.ckpt": 10}
    assert not list(finished.glob(".*.partial"))


@pytest.mark.slow
@pytest.mark.parametrize("where", [_weight, _adam_second_moment], ids=["weights", "adam_state"])
def test_64_flipped_bytes_are_refused_in_one_line(finished, where, tmp_path, capsys):
    damaged = tmp_path / "last.ckpt"
    shutil.copy(finished / "last.ckpt", damaged)
    _flip_64_bytes(damaged, where(torch.load(damaged, weights_only=True)))
    torch.load(damaged, weights_only=True)  # torch itself reads the damaged file without a complaint

    with pytest.raises(CheckpointError, match=r"is corrupt \(checksum mismatch\)") as refused:
        load_checkpoint(damaged)
    assert str(damaged) in str(refused.value) and "\n" not in str(refused.value)
    for command in (["test", str(damaged)], ["resume", str(damaged)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"bptt: error: {refused.value}", command


BIAS = "model.decoder.bias"


@pytest.mark.slow
def test_every_part_of_a_checkpoint_is_covered(finished, tmp_path):
    """Any change to a tensor or value that decides the next step breaks the checksum, also one
    that keeps the bytes (dtype, shape) or that the file format would hide (dict order)."""
    changes = {
        "weight": lambda c: c["state_dict"][BIAS].__setitem__(3, 0.5),
        "adam step": lambda c: c["optimizer_states"][0]["state"][0]["step"].add_(1),
        "learning rate": lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=0.004),
        "carried state": lambda c: c["tbptt"]["train_state"][1].mul_(-1),
        "torch rng": lambda c: c["bptt"]["rng"]["torch"].__setitem__(100, 7),
        "python rng": lambda c: c["bptt"]["rng"]["python"]["state"].__setitem__(5, 1),
        "data position": lambda c: c["TextStreamDataModule"].update(window=9),
        "config": lambda c: c["bptt"].update(config=c["bptt"]["config"].replace("hidden_size: 32", "hidden_size: 33")),
        "global step": lambda c: c.update(global_step=11),
        "loop progress": lambda c: c["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"].update(ready=9),
        "dtype": lambda c: c["state_dict"].update({BIAS: c["state_dict"][BIAS].double()}),  # same values
        "shape": lambda c: c["state_dict"].update({BIAS: c["state_dict"][BIAS][None]}),  # same bytes
        "key order": lambda c: c["state_dict"].move_to_end("model.embedding.weight"),
    }
    original = load_checkpoint(finished / "last.ckpt")
    assert "hidden_size: 32" in original["bptt"]["config"]
    for name, change in changes.items():
        checkpoint = torch.load(finished / "last.ckpt", weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, tmp_path / "changed.ckpt")  # the old checksum stays inside
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_checkpoint(tmp_path / "changed.ckpt")
            pytest.fail(f"a change of the {name} went unnoticed")


@pytest.mark.slow
def test_latest_checkpoint_falls_back_to_the_newest_intact_one(finished, tmp_path, caplog, monkeypatch):
    directory = tmp_path / "checkpoints"
    shutil.copytree(finished, directory)
    verified, problem = [], checkpointing._checksum_problem

    def spy(checkpoint: dict) -> str | None:
        verified.append(checkpoint["global_step"])
        return problem(checkpoint)

    monkeypatch.setattr(checkpointing, "_checksum_problem", spy)

    assert latest_checkpoint(directory) == directory / "last.ckpt"
    assert verified == [10]  # older files are not read whole

    _flip_64_bytes(directory / "last.ckpt", _weight(torch.load(directory / "last.ckpt", weights_only=True)))
    (directory / "step-0000008.ckpt").write_bytes((directory / "step-0000008.ckpt").read_bytes()[:5000])
    verified.clear()
    with caplog.at_level(logging.WARNING, logger="bptt.training.checkpointing"):
        assert latest_checkpoint(directory) == directory / "best.ckpt"  # step 6; step-0000004.ckpt is older
    assert verified == [10, 6]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert f"skipping checkpoint {directory / 'step-0000008.ckpt'}: it cannot be read (" in warnings[0], warnings
    assert warnings[1] == (f"skipping checkpoint {directory / 'last.ckpt'}: it is corrupt (checksum mismatch): it was "
                           "damaged after writing"), warnings

    for path in directory.glob("*.ckpt"):
        path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        latest_checkpoint(directory)


@pytest.mark.slow
def test_a_checkpoint_from_before_checksums_loads(finished, tmp_path):
    checkpoint = torch.load(finished / "last.ckpt", weights_only=True)
    del checkpoint[CHECKSUM_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert loaded["global_step"] == 10 and CHECKSUM_KEY not in loaded
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "old.ckpt")["global_step"] == 10  # Lightning's way in
    assert latest_checkpoint(tmp_path) == tmp_path / "old.ckpt"


@pytest.mark.slow
def test_a_finished_run_resumed_with_more_steps_continues_as_one_run(finished, tmp_path):
    """last.ckpt of a run that ended at step 10 (between validations at 6 and 12), resumed to
    step 14, ends bit for bit where a 14-step run ends: same batches, same validation at 12, same
    epoch and learning rate (a checkpoint taken after Lightning closed the epoch, in on_train_end,
    would resume in a new epoch with the learning rate halved)."""
    straight = _fit(tmp_path / "straight", "--trainer.max_steps", "14")
    resume(str(finished / "last.ckpt"), ["--trainer.max_steps", "14", "--trainer.default_root_dir",
                                         str(tmp_path / "resumed")])  # into the same MLflow run
    expected = torch.load(straight / "last.ckpt", weights_only=True)
    found = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert found["global_step"] == expected["global_step"] == 14
    assert found["epoch"] == expected["epoch"] == 0
    assert found["lr_schedulers"] == expected["lr_schedulers"]
    assert found["TextStreamDataModule"] == expected["TextStreamDataModule"]
    for name, value in expected["state_dict"].items():
        assert torch.equal(found["state_dict"][name], value), name
    for a, b in zip(found["optimizer_states"][0]["state"].values(), expected["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert torch.load(tmp_path / "resumed/checkpoints/best.ckpt", weights_only=True)["global_step"] == 12


class _LastCheckpointStep(pl.Callback):
    """Records the step that ``last.ckpt`` holds when each training batch starts."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.seen = directory, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = self.directory / "last.ckpt"
        self.seen[trainer.global_step] = torch.load(last, weights_only=True)["global_step"] if last.exists() else None


@pytest.mark.slow
def test_last_checkpoint_follows_every_validation_not_only_improvements(tmp_path):
    """With a learning rate of 0 the validation at 12 does not improve on the one at 6; last.ckpt
    still holds step 12 after it (Lightning's own save_last would keep step 6)."""
    probe = _LastCheckpointStep(tmp_path / "run/checkpoints")
    directory = _fit(tmp_path / "run", "--trainer.max_steps", "13", "--task.optimizer.init_args.lr", "0.0",
                     "--trainer.limit_val_batches", "3", callbacks=[probe])
    assert probe.seen[6] == 6 and probe.seen[12] == 12
    assert torch.load(directory / "best.ckpt", weights_only=True)["global_step"] == 6
    assert torch.load(directory / "last.ckpt", weights_only=True)["global_step"] == 13


class _CrashAt(pl.Callback):
    """Raises at the end of the training batch that reaches ``step`` (before that batch's checkpoints), as a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crash at step {trainer.global_step}")


class _StepCheckpointsSeen(pl.Callback):
    """The names of every step checkpoint in ``directory`` when a training batch starts or training ends."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.seen = directory, set()

    def _look(self) -> None:
        self.seen |= {p.name for p in self.directory.glob("step-*.ckpt")}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._look()

    def on_train_end(self, trainer, pl_module) -> None:
        self._look()


# step checkpoints at 3, 6, ..., 18 (the newest 3 kept), validations at 7 and 14, training ends at 19
EVERY_3 = ["--trainer.max_steps", "19", "--trainer.val_check_interval", "7", "--checkpoint.every_n_steps", "3"]


@pytest.mark.slow
def test_a_resumed_run_writes_and_prunes_the_step_checkpoints_of_an_uninterrupted_one(tmp_path):
    """A run that crashes at step 10 and is resumed (from step-0000009.ckpt) writes step checkpoints
    at the steps the uninterrupted run writes them and at no other (none at step 10, the first
    after the resume), prunes the one it resumed from like any other, and ends with the same files
    and parameters as the uninterrupted run."""
    straight_seen = _StepCheckpointsSeen(tmp_path / "straight/checkpoints")
    straight = _fit(tmp_path / "straight", *EVERY_3, callbacks=[straight_seen])
    crashed_seen = _StepCheckpointsSeen(tmp_path / "crashed/checkpoints")
    with pytest.raises(RuntimeError, match="crash at step 10"):
        _fit(tmp_path / "crashed", *EVERY_3, callbacks=[_CrashAt(10), crashed_seen])
    crashed = tmp_path / "crashed/checkpoints"
    assert latest_checkpoint(crashed) == crashed / "step-0000009.ckpt"
    resume(str(crashed), [], callbacks=[crashed_seen])

    written = {f"step-{step:07d}.ckpt" for step in (3, 6, 9, 12, 15, 18)}
    assert straight_seen.seen == crashed_seen.seen == written
    kept = ["step-0000012.ckpt", "step-0000015.ckpt", "step-0000018.ckpt"]
    assert sorted(p.name for p in straight.glob("step-*.ckpt")) == kept
    assert sorted(p.name for p in crashed.glob("step-*.ckpt")) == kept
    expected = torch.load(straight / "last.ckpt", weights_only=True)
    found = torch.load(crashed / "last.ckpt", weights_only=True)
    assert found["global_step"] == expected["global_step"] == 19
    for name, value in expected["state_dict"].items():
        assert torch.equal(found["state_dict"][name], value), name


def test_checksum_survives_the_round_trip_and_sees_any_change(tmp_path):
    """Every kind of value a checkpoint holds, through AtomicCheckpointIO and back (also memory
    mapped); then one change anywhere is a mismatch."""
    content = {
        "state_dict": {"w": torch.randn(3, 5), "transposed": torch.randn(4, 6).t(), "empty": torch.zeros(0, 3)},
        "large": torch.randn(5_000_000),  # 20 MB: more than one chunk, hashed on threads
        "half": torch.randn(7).bfloat16(), "mask": torch.tensor([True, False]), "scalar": torch.tensor(3),
        "numbers": [1, 2.5, -0.0, True, None, (0.9, 0.999)], "dtype": torch.float16, "text": "seed: 0\n",
    }
    io = AtomicCheckpointIO()
    io.save_checkpoint(content, tmp_path / "x.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "x.ckpt", weights_only=True, mmap=mmap)
        assert set(loaded) == {*content, CHECKSUM_KEY}
        checkpointing.verify_checksum(loaded, tmp_path / "x.ckpt")
    assert io.load_checkpoint(tmp_path / "x.ckpt")["numbers"] == content["numbers"]

    for change in (lambda c: c["large"].__setitem__(4_999_999, 1.0), lambda c: c["half"].__setitem__(0, 2.0),
                   lambda c: c["numbers"].__setitem__(3, 1), lambda c: c["numbers"].__setitem__(2, 0.0),
                   lambda c: c["mask"].logical_not_(), lambda c: c.update(dtype=torch.float32)):
        loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)
        change(loaded)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            checkpointing.verify_checksum(loaded, tmp_path / "x.ckpt")
    loaded[CHECKSUM_KEY]["algorithm"] = "sha512/canonical-9"
    with pytest.raises(CheckpointError, match="unknown kind"):
        checkpointing.verify_checksum(loaded, tmp_path / "x.ckpt")


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 (pickle's error type varies)
        AtomicCheckpointIO().save_checkpoint({"f": lambda: 0}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_partials_are_removed_and_a_live_writers_kept(tmp_path):
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = [f".last.ckpt.{_gone_pid()}@{host}.partial", f".step-0000004.ckpt.{_gone_pid()}.partial",
                 ".best.ckpt.4242@elsewhere.partial"]
        live = [f".last.ckpt.{os.getpid()}@{host}.partial", f".step-0000008.ckpt.{sleeper.pid}.partial",
                ".last.ckpt.4242@elsewhere.partial", ".notes.partial", "last.ckpt"]
        for name in stale + live:
            (tmp_path / name).write_bytes(b"x")
        hour_ago = time.time() - 3700
        os.utime(tmp_path / ".best.ckpt.4242@elsewhere.partial", (hour_ago, hour_ago))  # another host's, an hour old

        removed = remove_stale_partials(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live)
    assert remove_stale_partials(tmp_path / "absent") == [] and remove_stale_partials("s3://bucket/checkpoints") == []
