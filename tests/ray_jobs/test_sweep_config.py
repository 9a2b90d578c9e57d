"""Bad sweep input stops `bptt sweep` with one line, before Ray starts (or, for resources that only
the cluster can judge, before any trial starts), and writes nothing; the command line's overrides are
checked as if the sweep file said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bptt.cli import main
from bptt.errors import ConfigError
from bptt.ray_jobs.sweep import SweepState, sweep
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
        ({"resources": {"num_workers": 0}}, "resources.num_workers must be >= 1, got 0"),
        ({"resources": {"cpus_per_worker": -1}}, "resources.cpus_per_worker must be >= 0"),
        ({"resources": {"gpus_per_worker": float("nan")}}, "resources.gpus_per_worker must be >= 0 and finite"),
        ({"resources": {"driver_cpus": 0.00001}}, "resources.driver_cpus must be >= 0 and finite: 0, or at least"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials must be >= 1"),
        ({"checkpoints_to_keep": 0}, "checkpoints_to_keep must be >= 1"),
        ({"seed": -1}, "seed must be >= 0 and < 2**32"),
        ({"failure": {"trial_retries": -2}}, "failure.trial_retries must be >= 0, or -1 for no limit"),
        ({"failure": {"worker_retries": -5}}, "failure.worker_retries must be >= 0, or -1"),
        ({"scheduler": {"type": "asha", "grace_period": 0}}, "scheduler.grace_period must be >= 1"),
        ({"scheduler": {"type": "asha", "grace_period": 5, "max_t": 4}},
         "scheduler.max_t must be >= 1 and >= scheduler"),
        ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor must be > 1"),
        ({"scheduler": {"type": "pbt", "quantile_fraction": 0.7}}, "scheduler.quantile_fraction must be from 0 to 0.5"),
        ({"scheduler": {"type": "pbt", "perturbation_interval": 0}}, "scheduler.perturbation_interval must be >= 1"),
        ({"scheduler": {"type": "pbt", "resample_probability": 2}},
         "scheduler.resample_probability must be from 0 to 1"),
        ({"scheduler": {"type": "pbt", "mutations": {"data.bptt": {"choice": [16, 32]}}}},
         "PBT would perturb data.bptt"),
        ({"space": {"data.batch_size": {"choice": [4, 8]}}, "scheduler": {"type": "pbt"}},
         "PBT would perturb data.batch_size"),
        ({"space": {"model.hidden_size": {"choice": [16, 32]}}, "scheduler": {"type": "pbt"}},
         "PBT would perturb model.hidden_size, but model.hidden_size=16 and 32 build parameters of other shapes "
         "(at rnn.weight_ih_l0)"),
        ({"scheduler": {"type": "pbt", "mutations": {"model.num_layers": {"randint": [1, 3]}}}},
         "model.num_layers=1 and 2 build parameters of other shapes"),
        ({"stop": {"training_iteration": float("inf")}}, "stop.training_iteration must be a finite number"),
        ({"base": "conf/lm/nope.yaml"}, "base config conf/lm/nope.yaml not found"),
        ({"overrides": {"trainer.max_step": 5}}, "base config with the sweep's overrides"),
        ({"overrides": {"model.dropout": 1.5}},
         "base config with the sweep's overrides: model.dropout must be in [0, 1)"),
        ({"space": {"model.dropout": {"choice": [0.1, 1.5]}}},
         "space key 'model.dropout' = 1.5 does not fit quickstart.yaml: model.dropout must be in [0, 1)"),
        ({"space": {"task.k1": {"choice": [8, 500]}}},
         "space key 'task.k1' = 500 does not fit quickstart.yaml: task.k1=500 is longer than a batch's window"),
        ({"space": {"data.windows_per_batch": {"randint": [0, 3]}}},
         "space key 'data.windows_per_batch' = 0 does not fit quickstart.yaml: data.windows_per_batch must be >= 1"),
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


STATE = {"sweep_file": "/nowhere/sweep.yaml", "sweep_yaml": yaml.safe_dump(GOOD), "cwd": "/nowhere",
         "tracking_uri": None, "parent_run_id": None}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not readable JSON (Expecting value"),
        (json.dumps(STATE)[:-20], "is not readable JSON"),  # truncated
        (b"\xff\xfe{", "is not readable JSON ('utf-8' codec can't decode"),
        ("[1, 2]", "is not a JSON object but a list"),
        (json.dumps({k: v for k, v in STATE.items() if k != "sweep_yaml"}), "has no sweep_yaml"),
        (json.dumps({**STATE, "cwd": ["/nowhere"]}), "cwd must be a string, got list"),
        (json.dumps({**STATE, "parent_run_id": 7}), "parent_run_id must be a string or null, got int"),
        (json.dumps({**STATE, "sweep_yaml": "name: [t"}),
         "its sweep_yaml no longer loads (/nowhere/sweep.yaml is not valid YAML"),
        (json.dumps({**STATE, "overrides": "--num_samples 2"}), "overrides must be a list of strings"),
        (json.dumps({**STATE, "overrides": ["--num_samples", "0"]}),
         "its sweep_yaml no longer loads (/nowhere/sweep.yaml with --num_samples 0: num_samples must be >= 1"),
        (json.dumps({**STATE, "sweep_yaml": yaml.safe_dump({**GOOD, "base": "gone.yaml"})}),
         "its sweep_yaml no longer loads (base config gone.yaml not found"),
    ],
)
def test_resume_of_a_corrupt_sweep_state_fails_in_one_line_before_ray(text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = tmp_path / "e2e-20261125-120000"
    experiment.mkdir()
    state = experiment / "bptt-sweep.json"
    state.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = state.read_bytes()
    assert main(["sweep", "--resume", str(experiment)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bptt: error: sweep state {state}") and len(err.splitlines()) == 1 and message in err, err
    assert "bptt sweep --config" in err  # the way out
    assert sorted(tmp_path.rglob("*")) == [experiment, state] and state.read_bytes() == before
    import ray

    assert not ray.is_initialized()


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


def test_pbt_may_perturb_what_keeps_the_weights_shapes(tmp_path):
    """Dropout and the learning rate leave every parameter's shape; a model size that PBT does not perturb
    (outside mutations, or a grid key of the space) follows the cloned trial's config, so it passes too."""
    mutations = {"model.dropout": {"uniform": [0.0, 0.5]}, "task.optimizer.init_args.lr": {"choice": [0.001, 0.01]}}
    spec, _ = load_sweep(_sweep_file(tmp_path, scheduler={"type": "pbt", "mutations": mutations}))
    assert spec.scheduler.mutations == mutations and "model.hidden_size" in spec.space
    space = {"model.dropout": {"choice": [0.0, 0.2]}, "model.hidden_size": {"grid": [16, 32]}}
    load_sweep(_sweep_file(tmp_path, space=space, scheduler={"type": "pbt"}))


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


