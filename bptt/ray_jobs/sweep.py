"""``bptt sweep``: a Ray Tune sweep whose every trial is a Ray Train data-parallel job.

    bptt sweep --config conf/sweep/quickstart.yaml [--address auto | ray://HOST:10001] [--storage-path P]
               [--num_samples 2 --scheduler.max_t 3 --trainer.max_steps 40 ...]
    bptt sweep --resume EXPERIMENT_DIR [--address ...]

Order of work: the sweep file (with the command line's overrides) and every trial's config are
checked (no Ray yet); the MLflow store is checked and, when it is a local file, served by ``mlflow
server`` on 127.0.0.1 for the sweep's duration; Ray starts (or joins ``--address``; either failing
ends in one line, ``RayStartError``) and the trial resources are checked
against its nodes; then the parent MLflow run opens (``sweep_tracking.py`` owns every run of a
sweep) and Tune runs the trials, at most ``max_concurrent_trials`` at once. At the end the parent
run gets the leaderboard and the best trial's config, the best trial's run a logged model (when
it has none of its own), and the leaderboard is printed.
The served store and a local Ray instance end with the driver, even when it is killed
(``fate_sharing.py``); ``--resume`` continues from the experiment directory's ``bptt-sweep.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bptt.errors import BpttError, ConfigError
from bptt.ray_jobs.fate_sharing import FateSharing
from bptt.ray_jobs.sweep_config import (
    SweepSpec,
    load_sweep,
    resolved_config,
    scheduler,
    search_algorithm,
    trial_args,
    tune_space,
)
from bptt.ray_jobs.sweep_tracking import (
    SERVED_URI_ENV,
    TRIAL_TAG,
    ChildRunStatus,
    ServedStore,
    SweepRuns,
    is_local_store,
)
from bptt.ray_jobs.trial import SweepContext, run_trial
from bptt.ray_jobs.worker import CHECKPOINT_FILE
from bptt.tracking.mlflow_tracking import MlflowTracking

STATE_FILE = "bptt-sweep.json"  # in the experiment directory: what --resume needs


class RayStartError(BpttError):
    """Ray did not start a local instance, or did not join the cluster at ``--address``."""


def sweep(config: str | None = None, *, overrides: list[str] | None = None, resume: str | None = None,
          address: str | None = None, storage_path: str | None = None, trusted: bool = False) -> list[dict]:
    """Run (or, with ``resume``, continue) a sweep; prints and returns the leaderboard (best first).

    Args:
        config: the sweep file.
        overrides: ``--key value`` (or ``--key=value``) words over the sweep file's keys (``--num_samples 2``,
            ``--scheduler.max_t 3``) and its base config's (``--trainer.max_steps 40``), checked as if the
            file said so; the sweep state keeps them, so that ``resume`` continues with them.
        resume: the experiment directory of a sweep to continue, with the settings it started with.
        address: an existing Ray cluster (``auto``, ``ray://HOST:10001``); default: a local Ray instance.
        storage_path: where Tune and Train persist (default: the sweep file's ``storage_path``, else ~/ray_results).
        trusted: the sweep file (or the saved sweep state) may name code outside the allow-list.

    Raises:
        BpttError: one line: a check that needs no cluster (before Ray starts), Ray's start
            (``RayStartError``), or the cluster's resources (before any trial starts).
    """
    # ---------------------------------------------------------------- CHECK (no Ray yet)
    if resume is not None:
        if overrides:
            raise ConfigError(f"bptt sweep --resume continues a sweep with the settings it started with; drop "
                              f"{shlex.join(overrides)}, or start a new sweep: bptt sweep --config SWEEP_FILE "
                              f"{shlex.join(overrides)}")
        directory = Path(resume).resolve()
        state = SweepState.load(directory)
        spec, base = state.spec(directory, trusted=trusted)
    else:
        spec, base, state, directory = _new_sweep(config, overrides or [], storage_path, trusted)
    tracking = _tracking(spec, base)
    if state.tracking_uri:  # a resumed sweep writes where it started, wherever it is resumed from
        tracking.tracking_uri = state.tracking_uri
    state.tracking_uri = tracking.uri()
    tracking.check()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the served URL ends with the sweep
    import ray  # Ray starts below, after every check that needs no cluster

    from bptt.console import release

    release()  # what the checks' libraries printed

    # ---------------------------------------------------------------- START (served store, Ray) and RUN
    # every process started below (served store, local Ray instance) ends with this one, even on kill -9
    with FateSharing(), ServedStore(tracking, log=directory / "mlflow-server.log") as store:
        start_ray(address)
        try:
            check_resources(spec)
            check_state_api(address)
            _check_store_reachable(tracking)
            store.wait()
            return _tune(spec, base, state, directory, tracking, store.uri, resume is not None)
        finally:
            ray.shutdown()


def _new_sweep(config: str | None, overrides: list[str], storage_path: str | None,
               trusted: bool) -> tuple[SweepSpec, str, SweepState, Path]:
    """A new sweep's checked spec, base config path, state and experiment directory (not yet made)."""
    if config is None:
        raise ConfigError("bptt sweep needs --config conf/sweep/NAME.yaml or --resume EXPERIMENT_DIR")
    spec, base = load_sweep(config, overrides=overrides, trusted=trusted)
    state = SweepState(sweep_file=str(Path(config).resolve()), sweep_yaml=Path(config).read_text(), cwd=os.getcwd(),
                       overrides=overrides)
    storage = Path(storage_path or spec.storage_path or "~/ray_results").expanduser().resolve()
    return spec, base, state, storage / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_ray(address: str | None) -> None:
    """Start a local Ray instance of this process's own, or join the cluster at ``address``.

    Raises:
        RayStartError: Ray did not start or join (one line: Ray's reason and what to check).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        # "local": an instance of its own, even where `ray start` (or a test cluster) left its address behind.
        # The dashboard stays: Train cleans up through its state API.
        ray.init(address=address or "local", log_to_driver=False,
                 runtime_env={"env_vars": _forwarded_env()} if address is None else None)
    except (OSError, RuntimeError, ValueError) as err:  # no connection, a start timed out, a malformed address
        ray.shutdown()  # whatever of it started
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
        if address is None:
            temp = os.environ.get("RAY_TMPDIR") or "/tmp"
            raise RayStartError(f"Ray did not start a local instance ({reason}); check free memory and space in "
                                f"{temp} (Ray's files; $RAY_TMPDIR moves them), end stale instances with `ray stop`, "
                                "or join a running cluster with --address") from None
        raise RayStartError(f"Ray did not join the cluster at --address {address} ({reason}); is the cluster up "
                            f"and the address right? `ray status --address {address}` on one of its nodes tells; "
                            "drop --address to start a local instance") from None


@dataclass
class SweepState:
    """What ``--resume`` needs, kept as ``bptt-sweep.json`` in the experiment directory."""

    sweep_file: str  # where the sweep file was: its relative ``base`` resolves against it
    sweep_yaml: str  # the sweep file's text when the sweep started
    cwd: str  # the directory the sweep started in: trials run there
    tracking_uri: str | None = None  # the MLflow store the sweep writes to, wherever it is resumed from
    parent_run_id: str | None = None  # the sweep's MLflow run, once opened
    overrides: list[str] = field(default_factory=list)  # the command line's overrides of the sweep file

    @classmethod
    def load(cls, directory: Path) -> SweepState:
        """The saved state of the sweep in ``directory``.

        Raises:
            ConfigError: no state file, or one that is not a state this version wrote (not JSON,
                truncated, keys missing or of the wrong type).
        """
        path = directory / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{directory} is not a bptt sweep directory (no {STATE_FILE}); pass the directory "
                              "`bptt sweep` printed, e.g. ~/ray_results/quickstart-20261125-120000")
        fix = "restore the file, or start the sweep anew with bptt sweep --config SWEEP_FILE"
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"sweep state {path} is not readable JSON ({err}); {fix}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"sweep state {path} is not a JSON object but a {type(raw).__name__}; {fix}")
        texts = [item for item in fields(cls) if item.name != "overrides"]
        for item in texts:
            value, optional = raw.get(item.name), item.default is None
            if item.name not in raw and not optional:
                raise ConfigError(f"sweep state {path} has no {item.name}; {fix}")
            if not isinstance(value, str) and not (optional and value is None):
                kinds = "a string or null" if optional else "a string"
                raise ConfigError(f"sweep state {path}: {item.name} must be {kinds}, got {type(value).__name__}; {fix}")
        overrides = raw.get("overrides", [])  # none in the state of a sweep started without
        if not isinstance(overrides, list) or not all(isinstance(word, str) for word in overrides):
            raise ConfigError(f"sweep state {path}: overrides must be a list of strings, got {overrides!r}; {fix}")
        return cls(**{item.name: raw.get(item.name) for item in texts}, overrides=overrides)

    def spec(self, directory: Path, *, trusted: bool = False) -> tuple[SweepSpec, str]:
        """The saved sweep file and overrides, loaded and checked as when the sweep started: (spec, base
        config path). Its import paths are checked against the allow-list unless ``trusted``: the file is data."""
        try:
            return load_sweep(self.sweep_file, self.sweep_yaml, overrides=self.overrides, trusted=trusted)
        except ConfigError as err:
            raise ConfigError(f"sweep state {directory / STATE_FILE}: its sweep_yaml no longer loads ({err}); "
                              "restore the file, or start the sweep anew with bptt sweep --config SWEEP_FILE") from None

    def save(self, directory: Path) -> None:
        """Write the state whole or not at all (a crash mid-write leaves the previous file)."""
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f"{STATE_FILE}.partial"
        partial.write_text(json.dumps(asdict(self), indent=1))
        os.replace(partial, directory / STATE_FILE)


def _tracking(spec: SweepSpec, base: str) -> MlflowTracking:
    """The base config's tracking node (with the sweep's overrides), the sweep's tracking settings on top."""
    from bptt.config.parser import build_parser, parse_config

    cfg = parse_config(trial_args(base, spec, {}), build_parser(), trusted=spec.trusted)
    tracking = dict(vars(cfg.tracking))
    tracking["experiment_name"] = spec.tracking.experiment_name or f"{spec.name}-sweep"
    if spec.tracking.tracking_uri:
        tracking["tracking_uri"] = spec.tracking.tracking_uri
    return MlflowTracking(**tracking)


def _forwarded_env() -> dict[str, str]:
    """Settings that the trials must see as this process sees them (a local Ray instance)."""
    keep = ("BPTT_DATA_DIR", "BPTT_CACHE_DIR", "PYTHONPATH", "HF_DATASETS_OFFLINE", "HF_HOME")
    return {k: os.environ[k] for k in keep if k in os.environ}


def check_resources(spec: SweepSpec) -> None:
    """Fail before any trial starts when the cluster can never place one trial's workers."""
    import ray

    r = spec.resources
    if not r.check:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}

    def fits(node: dict[str, float]) -> int:
        return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0), default=r.num_workers)

    per_node = [fits(n) for n in nodes]
    have = ", ".join(f"CPU {n.get('CPU', 0):g} GPU {n.get('GPU', 0):g}" for n in nodes)
    if not any(per_node):
        raise ConfigError(
            f"no node can hold one worker with {r.cpus_per_worker:g} CPU and {r.gpus_per_worker:g} GPU "
            f"(nodes: {have}); "
            "lower resources.cpus_per_worker / gpus_per_worker, or add nodes (resources.check: false on autoscaling "
            "clusters)"
        )
    if sum(per_node) < r.num_workers:
        raise ConfigError(
            f"the cluster holds {sum(per_node)} of the {r.num_workers} workers a trial needs (nodes: {have}); "
            "lower resources.num_workers or its per-worker resources"
        )


