"""Every `bptt fit` is an MLflow run: checked against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from bptt.cli import main
from bptt.models import RNNLanguageModel
from bptt.ray_jobs.sweep_tracking import free_port
from bptt.tracking.mlflow_tracking import EXPERIMENT_KIND
from tests.bptt_command import SMALL, bptt


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    client = MlflowClient(mlflow_server)
    parent = client.create_run(client.create_experiment("tracking-parents")).info.run_id
    args = [*SMALL, "--trainer.log_every_n_steps", "1", "--tracking.tracking_uri", mlflow_server,
            "--tracking.experiment_name", "tracking-e2e", "--tracking.log_model", "true",
            "--tracking.parent_run_id", parent, "--trainer.default_root_dir", str(root / "run")]
    result = bptt("fit", *args, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = client.get_experiment_by_name("tracking-e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["mlflow.parentRunId"] == parent
    return client, experiment, run, root


@pytest.mark.slow
def test_params_are_the_flattened_resolved_config(tracked_run):
    _, _, run, _ = tracked_run
    params = run.data.params
    assert params["model.init_args.hidden_size"] == "32"
    assert params["data.init_args.stdlib_glob"] == "json/*.py"
    assert params["trainer.max_steps"] == "12"
    assert params["task.init_args.optimizer.class_path"] == "torch.optim.Adam"
    assert params["tracking.experiment_name"] == "tracking-e2e"


@pytest.mark.slow
def test_metric_histories_have_every_step_once(tracked_run):
    client, _, run, _ = tracked_run
    train = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in train]
    assert sorted(steps) == list(range(12))
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(val) == 2 and sorted(m.step for m in val) == [5, 11]  # Lightning: after the 6th and 12th batch
    assert "train/tokens_per_sec" in run.data.metrics and "train/grad_norm" in run.data.metrics


@pytest.mark.slow
def test_tags_and_experiment_kind(tracked_run):
    client, experiment, run, root = tracked_run
    assert experiment.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]
    tags = run.data.tags
    assert tags["bptt.version"] and tags["host"] and tags["command"].startswith("bptt fit --config")
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["bptt.checkpoint_dir"] == str((root / "run" / "checkpoints").resolve())
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_artifacts_and_the_logged_model(tracked_run, tmp_path):
    client, experiment, run, root = tracked_run
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "vocab.json", "curves.png", "checkpoints"} <= paths
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    (model,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model.source_run_id == run.info.run_id
    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    served = mlflow.pytorch.load_model(f"models:/{model.model_id}")
    state = torch.load(root / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    vocab = state["model.embedding.weight"].shape[0]
    network = RNNLanguageModel(vocab_size=vocab, embedding_size=64, hidden_size=32, num_layers=1)
    network.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    tokens = torch.randint(0, vocab, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(served(tokens), network.eval()(tokens)[0])


@pytest.mark.slow
def test_runs_lists_the_experiment(tracked_run, mlflow_server, capsys):
    _, _, run, _ = tracked_run
    assert main(["runs", "--experiment", "tracking-e2e", "--tracking.tracking_uri", mlflow_server]) == 0
    table = capsys.readouterr().out
    assert run.info.run_id[:8] in table and "FINISHED" in table and "val/loss" in table.splitlines()[0]


@pytest.mark.slow
def test_the_data_is_a_dataset_input_and_the_command_line_the_source(tracked_run):
    client, _, run, _ = tracked_run
    assert run.data.tags["mlflow.source.name"].startswith("bptt fit --config ")
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    (data,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert data.dataset.name == "stdlib" and len(data.dataset.digest) == 16
    assert json.loads(data.dataset.source)["init_args"]["stdlib_glob"] == "json/*.py"
    profile = json.loads(data.dataset.profile)
    assert profile["train_batches"] > 0 and profile["validation_batches"] > 0 and profile["test_batches"] > 0
    tags = {t.key: t.value for t in data.tags}
    assert tags["mlflow.data.context"] == "training" and tags["train_batches"] == str(profile["train_batches"])


@pytest.mark.slow
def test_curves_have_a_panel_per_quantity(tracked_run, tmp_path):
    import matplotlib.image

    from bptt.tracking.curves import curves_png

    client, _, run, _ = tracked_run
    image = matplotlib.image.imread(curves_png(client, run.info.run_id, tmp_path / "curves.png"))  # (H, W, 4)
    assert image.shape[1] == 3 * 500  # loss, bits per character, gradient norm: 5 inches at 100 dpi each


def test_runs_shows_a_sweeps_trials_apart_from_its_parent(mlflow_server, capsys):
    """Trials are compared with one another (the params that differ among them), under their parent."""
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("runs-of-a-sweep")
    parent = client.create_run(experiment, run_name="quickstart", tags={"bptt.sweep": "quickstart"}).info.run_id
    client.log_param(parent, "sweep.name", "quickstart")
    for lr, hidden, loss in (("0.01", "32", 2.5), ("0.001", "64", 2.75)):
        child = client.create_run(experiment, run_name=f"lr={lr} hidden={hidden}",
                                  tags={"mlflow.parentRunId": parent}).info.run_id
        for key, value in {"task.init_args.optimizer.init_args.lr": lr, "model.init_args.hidden_size": hidden,
                           "checkpoint.every_n_steps": "500", "data.class_path": "bptt.datamodules.X"}.items():
            client.log_param(child, key, value)
        client.log_metric(child, "val/loss", loss)
    lonely = client.create_run(experiment, run_name="lonely").info.run_id
    assert main(["runs", "--experiment", "runs-of-a-sweep", "--tracking.tracking_uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    sweep, alone = out.split("\n\n")
    header, trials_header, *trials = sweep.splitlines()
    assert header.startswith("sweep quickstart (parent run " + parent[:8]) and header.endswith("2 trials")
    assert trials_header.split() == ["run_id", "name", "status", "val/loss", "model.hidden_size",
                                     "task.optimizer.lr"]
    assert "checkpoint.every_n_steps" not in out and "sweep.name" not in out
    assert [t.split()[2:] for t in trials] == [["hidden=64", "RUNNING", "2.7500", "64", "0.001"],
                                               ["hidden=32", "RUNNING", "2.5000", "32", "0.01"]]
    assert lonely[:8] in alone and parent[:8] not in alone


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    code = main(["fit", *SMALL, "--tracking.tracking_uri", uri, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert code == 2 and time.time() - start < 30
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bptt: error: MLflow tracking server") and uri in err
    assert not (tmp_path / "run").exists()


def test_read_only_store_fails_before_training(tmp_path, capsys):
    uri = "sqlite:////proc/bptt-store/mlflow.db"  # /proc takes no new files, not even from root
    code = main(["fit", *SMALL, "--tracking.tracking_uri", uri, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write" in err and uri in err
    assert not (tmp_path / "run").exists()
