"""Bad input to every command, as an adversarial user gives it: one line ``bptt: error: ...``, exit
status 2, and nothing written (no run directory, no MLflow store, no changed file, no changed run
status). A checkpoint's config never chooses what code runs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from bptt.cli import main
from tests.bptt_command import SMALL, bptt
from tests.conftest import PROJECT


def _one_line_error(capsys: pytest.CaptureFixture, pattern: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert err[-1].startswith("bptt: error: "), err[-5:]
    assert pattern in err[-1], err[-1]
    return err[-1]


def _tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its content's digest."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


CORES = len(os.sched_getaffinity(0))

FIT_CASES = [
    (["--model.hidden_size", "-8"], "model.hidden_size must be an integer >= 1, got -8"),
    (["--model.num_layers", "0"], "model.num_layers must be an integer >= 1, got 0"),
    (["--model.dropout", "1.5"], "model.dropout must be in [0, 1)"),
    (["--task.optimizer.init_args.lr", "-1"], "task.optimizer"),
    (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be > 0"),
    (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps must be >= 1"),
    (["--trainer.max_steps", "-5"], "trainer.max_steps must be >= 0"),
    (["--trainer.devices", "0"], "trainer settings do not work here"),
    (["--trainer.strategy", "bogus"], "trainer settings do not work here"),
    (["--trainer.precision", "16-mixed", "--trainer.accelerator", "cpu"], "use bf16-mixed"),
    (["--trainer.devices", str(CORES + 1), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"],
     f"this machine has {CORES} cores"),
    (["--tracking.tracking_uri", "bogus://nowhere"], "MLflow cannot use the tracking URI bogus://nowhere"),
    (["--data.batch_size", "3", "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"],
     "cannot be split evenly over 2 processes"),
    (["--data.windows_per_batch", "0"], "data.windows_per_batch must be >= 1, got 0"),
    (["--data.tokenizer", "bpe", "--data.vocab_size", "257"], "data.vocab_size must be >= 258 (256 byte tokens, "
     "1 special token <|endoftext|> and at least one merge), got 257"),
    (["--data.vocab_size", "300"], "data.vocab_size=300 sizes the BPE of data.tokenizer: bpe"),
    (["--data.tokenizer", "nowhere/tokenizer.json"], "data.tokenizer=nowhere/tokenizer.json: "),
    (["--data.tokenizer", str(PROJECT / "pyproject.toml")], "is not a tokenizer.json the tokenizers library reads"),
    (["--data.windows_per_batch", "1000000000", "--trainer.val_check_interval", "1000000000", "--trainer.max_steps",
      "1000000000"], "make a training batch longer than each training stream"),
    (["--data.windows_per_batch", "2", "--data.random_bptt", "true"],
     "set data.windows_per_batch: 1 or data.random_bptt"),
    (["--data.windows_per_batch", "2", "--task.k1", "8"], "drop task.k1 or set it to 16"),
    (["--task.k1", "20"], "task.k1=20 is longer than a batch's window (data.bptt=16): every batch would take one "
     "optimizer step of 16 steps; set task.k1 <= 16, or raise data.bptt"),
    (["--data.windows_per_batch", "4", "--trainer.val_check_interval", "6"],
     "trainer.val_check_interval=6 counts optimizer steps and a batch takes data.windows_per_batch=4"),
    (["--data.windows_per_batch", "3", "--trainer.max_steps", "10"], "trainer.max_steps=10 counts optimizer steps"),
    (["--seed_everything", "-5"], "seed_everything must be >= 0 and < 2**32 (numpy's seeds), got -5"),
    (["--trainer.max_epochs", "0"], "trainer.max_epochs must be >= 1, or -1 for no limit; got 0"),
    (["--trainer.limit_train_batches", "0"], "trains nothing: set it > 0"),
    (["--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "4"],
     "trainer.val_check_interval=4 is more than the 3 optimizer steps of an epoch (per process)"),
    (["--data.windows_per_batch", "2", "--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "8"],
     "trainer.val_check_interval=8 is more than the 6 optimizer steps of an epoch"),
    (["--task.optimizer.class_path", "os.system"], "names code outside the allow-list"),
    (["--trainer.callbacks", '[{"class_path": "this.Zen"}]'], "names code outside the allow-list"),
    (["--task.host_reads", "logging_steps"], "host_reads=logging_steps skips non-finite steps on the device"),
    (["--task.host_reads", "sometimes"],
     "\"host_reads\": Expected a typing.Literal['auto', 'every_step', 'logging_steps']"),
]
if not torch.cuda.is_available():
    FIT_CASES.append((["--trainer.accelerator", "gpu"], "trainer settings do not work here"))
else:
    FIT_CASES.append((["--task.host_reads", "logging_steps", "--task.optimizer.init_args.fused", "true",
                       "--trainer.precision", "16-mixed", "--trainer.accelerator", "gpu"], "cannot skip fp16 overflow"))


@pytest.mark.parametrize(("args", "message"), FIT_CASES, ids=[" ".join(a)[:60] for a, _ in FIT_CASES])
def test_fit_refuses_in_one_line_and_writes_nothing(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *SMALL, "--trainer.default_root_dir", str(tmp_path / "run"), *args]) == 2
    _one_line_error(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused command wrote something"


@pytest.mark.slow
def test_a_validation_interval_past_the_epoch_counts_across_epochs_when_asked(tmp_path):
    """Lightning's own way past an epoch's end: trainer.check_val_every_n_epoch null; validation after
    steps 4 and 8 of 3-batch epochs."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = bptt("fit", *SMALL, "--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "4",
                  "--trainer.check_val_every_n_epoch", "null", "--trainer.max_steps", "8", "--trainer.default_root_dir",
                  str(tmp_path / "run"), "--tracking.tracking_uri", uri, "--tracking.experiment_name", "across",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("across").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [3, 7]