def check_state_api(address: str | None) -> None:
    """Fail before any trial starts on a cluster without its state API (the dashboard): Ray Train
    frees the placement group of a trial that Tune stops (ASHA, PBT, a failure) through it, so
    without it every stopped trial keeps its CPUs and GPUs and the sweep ends up waiting forever."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=60, raise_on_missing_output=False)
    except Exception as err:  # ConnectionError without a dashboard, RayStateApiException when it fails
        where = f"the Ray cluster at {address}" if address else "the local Ray instance"
        detail = " ".join(str(err).split()).split(". ")[0][:200]  # the first sentence: what it tried
        raise ConfigError(
            f"{where} has no state API ({type(err).__name__}: {detail}): Ray Train could not free the "
            "resources of the trials Tune stops; start the cluster with its dashboard (ray start --head "
            "--include-dashboard=true, which needs ray[default])"
        ) from None


def _check_store_reachable(tracking: MlflowTracking) -> None:
    """A local store is served on 127.0.0.1: only trials on this machine reach it."""
    import ray

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if is_local_store(tracking.uri()) and len(hosts) > 1:
        raise ConfigError(
            f"the MLflow store {tracking.uri()} is a local file, which trials on the cluster's other machines "
            f"({len(hosts)} hosts) cannot reach; set tracking.tracking_uri (or $MLFLOW_TRACKING_URI) to an MLflow "
            "server"
        )


def _concurrency(spec: SweepSpec) -> int:
    """How many trials' worker groups the cluster holds at once (the default max_concurrent_trials)."""
    import ray

    total = ray.cluster_resources()
    r = spec.resources
    per_worker = (("CPU", r.cpus_per_worker), ("GPU", r.gpus_per_worker))
    limits = [total.get(k, 0.0) / (v * r.num_workers) for k, v in per_worker if v > 0]
    return max(1, math.floor(min(limits, default=1) + 1e-9))


