"""The allow-list holds against import paths that walk out of an allowed package.

``bptt.training.checkpointing.os.system`` is spelled under ``bptt.`` and resolves to ``os.system``: every
such path (a module of ``bptt`` that imports ``os``, ``subprocess``, ``sys``, ``builtins``,
``importlib``, ``shutil`` or ``pickle``, and what it imports from them by name) is refused in
every slot of a config, by the check itself (``bptt.config.trust``), by jsonargparse's own policy behind
it, and under every command that reads a config or a checkpoint: nothing runs (a sentinel file is
never created), exit status 2, one line naming the path and ``--trust-config``, nothing written.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

import bptt
from bptt.cli import main
from bptt.config.trust import ALLOWED_PACKAGES, UntrustedConfigError, check_config, jsonargparse_policy
from bptt.training.checkpointing import with_checksum
from tests.conftest import PROJECT

DANGEROUS = {"os": "system", "subprocess": "run", "sys": "exit", "builtins": "exec", "importlib": "import_module",
             "shutil": "rmtree", "pickle": "loads"}


def _walking_paths() -> list[str]:
    """``bptt.<module>.<os|subprocess|...>.<callable>`` for every module of bptt that imports one of
    ``DANGEROUS``, and ``bptt.<module>.<name>`` for what a module imports from them by name."""
    paths = set()
    for info in pkgutil.walk_packages(bptt.__path__, "bptt."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.ismodule(value) and value.__name__ in DANGEROUS:
                paths.add(f"{info.name}.{name}.{DANGEROUS[value.__name__]}")
            elif callable(value) and getattr(value, "__module__", "").split(".")[0] in DANGEROUS:
                paths.add(f"{info.name}.{name}")
    return sorted(paths)


PATHS = _walking_paths()


def test_the_package_has_paths_that_walk_out():
    """The matrix below is not empty: bptt's modules do import these (13 import os)."""
    modules = {p.rsplit(".", 2)[1] for p in PATHS}
    assert {"os", "subprocess", "sys", "shutil"} <= modules, PATHS
    assert "bptt.training.checkpointing.os.system" in PATHS and "bptt.tracking.mlflow_tracking.os.system" in PATHS


def _evil(path: str, sentinel: Path) -> dict:
    return {"class_path": path, "init_args": {"command": f"touch {sentinel}"}}


def _in_slot(config: dict, slot: str, path: str, sentinel: Path) -> dict:
    """``config`` with ``path`` (called with a shell command touching ``sentinel``) in ``slot``."""
    config = copy.deepcopy(config)
    task = config["task"].setdefault("init_args", {})
    if slot == "optimizer":
        task["optimizer"] = _evil(path, sentinel)
    elif slot == "scheduler":
        task["lr_scheduler"] = _evil(path, sentinel)
    elif slot in ("model", "data", "task"):
        config[slot] = _evil(path, sentinel)
    elif slot == "callback":
        config.setdefault("trainer", {})["callbacks"] = [_evil(path, sentinel)]
    elif slot == "logger":
        config.setdefault("trainer", {})["logger"] = _evil(path, sentinel)
    else:  # an init_arg that jsonargparse imports and calls: a LambdaLR's lr_lambda
        task["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.LambdaLR", "init_args": {"lr_lambda": path}}
    return config


SLOTS = ["optimizer", "scheduler", "model", "data", "task", "callback", "logger", "init_arg"]
QUICKSTART = yaml.safe_load((PROJECT / "conf/lm/quickstart.yaml").read_text())


