"""`bptt sweep` end to end on a 2-node Ray cluster simulated on this machine (ray.cluster_utils):
trials of 2 data-parallel workers each; a worker SIGKILLed mid-trial; the sweep's driver SIGKILLed
and the sweep resumed; MLflow (the sweep's own served sqlite store) holds one parent and a child
per trial with complete histories; resources no node holds stop the sweep before any trial. And on
a local Ray instance of the driver's own: a SIGKILLed driver leaves none of its processes behind; the
command line's overrides change what runs; a trial the scheduler stops has a complete MLflow run; a Ray
that does not start ends in one line."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT
from tests.ray_jobs.process_tree import LINUX_PROC, alive, descendants

pytestmark = pytest.mark.slow
BPTT = str(Path(sys.executable).parent / "bptt")
STEPS, EVERY = 40, 10  # validation (a Tune report with a checkpoint) after batches 10, 20, 30, 40
VAL_STEPS = [9, 19, 29, 39]  # Lightning logs a validation at the step count before it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes():
    """A head and a worker node of 2 CPUs each, on this machine. Each cluster's dashboard gets a port
    of its own: two clusters are up at once in this file, and without its dashboard a cluster has no
    state API, which Ray Train needs to free a stopped trial's placement group (PBT hung on that)."""
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": _free_port()})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


cluster = pytest.fixture(scope="module")(_two_nodes)
# a cluster of its own: placement groups that earlier tests' killed drivers left behind cannot hold its CPUs
fresh_cluster = pytest.fixture(scope="function")(_two_nodes)