def _tune(spec: SweepSpec, base: str, state: SweepState, directory: Path, tracking: MlflowTracking,
          served_uri: str, resuming: bool) -> list[dict]:
    import ray.tune

    from bptt.private_api import head_node_resource

    name, storage = directory.name, str(directory.parent)
    tags = MlflowTracking().run_tags()  # what `bptt fit` tags its runs with: this command, bptt's version, commit
    runs = SweepRuns.open(served_uri, tracking, name, state.parent_run_id, spec=spec, base=base,
                          sweep_yaml=state.sweep_yaml, tags=tags)
    if state.parent_run_id is None:
        state.parent_run_id = runs.parent_run_id
        state.save(directory)
    context = SweepContext(base_yaml=Path(base).read_text(), spec=spec, runs=runs, storage_path=storage, cwd=state.cwd,
                           run_tags={k: v for k, v in tags.items() if k != "host"})  # the workers' hosts are others
    driver = {"CPU": spec.resources.driver_cpus} if spec.resources.driver_cpus > 0 else head_node_resource()
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context), driver)
    os.environ[SERVED_URI_ENV] = served_uri  # where ChildRunStatus, restored from an older start, writes
    status = ChildRunStatus(runs.experiment_id, runs.parent_run_id)
    concurrency = spec.max_concurrent_trials or _concurrency(spec)
    print(f"bptt sweep: experiment {directory}  (continue after a crash: bptt sweep --resume {directory})", flush=True)
    if resuming:
        tuner = ray.tune.Tuner.restore(str(directory), trainable, resume_unfinished=True, resume_errored=True)
    else:
        search = search_algorithm(spec, max_concurrent=concurrency)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=tune_space(spec.space),
            tune_config=ray.tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, scheduler=scheduler(spec),
                search_alg=search,  # Tune's own sampler limits itself; a Searcher is limited by max_concurrent_trials
                max_concurrent_trials=None if spec.search is None else concurrency,
            ),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=storage, stop=spec.stop or None, callbacks=[status],
                failure_config=ray.tune.FailureConfig(max_failures=spec.failure.trial_retries),
                checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=spec.tune_checkpoints_to_keep()),
                verbose=1,
            ),
        )
    results = tuner.fit()
    board = leaderboard(results, spec, runs)
    table = _format(board)
    best = next((row for row in board if row[f"best {spec.metric}"] is not None), None)
    best_config = resolved_config(base, spec, {k: best["config"][k] for k in spec.space}) if best else None
    runs.finish(metric=spec.metric, board=board, csv_text=_csv(board), table=table, best_config=best_config)
    if best is not None and best["mlflow_run"] is not None:
        _log_best_model(results, spec, runs, best)
    print(table)
    print(f"\nMLflow: {_ui_command(tracking)}  (experiment {tracking.experiment_name!r}, parent run {name})")
    return board


