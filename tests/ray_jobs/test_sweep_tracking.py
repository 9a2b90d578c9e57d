"""The sweep's MLflow side: the served store (against a real `mlflow server`), and the names of trial runs."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bptt.ray_jobs.sweep_tracking import ServedStore, free_port, trial_run_name
from bptt.tracking.mlflow_tracking import MlflowTracking
from tests.ray_jobs.process_tree import LINUX_PROC, alive, descendants, group_gone_within


def test_trial_run_names_its_values_by_short_keys():
    assert trial_run_name({"task.optimizer.init_args.lr": 0.004321, "model.hidden_size": 256}) == "lr=0.0043 hidden=256"
    assert trial_run_name({"model.rnn_type": "GRU", "seed_everything": 3}) == "rnn_type=GRU seed_everything=3"
    # two keys that end alike keep as much of their path as tells them apart
    assert trial_run_name({"model.dropout": 0.1, "data.dropout": 0.25}) == "model.dropout=0.1 data.dropout=0.25"


@pytest.mark.skipif(not LINUX_PROC, reason="reads the process tree from Linux's /proc")
def test_served_store_runs_only_the_tracking_server_and_stops_all_of_it(tmp_path):
    """A sweep's served store: MLflow 3's job runner (huey consumers) stays off, since its processes
    would take CPU from the trials, and leaving the block ends every process the server started, within
    the grace SIGTERM has (3 s) and a moment."""
    store = ServedStore(MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), log=tmp_path / "server.log")
    with store:
        store.wait(timeout=300)
        group = store._server.pid
        assert os.getpgid(group) == group != os.getpgrp()  # the leader of a group of its own
        processes = descendants(group)
        assert any("uvicorn" in cmd for cmd in processes.values()), processes  # the listing sees the server
        assert not [cmd for cmd in processes.values() if "huey" in cmd or "job_runner" in cmd], processes
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert not [p for p in processes if alive(p)], processes
    assert group_gone_within(group, 5)


def test_served_store_moves_to_another_port_when_its_port_is_taken_before_it_binds(tmp_path, monkeypatch):
    """free_port() only names a port that was free a moment ago: in a sweep, Ray starts meanwhile
    and may take it. Another program answering there (not HTTP) must not pass for the server, nor
    crash the wait, and the server, unable to bind, starts again on another port."""
    import bptt.ray_jobs.sweep_tracking

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
        monkeypatch.setattr(bptt.ray_jobs.sweep_tracking, "free_port", lambda: next(ports, None) or free_port())
        store = ServedStore(MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), log=tmp_path / "server.log")
        try:
            with store:
                assert store.uri == f"http://127.0.0.1:{taken}"
                store.wait(timeout=300)
                assert store.uri != f"http://127.0.0.1:{taken}"
                with urllib.request.urlopen(f"{store.uri}/health", timeout=5) as answer:
                    assert answer.status == 200
        finally:
            stop.set()
            answering.join()


def test_parent_and_child_runs_of_a_sweep(tmp_path):
    """The parent run holds the sweep file; a trial's child run is named by its values and found again
    on a restart (a retry or a PBT exploit must not open a second run)."""
    from mlflow.tracking import MlflowClient

    from bptt.ray_jobs.sweep_config import load_sweep
    from bptt.ray_jobs.sweep_tracking import PARENT_TAG, TRIAL_TAG, SweepRuns
    from tests.conftest import PROJECT

    sweep_file = PROJECT / "conf/sweep/quickstart.yaml"
    spec, base = load_sweep(sweep_file)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = MlflowTracking(tracking_uri=uri, experiment_name="sweep-runs")
    tags = {"command": "bptt sweep --config quickstart", "bptt.version": "1"}
    runs = SweepRuns.open(uri, tracking, "quickstart-1", None, spec=spec, base=base,
                          sweep_yaml=sweep_file.read_text(), tags=tags)
    sampled = {"task.optimizer.init_args.lr": 0.0043, "model.hidden_size": 256}
    child = runs.child_run("t1", sampled, tags=tags)
    assert runs.child_run("t1", sampled, tags={}) == child
    client = MlflowClient(uri)
    run = client.get_run(child)
    assert run.info.run_name == "lr=0.0043 hidden=256"
    assert run.data.tags[PARENT_TAG] == runs.parent_run_id and run.data.tags[TRIAL_TAG] == "t1"
    for tagged in (run, client.get_run(runs.parent_run_id)):  # the command's tags on every run of the sweep
        assert tags.items() <= tagged.data.tags.items()
    assert {a.path for a in client.list_artifacts(runs.parent_run_id)} == {"sweep.yaml", "search_space.yaml"}
    assert not runs.has_model(child)
    again = SweepRuns.open(uri, tracking, "quickstart-1", runs.parent_run_id, spec=spec, base=base, sweep_yaml="",
                           tags={})
    assert again == runs  # a resumed sweep: the same parent, set RUNNING again


def test_a_trial_run_gets_its_params_once_without_its_paths_and_curves_when_it_has_none(tmp_path):
    """A trial's params are its config less the paths that differ per trial (the worker's directory, the store
    served to this driver), logged once (a restarted trial keeps them); a run stopped before ``train`` drew its
    curves gets them from its metric history, a run that drew its own keeps them."""
    from mlflow.tracking import MlflowClient

    from bptt.ray_jobs.sweep_config import load_sweep
    from bptt.ray_jobs.sweep_tracking import CURVES, TRIAL_PATHS, SweepRuns
    from tests.conftest import PROJECT

    spec, base = load_sweep(PROJECT / "conf/sweep/quickstart.yaml")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = SweepRuns.open(uri, MlflowTracking(tracking_uri=uri, experiment_name="trial-runs"), "quickstart-1", None,
                          spec=spec, base=base, sweep_yaml="", tags={})
    config = {"trainer": {"max_steps": 40, "default_root_dir": "/tmp/bptt-trials/t1/rank0"},
              "tracking": {"tracking_uri": "http://127.0.0.1:5123", "experiment_name": "quickstart-sweep"}}
    stopped, finished = runs.child_run("t1", {"model.hidden_size": 16}, tags={}), runs.child_run("t2", {}, tags={})
    runs.log_trial_params(stopped, config)
    runs.log_trial_params(stopped, {"trainer": {"max_steps": 80}})  # a restart: the first start's params stay
    client = MlflowClient(uri)
    assert client.get_run(stopped).data.params == {"trainer.max_steps": "40",
                                                   "tracking.experiment_name": "quickstart-sweep"}
    assert set(TRIAL_PATHS) == {"trainer.default_root_dir", "tracking.tracking_uri"}
    for step, loss in enumerate([3.0, 2.5, 2.25]):
        client.log_metric(stopped, "train/loss", loss, step=step)
        client.log_metric(finished, "train/loss", loss, step=step)
    own = tmp_path / CURVES
    own.write_bytes(b"the trial's own")
    client.log_artifact(finished, str(own))
    runs.log_curves(stopped)
    runs.log_curves(finished)
    drawn = Path(client.download_artifacts(stopped, CURVES, str(tmp_path / "stopped")))
    assert drawn.read_bytes().startswith(b"\x89PNG")
    kept = Path(client.download_artifacts(finished, CURVES, str(tmp_path / "finished")))
    assert kept.read_bytes() == b"the trial's own"
