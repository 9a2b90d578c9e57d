"""``bptt fit`` and ``bptt resume``: one training run, read top to bottom as its phases.

    BUILD      the config's DataModule, network and task (``bptt.config.parser.instantiate``)
    CHECK      every check before anything is written (``bptt.training.checks``); ``trainer.precision:
               auto`` measured and the run rebuilt in the precision chosen (``bptt.training.precision``)
    OPEN       the MLflow run; ``config.yaml`` and the DataModule's files, written and logged
    FIT        ``trainer.fit`` from the checkpoint, if any; the test split after it for tasks that ask
    LOG        the curves, the best and last checkpoints, the logged model

Nothing happens at import time; ``bptt.commands`` and ``bptt.ray_jobs`` call these.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from jsonargparse import ArgumentParser, Namespace
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info

from bptt.config.parser import build_parser, instantiate, parse_config
from bptt.console import release as release_held_output
from bptt.directories import check_writable_directory
from bptt.metric_names import VAL_LOSS
from bptt.tracking.curves import curves_png
from bptt.tracking.logged_model import log_network
from bptt.tracking.mlflow_tracking import CHECKPOINT_DIR_TAG, MlflowTracking, tracking_uri_env_kept
from bptt.tracking.run_logger import DataInput, LogStepBeforeCheckpoint, RunLogger
from bptt.training import checks, precision
from bptt.training.checkpointing import RunState, load_checkpoint, remove_stale_partials
from bptt.training.resuming import changed_optimizer_settings, checkpoint_of
from bptt.training.trainer import Launch, build_trainer, quiet_known_warnings, trainer_node


def fit(cfg: Namespace, callbacks: list[Callback] | None = None) -> dict[str, float]:
    """Train the run that ``cfg`` describes (a parsed ``bptt fit`` config), as a new MLflow run.

    ``callbacks`` are added to the Trainer's (for example a sweep's reporting callback).

    Writes ``config.yaml``, the DataModule's artifacts (e.g. ``vocab.json``), CSV logs and
    checkpoints (``checkpoints/step-*.ckpt``, ``best.ckpt``, ``last.ckpt``) under
    ``trainer.default_root_dir``, and logs params, metrics, tags and artifacts to MLflow.

    Returns:
        the last logged metrics (``train/loss``, ``val/loss``, ...).
    """
    with tracking_uri_env_kept():
        return train(cfg, callbacks=callbacks or [])


def resume(
    target: str, overrides: list[str], callbacks: list[Callback] | None = None, *, trusted: bool = False
) -> dict[str, float]:
    """Continue a run from its newest checkpoint, in the same MLflow run, exactly where it stopped.

    Args:
        target: a checkpoint file, a run's ``checkpoints/`` directory, or an MLflow run id.
        overrides: dotted config overrides, e.g. ``["--trainer.devices", "1"]`` to continue on
            another number of processes (the streams are re-sharded).
        trusted: the checkpoint's config may name code outside the allow-list (``--trust-config``).
    """
    path = checkpoint_of(target, overrides)
    checkpoint = load_checkpoint(path)
    cfg = parse_config(["--config", checkpoint["bptt"]["config"], *overrides], trusted=trusted,
                       source=f"the config inside checkpoint {path}")
    checks.check_training_left(cfg.trainer, checkpoint, path)
    with tracking_uri_env_kept():
        return train(cfg, callbacks=callbacks or [], checkpoint=(path, checkpoint), trusted=trusted)


def train(
    cfg: Namespace,
    *,
    callbacks: list[Callback],
    checkpoint: tuple[Path, dict[str, Any]] | None = None,
    run_id: str | None = None,
    launch: Launch | None = None,
    trusted: bool = False,
) -> dict[str, float]:
    """Train ``cfg``, from ``checkpoint`` when given, logging to the MLflow run ``run_id`` (else
    the checkpoint's run, else a new one); ``launch``: the processes were started by Ray Train.

    Every check runs before anything is written: the config and the data, the store and the
    run to continue, the output directory, the Trainer's settings and the optimizer. A run that
    fails after that is marked FAILED in MLflow, never left RUNNING.
    """
    # ---------------------------------------------------------------- BUILD
    quiet_known_warnings()
    parser = build_parser()  # one for the run: instantiating, dumping and comparing its configs
    init = _build(cfg, parser)
    root, tracking = Path(cfg.trainer.default_root_dir), init.tracking

    # ---------------------------------------------------------------- CHECK
    if checkpoint is not None:
        checks.check_resume_matches(init, checkpoint[1], checkpoint[0])  # settings only: before data is read
    checks.check_window_fits(init)
    init.data.prepare_data()  # bad data fails here, before the Trainer starts anything
    if checkpoint is not None:
        checks.check_same_model(init.task, checkpoint[1], checkpoint[0])
        callbacks = [*callbacks, *changed_optimizer_settings(cfg, checkpoint[1], parser, trusted)]
    run_id = _check_tracking(tracking, run_id, checkpoint)
    check_writable_directory(root, label=f"trainer.default_root_dir={root}", fix="choose a writable directory")
    chosen = None
    if str(cfg.trainer.precision) == precision.AUTO:
        checks.check_optimizer(init.task)  # before the measurement trains with it
        if launch is None:  # the config's devices and strategy, before the measurement (Ray Train places its own)
            _checked_trainer(Namespace(**{**vars(trainer_node(init)), "precision": None}), [], None)  # 32-true
        cfg, chosen = precision.choose(cfg, parser, checkpoint[1] if checkpoint else None, launch)
        rank_zero_info(chosen.summary())
        init = _build(cfg, parser)  # as if the precision chosen had been configured
        init.data.prepare_data()
    config_yaml = parser.dump(cfg)  # the run, its checkpoints and a resume: the precision chosen
    state = RunState(config_yaml)
    checkpointing = cfg.trainer.enable_checkpointing is not False
    checkpoints = init.checkpoint.callbacks(root / "checkpoints") if checkpointing else []
    trainer = _checked_trainer(trainer_node(init), [*callbacks, state, LogStepBeforeCheckpoint(), *checkpoints], launch)
    checks.check_before_fit(trainer, init)
    release_held_output()  # every check passed: Lightning's banners of the Trainer above may print

    # ---------------------------------------------------------------- OPEN
    logger = _open_run(tracking, run_id, trainer, config_yaml, init, chosen, checkpoints, state)
    with logger.failed_on_error() if logger is not None else nullcontext():  # from here on the run exists in MLflow
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            (root / "config.yaml").write_text(config_yaml)
            if checkpoints:  # left by a process killed mid-write
                remove_stale_partials(root / "checkpoints")
        data_artifacts = init.data.save_artifacts(root) if trainer.is_global_zero else []
        if trainer.is_global_zero and logger is not None:  # a run stopped before fit returns has them too
            logger.log_artifacts([root / "config.yaml", *data_artifacts])

        # ------------------------------------------------------------ FIT
        with precision.handed_to_child_processes(chosen) if chosen is not None else nullcontext():
            trainer.fit(init.task, datamodule=init.data, ckpt_path=str(checkpoint[0]) if checkpoint else None)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}  # step: the x-axis
        if init.task.test_after_fit:  # e.g. the forecaster: test metrics and plot in the same run
            trainer.test(init.task, datamodule=init.data, ckpt_path=_best_path(checkpoints), verbose=False)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}

        # ------------------------------------------------------------ LOG
        if trainer.is_global_zero and logger is not None:
            curves = curves_png(logger.experiment, logger.run_id, root / "curves.png")
            logger.log_artifacts([curves])
            logger.log_artifacts([root / "checkpoints" / "best.ckpt", root / "checkpoints" / "last.ckpt"],
                                 "checkpoints")
            if tracking.log_model:
                log_network(init.task, tracking.uri(), logger.run_id)
    return metrics


def _build(cfg: Namespace, parser: ArgumentParser) -> Namespace:
    """The seeded DataModule, network and task of ``cfg`` (``trainer`` stays a namespace of arguments)."""
    pl.seed_everything(cfg.seed_everything, workers=True, verbose=False)
    return instantiate(cfg, parser)


def _check_tracking(
    tracking: MlflowTracking, run_id: str | None, checkpoint: tuple[Path, dict[str, Any]] | None
) -> str | None:
    """The store can be written and the run to continue (``run_id``, else the checkpoint's) is there;
    returns that run's id, None for a new run (or when ``tracking.enabled`` is false)."""
    if not tracking.enabled:
        return None
    tracking.check()
    run_id = run_id or (checkpoint[1]["bptt"].get("mlflow_run_id") if checkpoint else None)
    if run_id is not None:
        tracking.check_run(run_id, what=f"checkpoint {checkpoint[0]}" if checkpoint else "this trial")
    return run_id


def _checked_trainer(trainer_args: Namespace, callbacks: list[Callback], launch: Launch | None) -> pl.Trainer:
    trainer = build_trainer(trainer_args, callbacks=callbacks, launch=launch)
    checks.check_trainer_runs_here(trainer, trainer_args, launch.placement if launch else {})
    return trainer


def _open_run(
    tracking: MlflowTracking,
    run_id: str | None,
    trainer: pl.Trainer,
    config_yaml: str,
    init: Namespace,
    chosen: precision.PrecisionChoice | None,
    checkpoints: list[ModelCheckpoint],
    state: RunState,
) -> RunLogger | None:
    """The run's MLflow logger, first among the Trainer's loggers; on the global-zero process the run
    opened (or continued) with its params, dataset input, precision choice and checkpoint directory.
    None when ``tracking.enabled`` is false. MLflow's client creates a local store: only now."""
    if not tracking.enabled:
        return None
    data_input = DataInput.of(yaml.safe_load(config_yaml)["data"], init.data) if trainer.is_global_zero else None
    logger = tracking.logger(run_id=run_id, global_zero=trainer.is_global_zero)
    trainer.loggers = [logger, *trainer.loggers]  # bptt's CSV log and the config's own loggers stay
    if trainer.is_global_zero:
        with logger.failed_on_error():
            state.run_id = logger.run_id
            logger.log_config(yaml.safe_load(config_yaml))
            logger.log_data_input(data_input)
            if chosen is not None:
                logger.log_precision_choice(chosen)
            if checkpoints:
                root = Path(init.trainer.default_root_dir)
                logger.experiment.set_tag(logger.run_id, CHECKPOINT_DIR_TAG, str((root / "checkpoints").resolve()))
    return logger


def _best_path(checkpoints: list[ModelCheckpoint]) -> str | None:
    """The best checkpoint by ``val/loss`` written in this fit, if any."""
    return next((c.best_model_path for c in checkpoints if c.monitor == VAL_LOSS and c.best_model_path), None)
