"""``bptt runs``: an experiment's runs as a text table, a sweep's trials under their parent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bptt.metric_names import BPC, PPL, TEST_LOSS, TRAIN_LOSS, VAL, VAL_LOSS, metric
from bptt.tracking.mlflow_tracking import PARENT_RUN_TAG, MlflowTracking, TrackingError

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
    return "\n".join(indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])
