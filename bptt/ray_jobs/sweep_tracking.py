"""The MLflow side of a sweep: the served store, the sweep's parent run and one child run per trial.

One experiment (``tracking.experiment_name``) holds::

    parent run  "quickstart-20261125-120000"   tags bptt.kind=sweep, bptt.sweep; params: the sweep file;
    |                                          artifacts: sweep.yaml, search_space.yaml, leaderboard.csv,
    |                                          leaderboard.txt, best_config.yaml; metric best/<metric>
    +- child run "lr=0.0043 hidden=256"        tags mlflow.parentRunId, bptt.trial_id, bptt.sweep; one per
                                               trial, created by the trial, written by its rank-0 worker
                                               (``bptt.training.run.train``), closed by the driver; the best
                                               trial's run holds a logged model

Every run carries the tags ``bptt fit`` gives its own (the ``bptt sweep`` command as the source, bptt's
version, the git commit). A trial's run is complete however the trial ends: its params (the trial's
config, less the paths that differ per trial: ``TRIAL_PATHS``) before training; ``config.yaml`` and the
data's files (``vocab.json``, ...) as the run opens (``bptt.training.run.train``); ``curves.png`` from its
metric history when Tune is done with the trial, unless the trial logged its own (``ChildRunStatus``).

While a sweep runs, a local sqlite store is served by ``mlflow server`` on 127.0.0.1
(``ServedStore``) so that concurrent trials write through one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from ray.tune import Callback

from bptt.ray_jobs.fate_sharing import end_group, start_group
from bptt.tracking.mlflow_tracking import EXPERIMENT_KIND, MlflowTracking, TrackingError, tracking_uri_env_kept
from bptt.tracking.params import flatten

if TYPE_CHECKING:
    from bptt.ray_jobs.sweep_config import SweepSpec

TRIAL_TAG, SWEEP_TAG, PARENT_TAG, KIND_TAG = "bptt.trial_id", "bptt.sweep", "mlflow.parentRunId", "bptt.kind"
BEST_TRIAL_TAG = "bptt.best_trial"
CURVES = "curves.png"
# where one start of a trial writes (its workers' directory, the store served to this driver): they differ per
# trial or per start and say nothing about the trial, yet as params they would set every trial apart
TRIAL_PATHS = ("trainer.default_root_dir", "tracking.tracking_uri")
SERVED_URI_ENV = "BPTT_SWEEP_TRACKING_URI"  # the served store's URI, for callbacks restored from an older start


def is_local_store(uri: str) -> bool:
    """A store in a local file (sqlite, file:) rather than behind a server."""
    return uri.startswith(("sqlite:///", "file:")) or "://" not in uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedStore:
    """A local sqlite store served by ``mlflow server`` on 127.0.0.1 while the ``with`` block runs.

    Concurrent trials then write through one server process instead of each opening the sqlite
    file (whose writers lock one another out). The server starts on entering the block and is
    waited for only in ``wait()``, so its start overlaps other work (Ray's). A store that is
    already a server is used as it is.

    The server runs in a process group of its own (``mlflow server`` and the uvicorn process it
    starts), which leaving the block ends as a whole (``fate_sharing.end_group``).
    """

    def __init__(self, tracking: MlflowTracking, *, log: Path) -> None:
        self.store_uri, self.log = tracking.uri(), log
        self.uri = self.store_uri
        self._server: subprocess.Popen | None = None

    def __enter__(self) -> ServedStore:
        if not is_local_store(self.store_uri):
            return self
        if not self.store_uri.startswith("sqlite:///"):
            raise TrackingError(f"a sweep serves only sqlite stores; {self.store_uri} is not one: use "
                                "sqlite:///PATH.db or an MLflow server")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._start()
        return self

    def _start(self) -> None:
        """Start the server on a free port (it starts in the background; ``wait`` waits for it)."""
        store = Path(self.store_uri.removeprefix("sqlite:///"))
        port = free_port()
        with open(self.log, "w") as out:
            self._server = start_group(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", self.store_uri, "--artifacts-destination", str(store.parent / "mlartifacts"),
                 "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=store.parent,
                # tracking only: MLflow 3's job runner (five more processes) would take CPU from the trials
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        self.uri = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the server answers ``/health``; start it again on another port when the free
        port it was given has been taken before it could bind it (by Ray, say, starting meanwhile)."""
        import http.client

        if self._server is None:
            return
        deadline, restarts = time.time() + timeout, 2
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except (OSError, http.client.HTTPException):  # not up yet, or another program answers on the port
                if self._server.poll() is not None and restarts and "already in use" in self.log.read_text():
                    restarts -= 1
                    end_group(self._server)  # whatever of it is left
                    self._start()
                elif self._server.poll() is not None or time.time() > deadline:
                    raise TrackingError(f"mlflow server on {self.store_uri} did not start; its log: "
                                        f"{self.log}") from None
                time.sleep(0.25)

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            end_group(self._server)  # every request has been answered: sqlite has committed it


def trial_run_name(sampled: dict[str, Any]) -> str:
    """A trial's run name from its sampled values: ``"lr=0.0043 hidden=256"``.

    Each dotted key is shortened to its last part (``_size`` dropped), or to more of its parts
    where two keys would otherwise read the same; numbers keep two significant digits."""
    def short(key: str, parts: int) -> str:
        name = ".".join(p for p in key.split(".") if p != "init_args")
        name = ".".join(name.split(".")[-parts:])
        return name.removesuffix("_size") if parts == 1 else name

    names = {key: short(key, 1) for key in sampled}
    for key in sampled:
        parts = 1
        while list(names.values()).count(names[key]) > 1 and parts < len(key.split(".")):
            parts += 1
            names = {k: short(k, parts) if names[k] == names[key] else v for k, v in names.items()}
    return " ".join(f"{names[key]}={_value(value)}" for key, value in sampled.items())


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2g}"
    return str(value)