def _sweep_file(tmp: Path, *, space: dict, extra: dict | None = None, **spec) -> Path:
    overrides = {
        "data.stdlib_glob": "json/*.py", "model.hidden_size": 32, "data.batch_size": 4, "data.eval_batch_size": 4,
        "data.bptt": 16, "trainer.max_steps": STEPS, "trainer.val_check_interval": EVERY,
        "trainer.log_every_n_steps": 1, "tracking.log_model": False, **(extra or {}),
    }
    body = {"name": "e2e", "base": str(PROJECT / "conf/lm/quickstart.yaml"), "overrides": overrides, "space": space,
            "scheduler": {"type": "fifo"}, "resources": {"num_workers": 2, "cpus_per_worker": 1},
            "failure": {"trial_retries": 1, "worker_retries": 2}, "tracking": {"experiment_name": "e2e"}, **spec}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _bptt(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([BPTT, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def _children(cwd: Path) -> tuple[object, list]:
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bptt.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    return client, parents[0], children


def _history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _ray_state(address: str) -> str:
    """The cluster's live actors and placement groups (``ray list``), to explain a sweep that hangs."""
    lists = []
    for what in ("actors", "placement-groups"):
        listed = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", what, "--address", address,
                                 "--filter", "state!=DEAD" if what == "actors" else "state!=REMOVED", "--limit", "100"],
                                capture_output=True, text=True, timeout=120)
        lists.append(f"ray list {what}:\n{listed.stdout[-4000:]}{listed.stderr[-1000:]}")
    return "\n".join(lists)


def _assert_complete(client, child) -> None:
    """Every step logged exactly once, validations where they belong, the run closed."""
    assert [s for s, _ in _history(client, child, "train/loss")] == list(range(STEPS))
    assert [s for s, _ in _history(client, child, "val/loss")] == VAL_STEPS
    assert child.info.status == "FINISHED"


@pytest.mark.skipif(not LINUX_PROC, reason="reads the process tree from Linux's /proc")
def test_killed_driver_leaves_no_process_behind(tmp_path):
    """SIGKILL of a sweep's driver, once its served store and its own local Ray instance are up, ends
    every process it started: mlflow server and its uvicorn, Ray's GCS, raylet, dashboard, agents and
    workers. (First in this file: the cluster fixture's nodes are not up yet to share the CPUs.)"""
    sweep = _sweep_file(tmp_path, space={"model.dropout": {"choice": [0.0]}}, resources={"num_workers": 1})
    with open(tmp_path / "driver.out", "w") as out:
        driver = subprocess.Popen([BPTT, "sweep", "--config", str(sweep), "--storage-path", str(tmp_path / "results")],
                                  cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while not list(tmp_path.glob("results/*/bptt-sweep.json")):  # written once the parent run is open
        assert driver.poll() is None, (tmp_path / "driver.out").read_text()[-4000:]
        assert time.time() < deadline, "the sweep did not start"
        time.sleep(0.5)
    started = descendants(driver.pid)
    commands = " ".join(started.values())
    assert all(name in commands for name in ("uvicorn", "gcs_server", "raylet", "dashboard", "ray::")), commands
    driver.kill()
    driver.wait()
    deadline = time.time() + 120
    while (left := [cmd for p, cmd in started.items() if alive(p)]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left


def test_overrides_run_the_sweep_and_a_trial_the_scheduler_stops_is_complete_in_mlflow(tmp_path, capsys, monkeypatch):
    """`sweep()` with overrides, on a local Ray instance of its own: --num_samples 1 runs one trial of the file's
    two, --scheduler.max_t 2 makes ASHA stop it at its second report (of the 20 that --trainer.max_steps 200
    makes). Its workers end long before `train` logs its files, yet its run has its config, vocabulary and curves,
    the tags of the sweep's command line, the override among its params and no path of its own among them; Tune's
    live table shows the swept metric. (Second in this file: the cluster fixture's nodes are not up yet.)"""
    import bptt
    from bptt.ray_jobs.sweep import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BPTT_SWEEP_TRACKING_URI", raising=False)  # restored once the test is done
    path = _sweep_file(tmp_path, space={"task.optimizer.init_args.lr": {"choice": [0.003, 0.01]}}, num_samples=2,
                       scheduler={"type": "asha"})
    board = sweep(str(path), overrides=["--num_samples", "1", "--scheduler.max_t", "2", "--trainer.max_steps=200",
                                        "--resources.num_workers", "1"], storage_path=str(tmp_path / "results"))
    headers = [line for line in capsys.readouterr().out.splitlines() if "Trial name" in line]
    assert "val/loss" in headers[-1], headers  # the table once the trials have reported
    assert [(row["status"], row["reports"]) for row in board] == [("TERMINATED", 2)]
    client, parent, (child,) = _children(tmp_path)
    # Tune stopped it after two reports; its workers, ended soon after, never reached the end of training
    assert [s for s, _ in _history(client, child, "val/loss")][:2] == VAL_STEPS[:2]
    assert max(s for s, _ in _history(client, child, "train/loss")) < 199
    assert {"config.yaml", "vocab.json", "curves.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    tags = child.data.tags
    assert tags["command"] == tags["mlflow.source.name"] == shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    assert tags["bptt.version"] == bptt.__version__ and len(tags["mlflow.source.git.commit"]) == 40
    assert parent.data.tags["command"] == tags["command"]
    params = child.data.params
    sampled = json.dumps(board[0]["task.optimizer.init_args.lr"])
    assert params["trainer.max_steps"] == "200" and params["task.init_args.optimizer.init_args.lr"] == sampled
    assert not {"trainer.default_root_dir", "tracking.tracking_uri"} & set(params)
    assert not [k for k, v in params.items() if "bptt-trials" in v or str(tmp_path) in v or "127.0.0.1" in v], params


@pytest.mark.parametrize(
    ("address", "ray_tmpdir", "message", "hint"),
    [
        (None, "a-file/ray", "Ray did not start a local instance (NotADirectoryError", "`ray stop`"),
        ("auto", "empty", "Ray did not join the cluster at --address auto (ConnectionError: Could not find any "
                          "running Ray instance", "`ray status --address auto`"),
    ],
)
def test_ray_that_does_not_start_ends_in_one_line(address, ray_tmpdir, message, hint, tmp_path, monkeypatch):
    """Ray's own failures, for real: a local instance whose directory ($RAY_TMPDIR) cannot be made, and
    --address auto where no instance left its address; each one line with what to check, within seconds."""
    import ray

    from bptt.ray_jobs.sweep import RayStartError, sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / ray_tmpdir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = _sweep_file(tmp_path, space={"model.dropout": {"choice": [0.0]}}, resources={"num_workers": 1})
    started = time.monotonic()
    with pytest.raises(RayStartError) as failed:
        sweep(str(path), address=address, storage_path=str(tmp_path / "results"))
    assert time.monotonic() - started < 120
    assert str(failed.value).startswith(message) and hint in str(failed.value), failed.value
    assert len(str(failed.value).splitlines()) == 1
    assert not ray.is_initialized()
    assert not list((tmp_path / "results").glob("*/*/result.json"))


def test_killed_worker_resumes_its_trial_from_the_checkpoint(cluster, tmp_path):
    """Two trials with the same config; rank 1 of one of them is SIGKILLed at step 15. Train restarts
    that trial's workers from the step-10 checkpoint, and the trial ends where the untouched one ends."""
    marker = tmp_path / "killed"
    kill = [{"class_path": "tests.kill_switch.KillAt", "init_args": {"step": 15, "marker": str(marker), "rank": 1}}]
    sweep = _sweep_file(tmp_path, space={"seed_everything": {"grid": [3, 3]}}, extra={"trainer.callbacks": kill},
                        max_concurrent_trials=2)
    done = _bptt("sweep", "--config", str(sweep), "--address", cluster.address, "--storage-path",
                 str(tmp_path / "results"), "--trust-config", cwd=tmp_path)  # the tests' own callback
    out, _ = done.communicate(timeout=1800)
    assert done.returncode == 0, out[-4000:]
    assert marker.exists(), "no worker was killed"
    client, parent, children = _children(tmp_path)
    assert len(children) == 2 and parent.info.status == "FINISHED"
    for child in children:
        _assert_complete(client, child)
    straight, resumed = (_history(client, c, "val/loss") for c in children)
    assert [v for _, v in straight] == pytest.approx([v for _, v in resumed], rel=1e-6, abs=1e-6)
    assert "best val/loss" in out and "mlflow ui --backend-store-uri" in out
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "best_config.yaml", "sweep.yaml", "search_space.yaml"} <= artifacts


def test_killed_driver_then_resume_finishes_every_trial_once(cluster, tmp_path):
    sweep = _sweep_file(tmp_path, space={"task.optimizer.init_args.lr": {"grid": [0.003, 0.01]}},
                        max_concurrent_trials=1, resources={"num_workers": 1})  # Tune's resume: one worker will do
    results = tmp_path / "results"
    driver = _bptt("sweep", "--config", str(sweep), "--address", cluster.address, "--storage-path", str(results),
                   cwd=tmp_path)
    deadline = time.time() + 1800
    while True:  # kill once the first trial is done and the second has reported
        reports = {p.parent.name: len(p.read_text().splitlines()) for p in results.glob("*/*/result.json")}
        if sorted(reports.values()) and min(reports.values()) >= 1 and max(reports.values()) >= len(VAL_STEPS) \
                and len(reports) == 2:
            break
        assert driver.poll() is None, driver.communicate()[0][-4000:]
        assert time.time() < deadline, "the sweep made no progress"
        time.sleep(1)
    driver.kill()  # the driver alone: the mlflow server it started ends with it
    driver.wait()
    (experiment,) = results.iterdir()
    first_done = {name: n for name, n in reports.items() if n == len(VAL_STEPS)}
    elsewhere = tmp_path / "elsewhere"  # resumed from another directory: it still writes to the sweep's store
    elsewhere.mkdir()
    resumed = _bptt("sweep", "--resume", str(experiment), "--address", cluster.address, cwd=elsewhere)
    out, _ = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0, out[-4000:]
    after = {p.parent.name: p.read_text().splitlines() for p in experiment.glob("*/result.json")}
    for name in first_done:  # finished before the kill: not run again
        assert len(after[name]) == len(VAL_STEPS)
    assert all(len(lines) >= len(VAL_STEPS) for lines in after.values())
    client, parent, children = _children(tmp_path)
    assert len(children) == 2 and parent.info.status == "FINISHED"
    for child in children:
        _assert_complete(client, child)
    state = json.loads((experiment / "bptt-sweep.json").read_text())
    assert state["parent_run_id"] == parent.info.run_id
    assert not (elsewhere / "mlflow.db").exists()


def test_resources_no_node_holds_stop_before_any_trial(cluster, tmp_path):
    sweep = _sweep_file(tmp_path, space={"model.dropout": {"choice": [0.0]}},
                        resources={"num_workers": 1, "cpus_per_worker": 3})
    done = _bptt("sweep", "--config", str(sweep), "--address", cluster.address, "--storage-path",
                 str(tmp_path / "results"), cwd=tmp_path)
    out, _ = done.communicate(timeout=900)
    assert done.returncode == 2
    last = out.strip().splitlines()[-1]
    assert last.startswith("bptt: error: no node can hold one worker with 3 CPU"), out[-2000:]
    assert not list((tmp_path / "results").glob("*/*/result.json"))


def test_a_cluster_without_its_state_api_stops_before_any_trial(tmp_path):
    from ray.cluster_utils import Cluster

    headless = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    address = headless.address
    try:
        sweep = _sweep_file(tmp_path, space={"model.dropout": {"choice": [0.0]}}, resources={"num_workers": 1})
        done = _bptt("sweep", "--config", str(sweep), "--address", address, "--storage-path",
                     str(tmp_path / "results"), cwd=tmp_path)
        out, _ = done.communicate(timeout=900)
    finally:
        headless.shutdown()
    assert done.returncode == 2, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"bptt: error: the Ray cluster at {address} has no state API"), out[-2000:]
    assert "--include-dashboard=true" in last
    assert not list((tmp_path / "results").glob("*/*/result.json"))


def test_pbt_clones_the_better_trial_and_applies_the_perturbed_learning_rate(fresh_cluster, tmp_path):
    """With two trials, quantile 0.5 and synchronous PBT (trials that start apart still meet at every
    perturbation point), the worse one is replaced by a copy of the better one every second report:
    it continues from that checkpoint (its streams' hidden states and read position) with a
    perturbed learning rate, which its optimizer then uses (the restored optimizer state holds the
    donor's), in its own MLflow run."""
    sweep = _sweep_file(tmp_path, space={"task.optimizer.init_args.lr": {"loguniform": [0.001, 0.01]}},
                        num_samples=2, max_concurrent_trials=2,
                        resources={"num_workers": 1},
                        scheduler={"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True})
    done = _bptt("sweep", "--config", str(sweep), "--address", fresh_cluster.address, "--storage-path",
                 str(tmp_path / "results"), cwd=tmp_path)
    try:
        out, _ = done.communicate(timeout=1200)
    except subprocess.TimeoutExpired:  # what Ray was waiting for, for the failure's reader
        done.kill()
        pytest.fail(f"the PBT sweep did not end: {done.communicate()[0][-3000:]}\n{_ray_state(fresh_cluster.address)}")
    assert done.returncode == 0, out[-4000:]
    assert "[Exploit] Cloning trial" in out
    reports = [[json.loads(line) for line in p.read_text().splitlines()]
               for p in (tmp_path / "results").glob("*/*/result.json")]
    assert len(reports) == 2
    used = [(r["lr-Adam"], r["config"]["task.optimizer.init_args.lr"]) for trial in reports for r in trial]
    # the logged lr went through float32; a perturbation moves it by 20% or more
    assert all(actual == pytest.approx(configured, rel=1e-6) for actual, configured in used), used
    client, parent, children = _children(tmp_path)
    assert len(children) == 2 and parent.info.status == "FINISHED"
    for child in children:  # a clone takes over the donor's step count: steps may jump ahead, never repeat
        logged = [s for s, _ in _history(client, child, "train/loss")]
        assert logged == sorted(set(logged)) and logged[0] == 0 and logged[-1] == STEPS - 1
        assert child.info.status == "FINISHED"
    learning_rates = [{v for _, v in _history(client, child, "lr-Adam")} for child in children]
    assert max(len(lrs) for lrs in learning_rates) > 1, "no trial trained on with a perturbed learning rate"
