"""Bad sweep input stops `bptt sweep` with one line, before Ray starts (or, for resources that only
the cluster can judge, before any trial starts), and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bptt.cli import main
from bptt.ray_jobs.sweep_config import load_sweep, trial_args, tune_space
from tests.conftest import PROJECT

GOOD = {
    "name": "t",
    "base": str(PROJECT / "conf/lm/quickstart.yaml"),
    "space": {"task.optimizer.init_args.lr": {"loguniform": [0.001, 0.01]}, "model.hidden_size": {"choice": [16, 32]}},
    "scheduler": {"type": "asha"},
}


def _sweep_file(tmp_path: Path, **changes) -> Path:
    spec = {**GOOD, **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"space": {"model.hiden_size": {"choice": [16]}}}, "space key 'model.hiden_size'"),
        ({"space": {"model.hidden_size": {"choice": ["big"]}}}, "space key 'model.hidden_size' = 'big'"),
        ({"space": {"model.hidden_size": {"normal": [1, 2]}}}, "must be one of {choice, grid, uniform"),
        ({"space": {"task.optimizer.init_args.lr": {"loguniform": [0.0, 0.1]}}}, "loguniform needs low > 0"),
        ({"space": {"model.hidden_size": {"randint": [64, 16]}}}, "low < high"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler"),
        ({"scheduler": {"type": "asha", "grace": 1}}, "grace"),
        ({"resources": {"num_workers": 0}}, "must be >= 1"),
        ({"base": "conf/lm/nope.yaml"}, "base config conf/lm/nope.yaml not found"),
        ({"overrides": {"trainer.max_step": 5}}, "base config with the sweep's overrides"),
        ({"mode": "lowest"}, "mode"),
    ],
)
def test_bad_sweep_files_fail_in_one_line_before_ray(changes, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, **changes)
    assert main(["sweep", "--config", str(path), "--storage-path", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bptt: error:") and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
    import ray

    assert not ray.is_initialized()


def test_missing_search_package_names_the_extra(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    try:
        import optuna  # noqa: F401

        pytest.skip("optuna is installed here")
    except ImportError:
        pass
    path = _sweep_file(tmp_path, search={"type": "optuna"})
    assert main(["sweep", "--config", str(path)]) == 2
    assert "pip install 'bptt[optuna]'" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_no_sweep(tmp_path, capsys):
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "is not a bptt sweep directory" in capsys.readouterr().err


def test_sweep_needs_config_or_resume(capsys):
    assert main(["sweep"]) == 2
    assert "one of the arguments --config --resume is required" in capsys.readouterr().err


def test_space_becomes_tune_objects_and_trial_arguments(tmp_path):
    spec, base = load_sweep(_sweep_file(tmp_path, overrides={"trainer.max_steps": 7},
                                        space={"model.hidden_size": {"grid": [16, 32]},
                                               "model.dropout": {"uniform": [0.0, 0.5]},
                                               "data.bptt": {"randint": [8, 17]},
                                               "task.optimizer.init_args.lr": {"loguniform": [0.001, 0.01]},
                                               "model.rnn_type": {"choice": ["LSTM", "GRU"]}}))
    space = tune_space(spec.space)
    assert space["model.hidden_size"] == {"grid_search": [16, 32]}
    assert (space["model.dropout"].lower, space["model.dropout"].upper) == (0.0, 0.5)
    assert (space["data.bptt"].lower, space["data.bptt"].upper) == (8, 17)
    assert space["model.rnn_type"].categories == ["LSTM", "GRU"]
    assert trial_args(base, spec, {"model.rnn_type": "GRU", "model.dropout": 0.25}) == [
        "--config", base, "--trainer.max_steps", "7", "--model.rnn_type", "GRU", "--model.dropout", "0.25"]


def test_example_sweep_files_load():
    for path in sorted((PROJECT / "conf/sweep").glob("*.yaml")):
        spec, base = load_sweep(path)
        assert Path(base).is_file() and spec.space, path


def test_random_search_is_seeded(tmp_path):
    """The same sweep file samples the same trials (seed 0 unless the file sets one)."""
    from bptt.ray_jobs.sweep_config import search_algorithm

    spec, _ = load_sweep(_sweep_file(tmp_path, num_samples=5))

    from ray.tune import register_trainable

    register_trainable("noop", lambda config: None)

    def draws() -> list[dict]:
        generator = search_algorithm(spec)
        generator.add_configurations({"trial": {"run": "noop", "config": tune_space(spec.space), "num_samples": 5}})
        return [generator.next_trial().config for _ in range(5)]

    assert draws() == draws()
    assert len({d["task.optimizer.init_args.lr"] for d in draws()}) == 5
