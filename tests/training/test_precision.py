"""``trainer.precision: auto``: measured on the run's own model, recorded in the run, cached per
device model, and the run it starts is the run of the precision it chose, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from bptt.tracking.run_logger import PRECISION_TAG
from tests.bptt_command import SMALL, bptt

CANDIDATES = ("32-true", "bf16-mixed")  # what auto times on a CPU


def _fit(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    root = tmp_path / name
    result = bptt("fit", *SMALL, *extra, "--trainer.default_root_dir", str(root), "--tracking.tracking_uri",
                  f"sqlite:///{tmp_path}/mlflow.db", "--tracking.run_name", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result.stderr


def _precision(root: Path) -> str:
    return yaml.safe_load((root / "config.yaml").read_text())["trainer"]["precision"]


def _train_losses(root: Path) -> list[str]:
    rows = [line.split(",") for line in (root / "logs/version_0/metrics.csv").read_text().splitlines()]
    column = rows[0].index("train/loss")
    return [r[column] for r in rows[1:] if r[column]]


@pytest.mark.slow
def test_auto_measures_records_and_trains_like_the_precision_it_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "cache"))  # no earlier measurement of this shape
    auto, err = _fit(tmp_path, "auto", "--trainer.precision", "auto")
    chosen = _precision(auto)
    assert chosen in CANDIDATES and f"trainer.precision: auto chose {chosen} on " in err and "(measured," in err

    # the measurement: cached under the device model, the faster one chosen, all of it in MLflow
    (entry,) = json.loads((tmp_path / "cache/precision.json").read_text()).values()
    speeds = entry["steps_per_sec"]
    assert set(speeds) == set(CANDIDATES) and entry["precision"] == chosen == max(speeds, key=speeds.get)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id, "attributes.run_name = 'auto'")
    assert run.data.params["trainer.precision"] == chosen
    assert run.data.tags[PRECISION_TAG].startswith(f"trainer.precision: auto chose {chosen} on {entry['device']}")
    assert {p: run.data.metrics[f"precision_auto/{p}/steps_per_sec"] for p in CANDIDATES} == speeds

    # the same run as one configured with that precision: measuring left no trace in the seeds or the data
    explicit, _ = _fit(tmp_path, "explicit", "--trainer.precision", chosen)
    assert _train_losses(auto) == _train_losses(explicit) and _train_losses(auto)
    weights = [torch.load(r / "checkpoints/last.ckpt", weights_only=True)["state_dict"] for r in (auto, explicit)]
    for key, value in weights[1].items():
        assert torch.equal(weights[0][key], value), key

    # a cached measurement is taken as it is: say the other precision was faster
    other = next(p for p in CANDIDATES if p != chosen)
    cache = tmp_path / "cache/precision.json"
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {**entry, "precision": other}}))
    again, err = _fit(tmp_path, "again", "--trainer.precision", "auto")
    assert _precision(again) == other and "(cached measurement," in err

    # a resume keeps its run's precision, whatever auto would measure now
    resumed = bptt("resume", str(again / "checkpoints"), "--trainer.max_steps", "14", "--trainer.precision", "auto",
                   "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"auto chose {other} on the checkpoint's run" in resumed.stderr and _precision(again) == other
