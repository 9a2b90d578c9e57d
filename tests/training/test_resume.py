"""A run killed with SIGKILL (once mid-step, once inside a checkpoint write) and resumed ends
bit for bit where an uninterrupted run ends, with the same MLflow history and no step logged
twice; resuming on another number of processes re-shards the streams; bad checkpoints stop
with one line and leave everything as it was."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bptt.cli import main
from tests.bptt_command import MIN_GRU, SMALL, bptt

# dropout, random window lengths, TBPTT(8, 12), a step scheduler: everything a resume must restore
RICH = [*SMALL, "--trainer.max_steps", "30", "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1",
        "--model.num_layers", "2", "--model.dropout", "0.3", "--data.random_bptt", "true", "--task.k1", "8",
        "--task.k2", "12", "--task.lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR",
        "--task.lr_scheduler.init_args.step_size", "5", "--task.lr_scheduler.init_args.gamma", "0.7",
        "--checkpoint.every_n_steps", "4", "--checkpoint.keep_last", "2", "--trainer.deterministic", "true"]
TIMING = {"train/tokens_per_sec"}


def _kills(tmp: Path, steps: list[int], armed: bool, when: list[str] | None = None) -> list[str]:
    """Kill switches at ``steps`` (``when``: see tests/kill_switch.py; default: mid-step, then the
    last one inside a checkpoint write)."""
    when = when or ["step"] * (len(steps) - 1) + ["in-write"]
    callbacks = []
    for i, (step, moment) in enumerate(zip(steps, when)):
        marker = tmp / f"killed-{i}"
        if not armed:
            marker.write_text("disarmed")
        callbacks.append({"class_path": "tests.kill_switch.KillAt",
                          "init_args": {"step": step, "marker": str(marker), "when": moment}})
    return ["--trust-config", "--trainer.callbacks", json.dumps(callbacks)]  # the tests' own callback


def _history(client: MlflowClient, experiment: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.status, {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                             for key in run.data.metrics if key not in TIMING}


def _final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_for_bit(mlflow_server, tmp_path):
    rng = random.Random()
    first = rng.randint(8, 13)  # after the first checkpoint: a batch takes at most 4 steps, so one is written by 7
    second = rng.randint(first + 5, 24)
    tracking = ["--tracking.tracking_uri", mlflow_server]
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    a.mkdir(), b.mkdir()
    done = bptt("fit", *RICH, *_kills(a, [first, second], armed=False), *tracking,
                "--tracking.experiment_name", f"straight-{tmp_path.name}", "--trainer.default_root_dir", str(a / "run"),
                cwd=a)
    assert done.returncode == 0, done.stderr[-3000:]

    experiment = f"killed-{tmp_path.name}"
    killed = bptt("fit", *RICH, *_kills(b, [first, second], armed=True), *tracking,
                  "--tracking.experiment_name", experiment, "--trainer.default_root_dir", str(b / "run"), cwd=b)
    assert killed.returncode == -9, f"expected SIGKILL at step {first}: {killed.stderr[-2000:]}"
    again = bptt("resume", str(b / "run/checkpoints"), "--trust-config", cwd=b)
    assert again.returncode == -9, f"expected SIGKILL in a checkpoint write at step >= {second}: {again.stderr[-2000:]}"
    assert list((b / "run/checkpoints").glob(".*.partial")), "the second kill did not land inside a checkpoint write"
    finished = bptt("resume", str(b / "run/checkpoints"), "--trust-config", cwd=b)
    assert finished.returncode == 0, finished.stderr[-3000:]

    expected, found = _final_parameters(a / "run"), _final_parameters(b / "run")
    for name, value in expected.items():
        assert torch.equal(found[name], value), f"{name} differs after kills at steps {first} and {second}"
    client = MlflowClient(mlflow_server)
    status_a, history_a = _history(client, f"straight-{tmp_path.name}")
    status_b, history_b = _history(client, experiment)
    assert status_a == status_b == "FINISHED"
    # equal lists: same steps, same values, same multiplicity (Lightning itself logs "epoch" twice
    # at a validation step, with training's and with validation's metrics, in any run)
    assert history_b == history_a, f"logged history differs after kills at steps {first} and {second}"
    for key, points in history_b.items():
        steps = [s for s, _ in points]
        assert key == "epoch" or len(steps) == len(set(steps)), f"{key} logged a step twice"


@pytest.mark.slow
def test_a_scan_core_killed_mid_step_resumes_bit_for_bit(tmp_path):
    """RICH's run (dropout, random windows, TBPTT(8, 12), a scheduler) with a minGRU core trained by its
    parallel scan, dropout on its blocks too: SIGKILLed at a random step after the first checkpoint, resumed, it ends
    bit for bit where the uninterrupted run ends."""
    step = random.Random().randint(8, 20)
    ends = {}
    for name, armed in (("uninterrupted", False), ("killed", True)):
        directory = tmp_path / name
        directory.mkdir()
        run = bptt("fit", *RICH, *MIN_GRU, "--model.core.init_args.dropout", "0.2",
                   *_kills(directory, [step], armed=armed, when=["step"]),
                   "--trainer.default_root_dir", str(directory / "run"), cwd=directory)
        if armed:
            assert run.returncode == -9, f"expected SIGKILL at step {step}: {run.stderr[-2000:]}"
            run = bptt("resume", str(directory / "run/checkpoints"), "--trust-config", cwd=directory)
        assert run.returncode == 0, run.stderr[-3000:]
        ends[name] = _final_parameters(directory / "run")
    assert "model.rnn.cells.0.weight" in ends["killed"], "not the minGRU core"
    for name, value in ends["uninterrupted"].items():
        assert torch.equal(ends["killed"][name], value), f"{name} differs after a kill at step {step}"


# one optimizer step per batch: step checkpoints at 4, 8, ..., validations (best.ckpt, last.ckpt) at 10, 20, 30
PLAIN = [*SMALL, "--trainer.max_steps", "30", "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1",
         "--checkpoint.every_n_steps", "4", "--trainer.deterministic", "true"]


@pytest.mark.slow
def test_history_survives_kills_right_after_each_kind_of_checkpoint_write(mlflow_server, tmp_path):
    """Killed right after a step checkpoint was renamed into place (step 8, before that step's
    metrics went to MLflow), then right after a validation's best.ckpt (step 10): the resumed run's
    MLflow history equals the uninterrupted run's, step for step."""
    tracking = ["--tracking.tracking_uri", mlflow_server]
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    a.mkdir(), b.mkdir()
    done = bptt("fit", *PLAIN, *_kills(a, [5, 10], armed=False, when=["after-write"] * 2), *tracking,
                "--tracking.experiment_name", f"plain-{tmp_path.name}", "--trainer.default_root_dir", str(a / "run"),
                cwd=a)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = bptt("fit", *PLAIN, *_kills(b, [5, 10], armed=True, when=["after-write"] * 2), *tracking,
                  "--tracking.experiment_name", f"killed-{tmp_path.name}", "--trainer.default_root_dir", str(b / "run"),
                  cwd=b)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(b / "run/checkpoints/step-0000008.ckpt", weights_only=True)["global_step"] == 8
    again = bptt("resume", str(b / "run/checkpoints"), "--trust-config", cwd=b)
    assert again.returncode == -9, again.stderr[-2000:]
    assert torch.load(b / "run/checkpoints/best.ckpt", weights_only=True)["global_step"] == 10
    finished = bptt("resume", str(b / "run/checkpoints"), "--trust-config", cwd=b)
    assert finished.returncode == 0, finished.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    status_a, history_a = _history(client, f"plain-{tmp_path.name}")
    status_b, history_b = _history(client, f"killed-{tmp_path.name}")
    assert status_a == status_b == "FINISHED"
    assert [s for s, _ in history_a["train/loss"]] == list(range(30))
    assert history_b == history_a