def test_tunes_own_sampler_starts_no_more_trials_than_may_run_at_once(tmp_path):
    """Tune applies max_concurrent_trials only to a Searcher; Tune's own sampler gets the limit itself,
    else every trial starts (RUNNING, its workers waiting for resources) at once."""
    from ray.tune import register_trainable

    from bptt.ray_jobs.sweep_config import search_algorithm

    spec, _ = load_sweep(_sweep_file(tmp_path, num_samples=4))
    register_trainable("noop", lambda config: None)
    generator = search_algorithm(spec, max_concurrent=2)
    generator.add_configurations({"trial": {"run": "noop", "config": tune_space(spec.space), "num_samples": 4}})
    started = [generator.next_trial() for _ in range(4)]
    assert [t is not None for t in started] == [True, True, False, False]
    generator.on_trial_complete(started[0].trial_id)
    assert generator.next_trial() is not None  # a finished trial frees its place


def test_overrides_set_sweep_file_and_base_config_keys(tmp_path):
    """Keys of the sweep file take YAML values (a dotted key under space is one key); keys of the base config join
    its overrides as `bptt fit` reads them from the command line, and so reach every trial."""
    path = _sweep_file(tmp_path, overrides={"trainer.max_steps": 7}, num_samples=4)
    spec, base = load_sweep(path, overrides=[
        "--num_samples", "1", "--scheduler.max_t=3", "--resources.num_workers", "2", "--stop.training_iteration", "5",
        "--space.model.hidden_size", "{choice: [8]}", "--tracking.experiment_name", "mine",
        "--trainer.max_steps", "40", "--model.dropout=0.25", "--tracking.log_model", "false",
    ])
    assert (spec.num_samples, spec.scheduler.max_t, spec.resources.num_workers) == (1, 3, 2)
    assert spec.stop == {"training_iteration": 5} and spec.tracking.experiment_name == "mine"
    assert spec.space["model.hidden_size"] == {"choice": [8]} and "task.optimizer.init_args.lr" in spec.space
    assert trial_args(base, spec, {"model.hidden_size": 8}) == [
        "--config", base, "--trainer.max_steps", "40", "--model.dropout", "0.25", "--tracking.log_model", "false",
        "--model.hidden_size", "8"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--num_sample", "2"], "override --num_sample is neither a sweep file key (name, base, space"),
        (["--scheduler.max_tt", "3"], "with --scheduler.max_tt 3: Group 'sweep' does not accept option"),
        (["--num_samples", "0"], "sweep.yaml with --num_samples 0: num_samples must be >= 1, got 0"),
        (["--scheduler.type", "hyperband"], "with --scheduler.type hyperband:"),
        (["--trainer.max_step", "40"],
         "base config with the sweep's overrides: unrecognized arguments: --trainer.max_step"),
        (["--model.dropout", "1.5"], "base config with the sweep's overrides: model.dropout must be in [0, 1)"),
        (["--model.hidden_size", "64"], "override --model.hidden_size sets a key that the sweep samples (space)"),
        (["--space.model.hidden_size", "{choice: [16"], "override --space.model.hidden_size '{choice: [16' is not a "
                                                        "YAML value (expected ',' or ']'"),
        (["--space.model.hidden_size", "{choice: [big]}"], "space key 'model.hidden_size' = 'big'"),
        (["--num_samples"], "override --num_samples has no value; pass --num_samples VALUE or --num_samples=VALUE"),
        (["2"], "bptt sweep takes overrides as --key value pairs"),
        (["--config", "other.yaml"], "override --config is neither a sweep file key"),
        (["--trainer.callbacks", '[{"class_path": "os.system"}]'],
         "the command line names code outside the allow-list at trainer.callbacks[0].class_path: 'os.system'"),
        (["--space.task.optimizer", "{choice: [os.system]}"], "the command line names code outside the allow-list"),
    ],
)
def test_bad_overrides_fail_in_one_line_before_ray(overrides, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        sweep(str(_sweep_file(tmp_path)), overrides=overrides, storage_path=str(tmp_path / "results"))
    assert message in str(refused.value) and len(str(refused.value).splitlines()) == 1, refused.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]
    import ray

    assert not ray.is_initialized()


def test_a_resumed_sweep_keeps_the_overrides_it_started_with(tmp_path, monkeypatch):
    """The sweep state keeps the overrides: a resume loads the spec the sweep started with, and refuses new ones."""
    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path)
    experiment = tmp_path / "t-20261125-120000"
    SweepState(sweep_file=str(path), sweep_yaml=path.read_text(), cwd=str(tmp_path),
               overrides=["--num_samples", "3", "--trainer.max_steps", "40"]).save(experiment)
    state = SweepState.load(experiment)
    spec, _ = state.spec(experiment)
    assert spec.num_samples == 3 and spec.overrides == {"trainer.max_steps": "40"}
    (experiment / "bptt-sweep.json").write_text(json.dumps(STATE))  # a state written before overrides were kept
    assert SweepState.load(experiment).overrides == []
    with pytest.raises(ConfigError, match=r"continues a sweep with the settings it started with; drop --num_samples 2"):
        sweep(resume=str(experiment), overrides=["--num_samples", "2"])