def test_fit_output_directory_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    for root, message in ((tmp_path / "a-file" / "run", "is a file, not a directory"),
                          (Path("/proc/bptt-run"), "cannot be written")):
        assert main(["fit", *SMALL, "--trainer.default_root_dir", str(root)]) == 2
        _one_line_error(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_untrusted_yaml_imports_nothing_and_trusted_yaml_runs(tmp_path, capsys, monkeypatch):
    """`class_path: this.Zen` imports `this` (which prints the Zen of Python) only with --trust-config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zen.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "this.Zen"}]}}))
    assert main(["fit", *SMALL, "--config", "zen.yaml"]) == 2
    captured = capsys.readouterr()
    assert "Beautiful is better than ugly" not in captured.out + captured.err
    assert "'this.Zen'" in captured.err and "--trust-config" in captured.err
    assert main(["fit", *SMALL, "--config", "zen.yaml", "--trust-config"]) == 2  # trusted: imported, then not found
    assert "Beautiful is better than ugly" in capsys.readouterr().out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished `bptt fit` of the shrunk quick start, tracked in its own sqlite store."""
    root = tmp_path_factory.mktemp("finished")
    result = bptt("fit", *SMALL, "--trainer.default_root_dir", str(root / "run"), "--tracking.tracking_uri",
                  f"sqlite:///{root}/mlflow.db", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _run_state(root: Path) -> tuple[str, dict[str, list], dict[str, str]]:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bptt").experiment_id])
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
               for k in run.data.metrics}
    return run.info.status, history, _tree(root / "run")


RESUME_CASES = [
    (["--data.eval_batch_size", "3", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
      "--trainer.strategy", "ddp"],
     "cannot be split evenly over 2 processes"),
    (["--task.optimizer.init_args.lr", "-1"], "task.optimizer"),
    (["--trainer.devices", str(CORES + 1), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"], "cores"),
    (["--trainer.default_root_dir", "/proc/bptt-run"], "cannot be written"),
    (["--trainer.val_check_interval", "0"], "val_check_interval"),
    # the read position counts batches of 4 streams x 16 steps: another layout would read other data
    (["--data.windows_per_batch", "2"], "read its training data with data.windows_per_batch=1 "),
    (["--data.bptt", "8"], "with data.bptt=16 "),
    (["--data.batch_size", "8"], "with data.batch_size=4 "),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), RESUME_CASES, ids=[" ".join(a)[:40] for a, _ in RESUME_CASES])
def test_refused_resume_leaves_a_finished_run_as_it_was(finished, args, message, capsys, monkeypatch):
    monkeypatch.chdir(finished)
    before = _run_state(finished)
    assert before[0] == "FINISHED"
    assert main(["resume", str(finished / "run/checkpoints"), "--trainer.max_steps", "20", *args]) == 2
    _one_line_error(capsys, message)
    assert _run_state(finished) == before


def _doctored(finished: Path, tmp_path: Path, change) -> Path:
    """A copy of the finished run's last checkpoint with ``change`` applied to it, resealed the way
    bptt seals checkpoints (an attacker can recompute any checksum)."""
    from bptt.training.checkpointing import AtomicCheckpointIO

    checkpoint = torch.load(finished / "run/checkpoints/last.ckpt", weights_only=True)
    change(checkpoint)
    path = tmp_path / "doctored.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path


def _system_optimizer(checkpoint: dict) -> None:
    config = yaml.safe_load(checkpoint["bptt"]["config"])
    config["task"]["init_args"]["optimizer"] = {"class_path": "os.system", "init_args": {"command": "touch PWNED"}}
    checkpoint["bptt"]["config"] = yaml.safe_dump(config)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["resume", "validate", "test", "generate", "diagnose", "transcribe"])
def test_a_checkpoint_naming_os_system_runs_nothing_under_any_command(finished, command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _doctored(finished, tmp_path, _system_optimizer)
    extra = ["one.wav"] if command == "transcribe" else []
    assert main([command, str(ckpt), *extra]) == 2
    _one_line_error(capsys, "'os.system'")
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doctored.ckpt"]


@pytest.mark.slow
def test_checkpoint_faults_in_one_line(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_config = _doctored(finished, tmp_path, lambda c: c["bptt"].pop("config"))
    assert main(["test", str(no_config)]) == 2
    _one_line_error(capsys, "no run config")
    # the run the checkpoint continues is in another store
    other = f"sqlite:///{tmp_path}/other.db"
    last = finished / "run/checkpoints/last.ckpt"
    before = _tree(finished / "run")
    assert main(["resume", str(last), "--trainer.max_steps", "20", "--tracking.tracking_uri", other]) == 2
    _one_line_error(capsys, "which is not in the store")
    assert _tree(finished / "run") == before
    assert main(["generate", str(last), "--temperature", "nan"]) == 2
    _one_line_error(capsys, "finite --temperature")
    (tmp_path / "blocker").write_text("")
    assert main(["diagnose", str(last), "--probe-steps", "4", "--out", str(tmp_path / "blocker/curve.json")]) == 2
    _one_line_error(capsys, "is a file, not a directory")


def test_runs_on_a_damaged_or_missing_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.db").write_bytes(os.urandom(4096))
    before = _tree(tmp_path)
    assert main(["runs"]) == 2
    _one_line_error(capsys, "cannot be read")
    assert _tree(tmp_path) == before
    assert main(["runs", "--tracking.tracking_uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    _one_line_error(capsys, "no MLflow store")
    assert not (tmp_path / "none.db").exists()


def test_a_run_that_fails_after_it_started_is_marked_failed(tmp_path):
    from bptt.tracking.mlflow_tracking import MlflowTracking

    logger = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").logger()
    with pytest.raises(RuntimeError), logger.failed_on_error():
        run_id = logger.run_id
        raise RuntimeError("disk full")
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "FAILED"


SWEEP = {"name": "evil", "base": str(Path(__file__).resolve().parents[1] / "conf/lm/quickstart.yaml"),
         "space": {"task.optimizer.init_args.lr": {"choice": [0.001, 0.01]}}}


@pytest.mark.parametrize("where", ["overrides", "space", "base"])
def test_a_sweep_naming_code_outside_the_allow_list_starts_nothing(where, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    spec = dict(SWEEP)
    if where == "overrides":
        spec["overrides"] = {"trainer.callbacks": [{"class_path": "os.system",
                                                    "init_args": {"command": "touch PWNED"}}]}
    elif where == "space":
        spec["space"] = {"task.optimizer.class_path": {"choice": ["torch.optim.Adam", "os.system"]}}
    else:
        (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"class_path": "this.Zen"}}))
        spec["base"] = "base.yaml"
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    before = _tree(tmp_path)
    assert main(["sweep", "--config", "sweep.yaml"]) == 2
    _one_line_error(capsys, "names code outside the allow-list")
    assert _tree(tmp_path) == before and not ray.is_initialized()


def test_resuming_a_sweep_whose_saved_state_names_code_starts_nothing(tmp_path, capsys, monkeypatch):
    """The sweep state is data from elsewhere: its sweep file is checked again on --resume."""
    import ray

    monkeypatch.chdir(tmp_path)
    experiment = tmp_path / "evil-20261202-120000"
    experiment.mkdir()
    sweep_yaml = yaml.safe_dump({**SWEEP, "overrides": {"trainer.callbacks": [{"class_path": "os.system"}]}})
    (experiment / "bptt-sweep.json").write_text(json.dumps(
        {"sweep_file": str(tmp_path / "sweep.yaml"), "sweep_yaml": sweep_yaml, "cwd": str(tmp_path)}))
    before = _tree(tmp_path)
    assert main(["sweep", "--resume", str(experiment)]) == 2
    _one_line_error(capsys, "'os.system'")
    assert _tree(tmp_path) == before and not ray.is_initialized()


@pytest.mark.parametrize("config", ["42", "[a, b]", "{unclosed"])
def test_a_checkpoint_whose_config_is_no_mapping_is_refused_as_such(config, tmp_path, capsys, monkeypatch):
    """Not "`--config 42` is neither a file nor a shipped config": the user gave no --config."""
    from bptt.training.checkpointing import with_checksum

    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(Path(__file__).parent / "fixtures/lm-step3.ckpt", weights_only=True)
    checkpoint["bptt"]["config"] = config
    torch.save(with_checksum(checkpoint), tmp_path / "odd.ckpt")
    for command in ("validate", "resume", "generate"):
        assert main([command, "odd.ckpt"]) == 2
        line = _one_line_error(capsys, "carries a run config that is not a YAML mapping of settings")
        assert "--config" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.ckpt"]


def test_resuming_a_run_id_without_a_store_creates_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["resume", "0123456789abcdef"]) == 2
    _one_line_error(capsys, "there is no MLflow store at sqlite:///")
    assert main(["resume", "0123456789abcdef", "--tracking.tracking_uri", f"sqlite:///{tmp_path}/sub/x.db"]) == 2
    _one_line_error(capsys, "there is no MLflow store")
    assert list(tmp_path.iterdir()) == []


def test_precision_auto_checks_the_trainer_settings_before_it_measures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--trainer.precision", "auto", "--trainer.devices", str(CORES + 1), "--trainer.accelerator", "cpu",
            "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(["fit", *SMALL, *args]) == 2
    _one_line_error(capsys, f"this machine has {CORES} cores")
    assert not (tmp_path / "cache/precision.json").exists(), "measured before refusing"
    assert not (tmp_path / "run").exists()


def test_a_refusal_after_the_trainer_is_built_prints_one_line_only(tmp_path, monkeypatch):
    """Lightning's banners ("GPU available: ..."), MLflow's table creation and the tokenizing bars of
    the checks are held back: a refusal is the only line."""
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "cache"))  # a fresh cache: tokenized in this run
    result = bptt("fit", *SMALL, "--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "4",
                  "--trainer.default_root_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is more than the 3 optimizer steps" in result.stderr
