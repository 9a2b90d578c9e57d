"""MLflow tracking: every ``bptt fit`` is an MLflow run; ``bptt runs`` lists an experiment's runs.

The ``tracking`` config node maps onto ``MlflowTracking``. The tracking URI comes from
``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file ``mlflow.db`` in
the working directory with artifacts beside it in ``mlartifacts/``. Open the UI on that
default store with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from bptt import __version__
from bptt.errors import BpttError
from bptt.private_api import pending_train_step_metrics

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # else MLflow 3's UI opens on GenAI
CHECKPOINT_DIR_TAG = "bptt.checkpoint_dir"


class TrackingError(BpttError):
    """The tracking store cannot be used; the message names the URI and the fix."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"model.init_args.hidden_size": "256", ...}`` (non-strings as JSON text)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


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
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment_name: str = "bptt",
        run_name: str | None = None,
        log_model: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.log_model = log_model
        self.parent_run_id = parent_run_id

    def uri(self) -> str:
        """The tracking URI in force."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"

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
        path = Path(uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:"))
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
                f"MLflow cannot use the tracking URI {uri} ({first[:200]}); use http(s)://HOST:PORT, sqlite:///PATH.db, "
                "file:/PATH or a database URI"
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

    def logger(self, *, run_id: str | None = None) -> RunLogger:
        """A Lightning logger on a new run, or continuing ``run_id``."""
        tags = {
            "bptt.version": __version__,
            "host": socket.gethostname(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return RunLogger(
            experiment_name=self.experiment_name, run_name=self.run_name, tracking_uri=self.uri(), tags=tags,
            artifact_location=self.artifact_location(), run_id=run_id, synchronous=True,
        )


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
    starts), which leaving the block ends as a whole.
    """

    def __init__(self, tracking: MlflowTracking, *, log: Path) -> None:
        self.store_uri, self.log = tracking.uri(), log
        self.uri = self.store_uri
        self._server: subprocess.Popen | None = None

    def __enter__(self) -> ServedStore:
        if not is_local_store(self.store_uri):
            return self
        if not self.store_uri.startswith("sqlite:///"):
            raise TrackingError(f"a sweep serves only sqlite stores; {self.store_uri} is not one: use sqlite:///PATH.db "
                                "or an MLflow server")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._start()
        return self

    def _start(self) -> None:
        """Start the server on a free port (it starts in the background; ``wait`` waits for it)."""
        store = Path(self.store_uri.removeprefix("sqlite:///"))
        port = free_port()
        with open(self.log, "w") as out:
            self._server = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", self.store_uri, "--artifacts-destination", str(store.parent / "mlartifacts"),
                 "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=store.parent, start_new_session=True,
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
                    self._start()
                elif self._server.poll() is not None or time.time() > deadline:
                    raise TrackingError(f"mlflow server on {self.store_uri} did not start; its log: {self.log}") from None
                time.sleep(0.25)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._server is None:
            return
        group = self._server.pid  # the leader of its own session and process group
        for sig in (signal.SIGTERM, signal.SIGKILL):  # every request has been answered: sqlite has committed it
            try:
                os.killpg(group, sig)  # SIGKILL: whatever is left after 3 s, e.g. a uvicorn whose launcher died
            except ProcessLookupError:
                break
            try:
                self._server.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        self._server.wait()


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, plus: the experiment is tagged as model development, params are
    the flattened config, and a resumed run skips steps that the run already logged (a resumed
    run recomputes them bit for bit, so no step is logged twice)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logged_through: dict[str, int] = {}

    @property
    def experiment(self) -> Any:
        fresh = not self._initialized
        client = super().experiment  # on ranks other than 0: Lightning's no-op stand-in
        if fresh and rank_zero_only.rank == 0:
            client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND)
            if self._run_id is not None:
                for key in client.get_run(self._run_id).data.metrics:
                    history = client.get_metric_history(self._run_id, key)
                    self.logged_through[key] = max(m.step for m in history)
        return client

    @contextmanager
    def failed_on_error(self) -> Iterator[None]:
        """Mark the run FAILED (KILLED on Ctrl-C) when the block raises, so that it is never left
        RUNNING; Lightning does so only for errors inside ``fit``."""
        try:
            yield
        except BaseException as err:
            if self._run_id is not None and rank_zero_only.rank == 0:
                status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                try:
                    self.experiment.set_terminated(self._run_id, status)
                except Exception:  # the store itself may be what failed; the original error matters
                    pass
            raise

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Every resolved config value as a param with its dotted key (once per run)."""
        from mlflow.entities import Param

        if self.run_id and self.experiment.get_run(self.run_id).data.params:
            return  # a resumed run keeps its params
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items())]
        for start in range(0, len(params), 100):
            self.experiment.log_batch(self.run_id, params=params[start : start + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if step is None or step > self.logged_through.get(k, -1)}
        if fresh:
            super().log_metrics(fresh, step)
            if step is not None:
                self.logged_through.update(dict.fromkeys(fresh, step))

    def log_artifacts(self, paths: list[Path], artifact_dir: str | None = None) -> None:
        for path in paths:
            if path.exists():
                self.experiment.log_artifact(self.run_id, str(path), artifact_dir)


class LogStepBeforeCheckpoint(pl.Callback):
    """Sends a training step's metrics to the ``RunLogger`` before that step's checkpoint is written
    (Lightning writes it first, so a process killed in between resumes after a step that MLflow
    never received); Lightning's own send of the same step then finds them logged."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, RunLogger)]
        if loggers and trainer.is_global_zero and (pending := pending_train_step_metrics(trainer)) is not None:
            for logger in loggers:
                logger.log_metrics(*pending)