def leaderboard(results: Any, spec: SweepSpec, runs: SweepRuns) -> list[dict]:
    """One row per trial, best first: its best ``metric``, its values of the space (PBT: the latest
    perturbed ones), reports, status and MLflow run."""
    from ray.tune import ExperimentAnalysis

    trial_runs = {r.data.tags.get(TRIAL_TAG): r for r in runs.trial_runs()}
    analysis = ExperimentAnalysis(results.experiment_path)
    rows = []
    for trial in analysis.trials:
        history = analysis.trial_dataframes.get(trial.trial_id)
        values = history[spec.metric].dropna() if history is not None and spec.metric in history else None
        best = None if values is None or values.empty else float(values.min() if spec.mode == "min" else values.max())
        run = trial_runs.get(trial.trial_id)
        rows.append({
            "trial": trial.trial_id, "status": trial.status,
            f"best {spec.metric}": best, "reports": int(len(values)) if values is not None else 0,
            **{k: trial.config.get(k) for k in spec.space},
            "mlflow_run": run.info.run_id if run else None,
            "config": trial.config,
        })
    sign = 1 if spec.mode == "min" else -1
    rows.sort(key=lambda r: (r[f"best {spec.metric}"] is None, sign * (r[f"best {spec.metric}"] or 0.0)))
    return rows


