"""MLflow tracking: every ``bptt fit`` is an MLflow run in the store that ``MlflowTracking`` names.

The ``tracking`` config node maps onto ``MlflowTracking``. The tracking URI comes from
``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file ``mlflow.db`` in
the working directory with artifacts beside it in ``mlartifacts/``. Open the UI on that
default store with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bptt import __version__
from bptt.errors import BpttError

if TYPE_CHECKING:
    from bptt.tracking.run_logger import RunLogger

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # else MLflow 3's UI opens on GenAI
CHECKPOINT_DIR_TAG = "bptt.checkpoint_dir"
PARENT_RUN_TAG = "mlflow.parentRunId"


class TrackingError(BpttError):
    """The tracking store cannot be used; the message names the URI and the fix."""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class MlflowTracking:
    """Where a run is tracked.

    Args:
        tracking_uri: an MLflow tracking URI (``http://host:5000``, ``sqlite:///path.db``,
            ``file:/path``); default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
            in the working directory.
        experiment_name: the MLflow experiment the run belongs to.
        run_name: the run's name in the UI; default: MLflow's generated name.
        log_model: also log the final network with ``mlflow.pytorch.log_model``.
        parent_run_id: nest the run under this run (a sweep's parent run).
        enabled: false turns MLflow off for this run (no store is touched; the CSV log and the
            config's own ``trainer.logger`` loggers still record it). Sweeps always track.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment_name: str = "bptt",
        run_name: str | None = None,
        log_model: bool = True,
        parent_run_id: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.log_model = log_model
        self.parent_run_id = parent_run_id
        self.enabled = enabled

    def uri(self) -> str:
        """The tracking URI in force."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"

    def local_store(self) -> Path | None:
        """Where a local store lives (the sqlite file, or a file store's directory); None for a server or
        another database."""
        uri = self.uri()
        if "://" in uri and not uri.startswith(("sqlite:///", "file://")):
            return None
        return Path(uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:"))

    def check(self) -> None:
        """Fail fast, before any training, on a store that cannot be written.

        Raises:
            TrackingError: a server that does not answer within 20 s, or a local store on a
                path that cannot be written.
        """
        uri = self.uri()
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=20) as response:
                    response.read()
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                reason = getattr(err, "reason", err)
                raise TrackingError(
                    f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server) or set "
                    "tracking.tracking_uri / $MLFLOW_TRACKING_URI to a reachable one"
                ) from None
            return
        if "://" in uri and not uri.startswith(("sqlite:///", "file://")):
            self._check_scheme(uri)
            return  # a database or remote store: its client reports its own errors
        path = self.local_store()
        assert path is not None
        directory = path.parent if uri.startswith("sqlite:") else path
        try:  # a real write: permission bits do not stop root, a read-only mount does
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".bptt-write-check-"):
                pass
            if path.exists() and path.is_file():
                with open(path, "ab"):
                    pass
        except OSError as err:
            raise TrackingError(
                f"MLflow store {uri} is on a path this process cannot write ({err.strerror}: {directory}); point "
                "tracking.tracking_uri or $MLFLOW_TRACKING_URI at a writable location"
            ) from None

    @staticmethod
    def _check_scheme(uri: str) -> None:
        """A URI whose scheme no MLflow tracking store serves (``bogus://``), before any run is made."""
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(uri)
        except Exception as err:  # MLflow raises its own error types for an unsupported scheme
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(
                f"MLflow cannot use the tracking URI {uri} ({first[:200]}); "
                "use http(s)://HOST:PORT, sqlite:///PATH.db, file:/PATH or a database URI"
            ) from None

    def check_run(self, run_id: str, *, what: str) -> None:
        """Fail before any training when the run to continue is not in this store.

        Raises:
            TrackingError: no run ``run_id`` at ``uri()``.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(self.uri()).get_run(run_id)
        except MlflowException:
            raise TrackingError(
                f"{what} continues MLflow run {run_id}, which is not in the store {self.uri()}; pass "
                "--tracking.tracking_uri of the store it was logged to"
            ) from None

    def artifact_location(self) -> str | None:
        """Artifacts of a local sqlite store live beside it in ``mlartifacts/``."""
        uri = self.uri()
        if uri.startswith("sqlite:///"):
            return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return None

    def logger(self, *, run_id: str | None = None, global_zero: bool = True) -> RunLogger:
        """A Lightning logger on a new run, or continuing ``run_id``.

        On the global-zero process the run is opened here, through MLflow's client: the experiment
        (tagged as model development) is found or created, a new run gets its tags (the ``bptt``
        command line as its source), and a continued run's logged steps are read, so that none is
        logged twice. Other processes log nothing and open nothing.
        """
        from bptt.tracking.run_logger import RunLogger

        if not global_zero:
            return RunLogger(tracking_uri=self.uri(), run_id=run_id, synchronous=True)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri())
        if run_id is None:
            experiment_id = self._experiment_id(client)
            run_id = client.create_run(experiment_id, tags=self.run_tags(), run_name=self.run_name).info.run_id
        else:
            experiment_id = client.get_run(run_id).info.experiment_id
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        logged_through = {key: max(m.step for m in client.get_metric_history(run_id, key))
                          for key in client.get_run(run_id).data.metrics}
        return RunLogger(tracking_uri=self.uri(), run_id=run_id, synchronous=True, logged_through=logged_through)

    def _experiment_id(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None and experiment.lifecycle_stage != "deleted":
            return experiment.experiment_id
        return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location())

    def run_tags(self) -> dict[str, str]:
        """MLflow's own context tags (user, source, git) with bptt's on top: the command line as the
        run's source, its version, host and commit, and the parent run."""
        from mlflow.tracking.context.registry import resolve_tags

        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        tags = {
            "bptt.version": __version__,
            "host": socket.gethostname(),
            "command": command,
            "mlflow.source.name": command,
            "mlflow.source.type": "LOCAL",
        }
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if self.parent_run_id:
            tags[PARENT_RUN_TAG] = self.parent_run_id
        return resolve_tags(tags)


@contextmanager
def tracking_uri_env_kept() -> Iterator[None]:
    """Leave ``$MLFLOW_TRACKING_URI`` as it was: ``mlflow.set_tracking_uri`` (which Lightning's MLflow
    logger and ``mlflow.start_run`` users call) sets it for the whole process, and a later command in the
    same process (``bptt runs``, another ``fit``) would take that store for the user's default."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