@pytest.mark.parametrize("slot", SLOTS)
def test_every_walking_path_is_refused_in_every_slot(slot, tmp_path):
    for path in PATHS:
        with pytest.raises(UntrustedConfigError) as refused:
            check_config(_in_slot(QUICKSTART, slot, path, tmp_path / "PWNED"), source="evil.yaml")
        assert f"{path!r}" in str(refused.value) and "--trust-config" in str(refused.value)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("path", "key", "reason"), [
    ("bptt.training.checkpointing.os.system", "task.init_args.optimizer.class_path",
     "the module os reached through bptt.training.checkpointing"),
    ("bptt.training.run.Path", "model.class_path", "is pathlib.Path, defined outside bptt.*"),
    ("torch.nn.modules.module.torch.load", "model.class_path",
     "the module torch reached through torch.nn.modules.module"),
    ("bptt.config.trust.resolve", "trainer.callbacks[0].class_path", "is a function, not a class"),
    ("torch.optim.Adam", "model.class_path", "is not a Module"),
    ("bptt.models.RNNLanguageModel", "task.init_args.optimizer.class_path", "is not a Optimizer"),
    ("pytorch_lightning.callbacks.ModelCheckpoint", "trainer.logger.class_path", "is not a Logger"),
    ("bptt.models.NoSuchModel", "model.class_path", "names nothing: bptt.models has no NoSuchModel"),
    ("os.system", "task.init_args.optimizer.class_path", "is outside bptt.*"),
])
def test_a_refusal_says_what_the_path_resolves_to(path, key, reason):
    *parents, last = key.removesuffix(".class_path").split(".")
    config: dict = {"class_path": path}
    for name in reversed([*parents, last]):
        config = {name: [config] if name == "callbacks[0]" else config}
    with pytest.raises(UntrustedConfigError, match="names code outside the allow-list") as refused:
        check_config(config, source="evil.yaml")
    assert reason in str(refused.value), str(refused.value)


@pytest.mark.parametrize(("path", "key"), [
    ("torch.optim.Adam", "task.init_args.optimizer.class_path"),
    ("torch.optim.lr_scheduler.ReduceLROnPlateau", "task.init_args.lr_scheduler.class_path"),
    ("torch.nn.LSTM", "model.init_args.core.class_path"),
    ("bptt.models.MinGRU", "space.model.core.choice[0].class_path"),
    ("pytorch_lightning.callbacks.ModelCheckpoint", "trainer.callbacks[0].class_path"),
    ("pytorch_lightning.loggers.CSVLogger", "trainer.logger.class_path"),
    ("bptt.datamodules.TextStreamDataModule", "data.class_path"),
])
def test_classes_of_the_allowed_packages_and_kinds_pass(path, key):
    check_config({key: {"class_path": path}}, source="ok.yaml")
    check_config({"x": {"class_path": path}}, source="ok.yaml")  # under another key: any allowed kind


def test_checking_imports_nothing_outside_the_allowed_packages():
    """Resolution goes module by module from an allowed package and stops at the first step out."""
    before = set(sys.modules)
    for path in ["bptt.training.checkpointing.os.system", "torch.nn.modules.module.torch.load", "tabnanny.check",
                 "mailbox.Maildir", "bptt.training.checkpointing.json.tool.main", "torch.optim.adam.torch.hub.load"]:
        with pytest.raises(UntrustedConfigError):
            check_config({"model": {"class_path": path}}, source="evil.yaml")
    new = set(sys.modules) - before
    assert all(name.startswith(tuple(p + "." for p in ALLOWED_PACKAGES)) for name in new), sorted(new)
    assert not {"tabnanny", "mailbox", "json.tool"} & new


def test_jsonargparse_refuses_the_same_paths_behind_the_check(tmp_path):
    """The second lock: parsing without bptt.config.trust's check still refuses what resolves outside."""
    from bptt.config.parser import build_parser

    parser, sentinel = build_parser(), tmp_path / "PWNED"
    for slot in ("optimizer", "callback"):
        config = yaml.safe_dump(_in_slot(QUICKSTART, slot, "bptt.training.checkpointing.os.system", sentinel))
        with pytest.raises(Exception, match="posix.system' is not allowed"), jsonargparse_policy(trusted=False):
            parser.instantiate_classes(parser.parse_args(["--config", config]))
    assert not sentinel.exists()
    with jsonargparse_policy(trusted=False):  # what the shipped configs name passes
        parser.parse_args(["--config", str(PROJECT / "conf/lm/quickstart.yaml")])