def _columns(board: list[dict]) -> list[str]:
    """The leaderboard's printed columns (every key but the whole config)."""
    return [k for k in board[0] if k != "config"] if board else []


def _format(board: list[dict]) -> str:
    header = _columns(board)
    cells = [[_cell(row[k]) for k in header] for row in board]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells]]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _csv(board: list[dict]) -> str:
    out = io.StringIO()
    header = _columns(board)
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([[row[k] for k in header] for row in board])
    return out.getvalue()


def _log_best_model(results: Any, spec: SweepSpec, runs: SweepRuns, best: dict) -> None:
    """The best trial's run gets a logged model (from its best checkpoint) unless it logged one itself."""
    result = next((r for r in results if (r.metrics or {}).get("trial_id") == best["trial"]), None)
    checkpoint = None if result is None else result.get_best_checkpoint(spec.metric, spec.mode) or result.checkpoint
    if checkpoint is None:
        return
    try:
        with checkpoint.as_directory() as directory:
            runs.log_best_model(best["mlflow_run"], Path(directory) / CHECKPOINT_FILE, trusted=spec.trusted)
    except BpttError as err:  # the sweep's results stand; say why the model is missing
        print(f"bptt sweep: the best trial's model was not logged: {err}", flush=True)


def _ui_command(tracking: MlflowTracking) -> str:
    uri = tracking.uri()
    if is_local_store(uri):
        store = Path(uri.removeprefix("sqlite:///"))
        return f"mlflow ui --backend-store-uri {uri} --artifacts-destination {store.parent / 'mlartifacts'}"
    return f"open {uri}"