@dataclass(frozen=True)
class SweepRuns:
    """Where a sweep's runs are: handed from the driver to every trial (picklable: strings only)."""

    tracking_uri: str  # the served store while the sweep runs
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    sweep: str  # the experiment directory's name, the parent run's name

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    @classmethod
    def open(cls, served_uri: str, tracking: MlflowTracking, sweep: str, parent_run_id: str | None, *,
             spec: SweepSpec, base: str, sweep_yaml: str, tags: Mapping[str, str]) -> SweepRuns:
        """The sweep's parent run: created (with ``tags``, and the sweep file as params and artifacts)
        when ``parent_run_id`` is None, else set RUNNING again (a resumed sweep)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(served_uri)
        experiment = client.get_experiment_by_name(tracking.experiment_name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
            tracking.experiment_name, artifact_location=tracking.artifact_location(), tags=dict([EXPERIMENT_KIND]))
        if parent_run_id is not None:
            client.update_run(parent_run_id, status="RUNNING")
            return cls(served_uri, tracking.experiment_name, experiment_id, parent_run_id, sweep)
        parent = client.create_run(experiment_id, run_name=sweep, tags={**tags, SWEEP_TAG: sweep, KIND_TAG: "sweep"})
        runs = cls(served_uri, tracking.experiment_name, experiment_id, parent.info.run_id, sweep)
        runs._log_sweep(spec, base, sweep_yaml)
        return runs

    def _log_sweep(self, spec: SweepSpec, base: str, sweep_yaml: str) -> None:
        from mlflow.entities import Param

        client = self.client()
        params = flatten({"sweep": {k: v for k, v in asdict(spec).items() if k != "space"}, "space": spec.space})
        params["base"] = base
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            client.log_batch(self.parent_run_id, params=items[start : start + 100])
        client.log_text(self.parent_run_id, sweep_yaml, "sweep.yaml")
        client.log_text(self.parent_run_id, yaml.safe_dump(spec.space, sort_keys=False), "search_space.yaml")

    def trial_runs(self, trial_id: str | None = None) -> list:
        """The MLflow runs of the sweep's trials (of one trial, given ``trial_id``)."""
        query = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        if trial_id is not None:
            query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
        return self.client().search_runs([self.experiment_id], filter_string=query)

    def child_run(self, trial_id: str, sampled: dict[str, Any], *, tags: Mapping[str, str]) -> str:
        """The trial's run under the parent, named by its sampled values: found again on a restart
        (retry, PBT exploit), else created with ``tags`` (the sweep command's)."""
        found = self.trial_runs(trial_id)
        if found:
            return found[0].info.run_id
        own = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep}
        run = self.client().create_run(self.experiment_id, run_name=trial_run_name(sampled), tags={**tags, **own})
        return run.info.run_id

    def log_trial_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        """A trial's whole config as its run's params, less ``TRIAL_PATHS``; once per run, as ``bptt fit`` logs
        its own: the run's logger (``RunLogger.log_config``) then finds them and logs none."""
        from mlflow.entities import Param

        client = self.client()
        if client.get_run(run_id).data.params:
            return  # a restarted trial keeps its params
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items()) if k not in TRIAL_PATHS]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])

    def log_curves(self, run_id: str) -> None:
        """``curves.png`` of the run's metric history, unless the run has one: a trial that Tune stopped
        (a scheduler, a stop condition) or that failed never reached the end of ``train``, which logs it."""
        from bptt.tracking.curves import curves_png

        client = self.client()
        if not client.get_run(run_id).data.metrics or any(a.path == CURVES for a in client.list_artifacts(run_id)):
            return
        with tempfile.TemporaryDirectory(prefix="bptt-curves-") as directory:
            client.log_artifact(run_id, str(curves_png(client, run_id, Path(directory) / CURVES)))

    def finish(self, *, metric: str, board: list[dict], csv_text: str, table: str, best_config: str | None) -> None:
        """The leaderboard, the best trial and its config on the parent run, which then ends
        (FAILED when a trial ended in error)."""
        client = self.client()
        client.log_text(self.parent_run_id, csv_text, "leaderboard.csv")
        client.log_text(self.parent_run_id, table, "leaderboard.txt")
        best = next((row for row in board if row[f"best {metric}"] is not None), None)
        if best is not None:
            client.log_metric(self.parent_run_id, f"best/{metric}", best[f"best {metric}"])
            client.set_tag(self.parent_run_id, BEST_TRIAL_TAG, best["trial"])
        if best_config is not None:
            client.log_text(self.parent_run_id, best_config, "best_config.yaml")
        failed = any(row["status"] == "ERROR" for row in board)
        client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")

    def has_model(self, run_id: str) -> bool:
        """Whether the run already holds a logged model (a trial run with ``tracking.log_model``)."""
        client = self.client()
        return bool(client.search_logged_models(experiment_ids=[self.experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'", max_results=1))

    def log_best_model(self, run_id: str, checkpoint_file: Path, *, trusted: bool) -> bool:
        """Log the network of ``checkpoint_file`` (the best trial's best checkpoint) into that
        trial's run, as ``bptt fit`` logs its final network, unless the run holds a model already.

        Returns:
            whether the run holds a model now (False for tasks without a serving model).
        """
        from bptt.tracking.logged_model import log_model

        if self.has_model(run_id):
            return True
        client = self.client()
        status = client.get_run(run_id).info.status
        try:
            with tracking_uri_env_kept():  # the user's store is not the served one
                return log_model(checkpoint_file, tracking_uri=self.tracking_uri, run_id=run_id, trusted=trusted)
        finally:
            client.set_terminated(run_id, status)  # logging reopens the run; it ends as the trial ended


class ChildRunStatus(Callback):
    """Completes and closes each trial's MLflow run when Tune is done with the trial (the trial's
    processes are ended by Tune, e.g. an ASHA stop, and cannot close it themselves): its curves, then
    its status. Writes to the store in
    ``$BPTT_SWEEP_TRACKING_URI``: Tune pickles its callbacks with the experiment, and a resumed
    sweep serves the store on another port."""

    def __init__(self, experiment_id: str, parent_run_id: str) -> None:
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id

    def _close(self, trial: Any, status: str) -> None:
        runs = SweepRuns(os.environ[SERVED_URI_ENV], "", self.experiment_id, self.parent_run_id, sweep="")
        client = runs.client()
        for run in runs.trial_runs(trial.trial_id):
            runs.log_curves(run.info.run_id)
            client.set_terminated(run.info.run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")
