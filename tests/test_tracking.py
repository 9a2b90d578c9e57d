"""Every `bptt fit` is an MLflow run: checked against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from bptt.cli import main
from bptt.models import RNNLanguageModel
from bptt.tracking import EXPERIMENT_KIND, MlflowTracking, ServedStore, free_port
from tests.bptt_command import SMALL, bptt
from tests.ray_jobs.process_tree import LINUX_PROC, alive, descendants


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


@pytest.mark.skipif(not LINUX_PROC, reason="reads the process tree from Linux's /proc")
def test_served_store_runs_only_the_tracking_server_and_stops_all_of_it(tmp_path):
    """A sweep's served store: MLflow 3's job runner (huey consumers) stays off, since its processes
    would take CPU from the trials, and leaving the block ends every process the server started."""
    store = ServedStore(MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), log=tmp_path / "server.log")
    with store:
        store.wait(timeout=90)
        processes = descendants(store._server.pid)
        assert any("uvicorn" in cmd for cmd in processes.values()), processes  # the listing sees the server
        assert not [cmd for cmd in processes.values() if "huey" in cmd or "job_runner" in cmd], processes
    deadline = time.time() + 10
    while any(alive(p) for p in processes) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in processes if alive(p)], processes


def test_served_store_moves_to_another_port_when_its_port_is_taken_before_it_binds(tmp_path, monkeypatch):
    """free_port() only names a port that was free a moment ago: in a sweep, Ray starts meanwhile
    and may take it. Another program answering there (not HTTP) must not pass for the server, nor
    crash the wait, and the server, unable to bind, starts again on another port."""
    import bptt.tracking

    stop = threading.Event()

    def answer_not_http(squatter: socket.socket) -> None:
        while not stop.is_set():
            try:
                connection, _ = squatter.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"\x00\x01 not http\r\n\r\n")

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        squatter.settimeout(0.2)
        taken = squatter.getsockname()[1]
        answering = threading.Thread(target=answer_not_http, args=(squatter,))
        answering.start()
        ports = iter([taken])
        monkeypatch.setattr(bptt.tracking, "free_port", lambda: next(ports, None) or free_port())
        store = ServedStore(MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), log=tmp_path / "server.log")
        try:
            with store:
                assert store.uri == f"http://127.0.0.1:{taken}"
                store.wait(timeout=90)
                assert store.uri != f"http://127.0.0.1:{taken}"
                with urllib.request.urlopen(f"{store.uri}/health", timeout=5) as answer:
                    assert answer.status == 200
        finally:
            stop.set()
            answering.join()