DDP = [*SMALL, "--trainer.max_steps", "16", "--trainer.val_check_interval", "100", "--checkpoint.every_n_steps", "3",
       "--task.grad_clip", "null", "--task.optimizer.class_path", "torch.optim.SGD",
       "--task.optimizer.init_args.lr", "1.0", "--trainer.accelerator", "cpu", "--tracking.log_model", "false"]


@pytest.mark.slow
def test_resume_on_fewer_processes_reshards_the_streams(tmp_path):
    two = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    straight = bptt("fit", *DDP, *two, *_kills(tmp_path, [8], armed=False), "--trainer.default_root_dir",
                    str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (tmp_path / "k").mkdir()
    killed = bptt("fit", *DDP, *two, *_kills(tmp_path / "k", [8], armed=True), "--trainer.default_root_dir",
                  str(tmp_path / "killed"), cwd=tmp_path)
    assert killed.returncode != 0
    resumed = bptt("resume", str(tmp_path / "killed/checkpoints"), "--trainer.devices", "1", "--trainer.strategy",
                   "auto", "--trust-config", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "MEMBER: 1/2" not in resumed.stderr
    expected, found = _final_parameters(tmp_path / "straight"), _final_parameters(tmp_path / "killed")
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, atol=2e-6, rtol=1e-5, msg=name)


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_bad_checkpoints_fail_in_one_line_and_change_nothing(tmp_path, capsys):
    run = bptt("fit", *SMALL, "--trainer.default_root_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoints = tmp_path / "run/checkpoints"
    good = (checkpoints / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.ckpt").write_bytes(bytes(b ^ 0x5A for b in good[:4096]) + good[4096:])
    torch.save({"state_dict": {}, "global_step": 3}, tmp_path / "foreign.ckpt")
    before, config = _snapshot(checkpoints), (tmp_path / "run/config.yaml").read_bytes()
    cases = [
        (["resume", str(tmp_path / "truncated.ckpt")], "cannot be read"),
        (["resume", str(tmp_path / "corrupt.ckpt")], "cannot be read"),
        (["resume", str(tmp_path / "foreign.ckpt")], "was not written by `bptt fit`"),
        (["resume", str(checkpoints / "last.ckpt"), "--model.hidden_size", "48", "--trainer.max_steps", "24"],
         "holds a different model"),
        (["resume", str(checkpoints / "last.ckpt")], "is at step 12 and trainer.max_steps=12 is reached: nothing is "
         "left to train; pass --trainer.max_steps above 12 to train further"),
        (["resume", str(checkpoints / "last.ckpt"), "--trainer.max_steps", "6"], "trainer.max_steps=6 is reached"),
        (["resume", str(tmp_path / "nothing.ckpt")], "does not exist"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("bptt: error: ") and message in err[-1], (args, err[-1])
    assert _snapshot(checkpoints) == before and (tmp_path / "run/config.yaml").read_bytes() == config


@pytest.mark.slow
def test_a_run_its_epochs_ended_resumes_only_with_more_epochs(tmp_path, capsys):
    run = tmp_path / "run"
    by_epochs = [*SMALL, "--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                 "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
                 "--trainer.default_root_dir", str(run), "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert bptt("fit", *by_epochs, cwd=tmp_path).returncode == 0
    last = run / "checkpoints/last.ckpt"
    assert main(["resume", str(last)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (f"bptt: error: checkpoint {last} has finished 1 epochs and trainer.max_epochs=1 is reached: "
                       "nothing is left to train; pass --trainer.max_epochs above 1 to train further")
    result = bptt("resume", str(last), "--trainer.max_epochs", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_resume_by_run_id_needs_a_known_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["resume", "0123456789abcdef", "--tracking.tracking_uri", uri]) == 2
    assert "neither a checkpoint file nor a run id" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_by_run_id_continues_the_same_run_with_more_steps(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    short = [*SMALL, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", "--tracking.tracking_uri", uri,
             "--tracking.experiment_name", "longer", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert bptt("fit", *short, cwd=tmp_path).returncode == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("longer").experiment_id])
    result = bptt("resume", run.info.run_id, "--tracking.tracking_uri", uri, "--trainer.max_steps", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (again,) = client.search_runs([client.get_experiment_by_name("longer").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(12))
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 12


@pytest.mark.slow
def test_resume_with_another_learning_rate_uses_it(tmp_path):
    """The checkpoint's optimizer state comes back, but a learning rate set on resume (by hand, or
    by a PBT exploit) is the one the optimizer steps with from then on."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = [*SMALL, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1", "--tracking.tracking_uri", uri,
           "--tracking.experiment_name", "new-lr", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert bptt("fit", *run, cwd=tmp_path).returncode == 0
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"] == 0.003
    result = bptt("resume", str(last), "--trainer.max_steps", "10", "--task.optimizer.init_args.lr", "0.0005",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(last, weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("new-lr").experiment_id])
    lrs = {m.step: m.value for m in client.get_metric_history(only.info.run_id, "lr-Adam")}
    assert lrs[5] == 0.003 and all(lrs[s] == 0.0005 for s in range(6, 10))
