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
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bptt import __version__
from bptt.errors import BpttError
from bptt.metric_names import BPC, GRAD_NORM, PPL, TEST, TEST_LOSS, TRAIN, TRAIN_LOSS, VAL, VAL_LOSS, metric

if TYPE_CHECKING:
    from bptt.run_logger import RunLogger

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # else MLflow 3's UI opens on GenAI
CHECKPOINT_DIR_TAG = "bptt.checkpoint_dir"
PARENT_RUN_TAG = "mlflow.parentRunId"


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

    def logger(self, *, run_id: str | None = None, global_zero: bool = True) -> RunLogger:
        """A Lightning logger on a new run, or continuing ``run_id``.

        On the global-zero process the run is opened here, through MLflow's client: the experiment
        (tagged as model development) is found or created, a new run gets its tags (the ``bptt``
        command line as its source), and a continued run's logged steps are read, so that none is
        logged twice. Other processes log nothing and open nothing.
        """
        from bptt.run_logger import RunLogger

        if not global_zero:
            return RunLogger(tracking_uri=self.uri(), run_id=run_id, synchronous=True)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri())
        if run_id is None:
            experiment_id = self._experiment_id(client)
            run_id = client.create_run(experiment_id, tags=self._run_tags(), run_name=self.run_name).info.run_id
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

    def _run_tags(self) -> dict[str, str]:
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


@dataclass(frozen=True)
class DataInput:
    """What a run reads, as MLflow shows it among the run's dataset inputs.

    Attributes:
        name: the corpus or source (``stdlib``, ``statsmodels:co2``), else the DataModule's kind.
        digest: identifies the data: its config and the DataModule's fitted state (vocabulary,
            normalization) and split sizes.
        source: the ``data`` config node as JSON.
        split_batches: batches per split, of this process.
    """

    name: str
    digest: str
    source: str
    split_batches: dict[str, int]

    @classmethod
    def of(cls, data_config: Mapping[str, Any], datamodule: Any) -> DataInput:
        """The input of a set-up DataModule (``setup("fit")`` done) built from ``data_config``."""
        from bptt.checkpointing import content_digest

        init_args = dict(data_config.get("init_args") or {})
        kind = str(data_config.get("class_path", type(datamodule).__name__)).rsplit(".", 1)[-1]
        name = str(init_args.get("corpus") or init_args.get("source") or kind.removesuffix("DataModule"))
        split_batches = {}
        for split, loader in (("train", "train_dataloader"), ("validation", "val_dataloader"), ("test", "test_dataloader")):
            try:
                split_batches[split] = len(getattr(datamodule, loader)())
            except (AttributeError, NotImplementedError, TypeError):  # no such split, or a length unknown
                continue
        fitted = datamodule.data_state() if hasattr(datamodule, "data_state") else {}
        source = json.dumps(data_config, sort_keys=True, default=str)
        digest = content_digest({"source": source, "fitted": fitted, "split_batches": split_batches})
        return cls(name=name, digest=digest[:16], source=source, split_batches=split_batches)


def curves_png(client: Any, run_id: str, path: Path) -> Path:
    """Training and validation curves of a run, read back from MLflow, as a PNG: one panel per
    quantity (loss; perplexity or bits per character; gradient norm), each on its own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    logged = client.get_run(run_id).data.metrics
    splits = (TRAIN, VAL, TEST)
    panels = [  # (title, keys, log scale)
        ("loss", [metric(s, "loss") for s in splits], False),
        ("perplexity", [metric(s, PPL) for s in splits], True),  # exp(loss): thousands early on
        ("bits per character", [metric(s, BPC) for s in splits], False),  # loss / ln 2: already a log
        ("gradient norm before clipping", [GRAD_NORM], True),
    ]
    panels = [(title, [k for k in keys if k in logged], log) for title, keys, log in panels]
    panels = [panel for panel in panels if panel[1]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for axis, (title, keys, log) in zip(axes[0], panels):
        for key in keys:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            axis.plot([m.step for m in history], [m.value for m in history], label=key,
                      marker="." if not key.startswith(TRAIN) else None)
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.legend(fontsize=8)
        if log:
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(ScalarFormatter())
            axis.yaxis.set_minor_formatter(ScalarFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RUNS_TABLE_METRICS = (TRAIN_LOSS, VAL_LOSS, metric(VAL, PPL), metric(VAL, BPC), TEST_LOSS)


def runs_table(experiment_name: str, tracking_uri: str | None = None) -> str:
    """A text table of an experiment's runs: final metrics, status and the params that differ.

    A sweep's trials (runs nested under a parent run of the same experiment) are compared with
    one another, under a line for their parent; the other runs form a table of their own.
    """
    tracking = MlflowTracking(tracking_uri=tracking_uri, experiment_name=experiment_name)
    tracking.check()
    uri = tracking.uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"no MLflow store at {uri}; run bptt from the directory that holds mlflow.db, or pass "
                            "--tracking.tracking_uri")
    from mlflow.tracking import MlflowClient  # seconds to import: only once the store is known to be there

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
    ids = {r.info.run_id for r in runs}
    children: dict[str, list[Any]] = {}
    for r in runs:
        parent = r.data.tags.get(PARENT_RUN_TAG)
        if parent in ids:
            children.setdefault(parent, []).append(r)
    sections = []
    for r in runs:
        if r.info.run_id in children:
            header = f"sweep {r.info.run_name or ''} (parent run {r.info.run_id[:8]}, {r.info.status}): " \
                     f"{len(children[r.info.run_id])} trials"
            sections.append(header + "\n" + _runs_text(children[r.info.run_id], indent="  "))
    alone = [r for r in runs if r.info.run_id not in children and r.data.tags.get(PARENT_RUN_TAG) not in ids]
    if alone:
        sections.append(_runs_text(alone))
    return "\n\n".join(sections)


def _runs_text(runs: list[Any], indent: str = "") -> str:
    """Runs as table rows: id, name, status, the metrics any of them has, the params that differ among them."""
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    metrics = [m for m in RUNS_TABLE_METRICS if any(m in r.data.metrics for r in runs)]
    header = ["run_id", "name", "status", *metrics, *(k.replace(".init_args", "") for k in differing)]
    rows = [[r.info.run_id[:8], r.info.run_name or "", r.info.status,
             *(f"{r.data.metrics[m]:.4f}" if m in r.data.metrics else "" for m in metrics),
             *(r.data.params.get(k, "") for k in differing)] for r in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])