def test_trust_lets_a_path_through_and_leaves_the_policy_as_it_was(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--where", type=type)
    with jsonargparse_policy(trusted=False), pytest.raises(Exception, match="not allowed"):
        parser.parse_args(["--where", "pathlib.Path"])
    with jsonargparse_policy(trusted=True):
        assert parser.parse_args(["--where", "pathlib.Path"]).where is Path


# -- every command -------------------------------------------------------------------------------------------------

def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _tampered_checkpoint(directory: Path, config: dict) -> Path:
    """The fixture checkpoint with ``config`` embedded and its checksum recomputed, as anyone can."""
    checkpoint = torch.load(PROJECT / "tests/fixtures/lm-step3.ckpt", weights_only=True)
    checkpoint["bptt"]["config"] = yaml.safe_dump(config)
    path = directory / "evil.ckpt"
    torch.save(with_checksum(checkpoint), path)
    return path


def _command(command: str, directory: Path, config: dict) -> list[str]:
    if command in ("fit", "diagnose"):
        (directory / "evil.yaml").write_text(yaml.safe_dump(config))
        return [command, "--config", "evil.yaml"]
    if command in ("sweep", "sweep --resume"):
        (directory / "evil.yaml").write_text(yaml.safe_dump(config))
        sweep = {"name": "evil", "base": str(directory / "evil.yaml"),
                 "space": {"task.optimizer.init_args.lr": {"choice": [0.001, 0.01]}}}
        if command == "sweep":
            (directory / "sweep.yaml").write_text(yaml.safe_dump(sweep))
            return ["sweep", "--config", "sweep.yaml"]
        experiment = directory / "evil-20261202-120000"
        experiment.mkdir()
        (experiment / "bptt-sweep.json").write_text(json.dumps(
            {"sweep_file": str(directory / "sweep.yaml"), "sweep_yaml": yaml.safe_dump(sweep), "cwd": str(directory)}))
        return ["sweep", "--resume", str(experiment)]
    checkpoint = str(_tampered_checkpoint(directory, config))
    command = command.split()[0]
    extra = {"generate": ["--num-tokens", "5"], "transcribe": ["one.wav"], "forecast": ["--horizon", "3"]}
    if command == "transcribe":
        soundfile.write(directory / "one.wav", np.zeros(800, dtype=np.float32), 8000)
    return [command, checkpoint, *extra.get(command, [])]


COMMANDS = ["fit", "resume", "validate", "test", "generate", "transcribe", "forecast", "diagnose",
            "diagnose CHECKPOINT", "sweep", "sweep --resume"]
CASES = [(command, slot, PATHS[(i * len(SLOTS) + j) % len(PATHS)])
         for i, command in enumerate(COMMANDS) for j, slot in enumerate(SLOTS)]


@pytest.mark.parametrize(("command", "slot", "path"), CASES, ids=[f"{c}-{s}-{p}" for c, s, p in CASES])
def test_no_command_runs_a_walking_path(command, slot, path, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "PWNED"
    args = _command(command, tmp_path, _in_slot(QUICKSTART, slot, path, sentinel))
    before = _tree(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # a refusal is one line
    assert err[0].startswith("bptt: error: ") and f"{path!r}" in err[0] and "--trust-config" in err[0], err[0]
    assert not sentinel.exists()
    assert _tree(tmp_path) == before and not ray.is_initialized()


def test_the_matrix_covers_every_path():
    assert len(CASES) >= len(PATHS) and {p for _, _, p in CASES} == set(PATHS)
    assert {c for c, _, _ in CASES} == set(COMMANDS) and {s for _, s, _ in CASES} == set(SLOTS)


OVERRIDES = [
    ["--trainer.callbacks+=bptt.training.checkpointing.os.system"],
    ["--trainer.callbacks+", "bptt.tracking.mlflow_tracking.subprocess.run"],
    ["--task.optimizer", "bptt.tracking.mlflow_tracking.os.system"],
    ["--task.optimizer.class_path", "bptt.cli.sys.exit"],
    ["--trainer.logger", json.dumps({"class_path": "bptt.datamodules.speech.shutil.rmtree",
                                     "init_args": {"path": "x"}})],
    ["--model.init_args.core", json.dumps({"class_path": "bptt.ray_jobs.worker.shutil.rmtree"})],
]


@pytest.mark.parametrize("args", OVERRIDES, ids=[" ".join(a)[:50] for a in OVERRIDES])
def test_command_line_overrides_are_resolved_too(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(PROJECT / "conf/lm/quickstart.yaml"), *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "names code outside the allow-list" in line and "--trust-config" in line, line
    assert list(tmp_path.iterdir()) == []