def curves_png(client: Any, run_id: str, path: Path) -> Path:
    """Training and validation curves of a run, read back from MLflow, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.endswith(("/loss", "/ppl", "/bpc", "grad_norm")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in keys:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        axis = axes[1] if key.endswith("grad_norm") else axes[0]
        axis.plot([m.step for m in history], [m.value for m in history], label=key, marker="." if "val" in key else None)
    for axis, title in zip(axes, ("loss", "gradient norm before clipping")):
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def runs_table(experiment_name: str, tracking_uri: str | None = None) -> str:
    """A text table of an experiment's runs: the params that differ, final metrics, status."""
    from mlflow.tracking import MlflowClient

    tracking = MlflowTracking(tracking_uri=tracking_uri, experiment_name=experiment_name)
    tracking.check()
    uri = tracking.uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"no MLflow store at {uri}; run bptt from the directory that holds mlflow.db, or pass "
                            "--tracking.tracking_uri")
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(experiment_name)
        names = [e.name for e in client.search_experiments()] if experiment is None else []
        runs = [] if experiment is None else client.search_runs([experiment.experiment_id],
                                                                 order_by=["attributes.start_time DESC"])
    except Exception as err:  # MLflow and SQLAlchemy raise many types for a damaged store
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrackingError(f"the MLflow store {uri} cannot be read ({first}); check the file or pass another "
                            "--tracking.tracking_uri") from None
    if experiment is None:
        raise TrackingError(f"no experiment {experiment_name!r} at {uri}; experiments there: {names}")
    if not runs:
        return f"experiment {experiment_name!r} has no runs"
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    metrics = [m for m in ("train/loss", "val/loss", "val/ppl", "val/bpc", "test/loss") if any(m in r.data.metrics for r in runs)]
    header = ["run_id", "name", "status", *metrics, *(k.replace(".init_args", "") for k in differing)]
    rows = [[r.info.run_id[:8], r.info.run_name or "", r.info.status,
             *(f"{r.data.metrics[m]:.4f}" if m in r.data.metrics else "" for m in metrics),
             *(r.data.params.get(k, "") for k in differing)] for r in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])

