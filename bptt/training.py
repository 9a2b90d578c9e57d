"""The importable entry points behind the ``bptt`` command: ``fit``, ``resume``, ``evaluate``, ``generate``,
``transcribe``, ``diagnose``.

Nothing happens at import time; ``bptt.cli`` and ``bptt.ray_jobs`` call these.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import Callback, ProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info

from bptt import precision
from bptt.checkpointing import (
    AtomicCheckpointIO,
    RunState,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_partials,
)
from bptt.console import release as release_held_output
from bptt.config import build_parser, check_window_fits, instantiate, parse_config, parse_tracking
from bptt.datamodules.text_corpus import Vocabulary
from bptt.directories import check_writable_directory
from bptt.errors import CheckpointError, ConfigError
from bptt.lightning_modules.language_model import LanguageModelTask
from bptt.lightning_modules.speech_recognizer import CTCSpeechTask
from bptt.lightning_modules.tbptt import StepLossModule
from bptt.metric_names import VAL_LOSS
from bptt.progress_bar import TimedProgressBar
from bptt.run_logger import LogStepBeforeCheckpoint, RunLogger
from bptt.tracking import CHECKPOINT_DIR_TAG, DataInput, MlflowTracking, curves_png, tracking_uri_env_kept


def _quiet_known_warnings() -> None:
    """Silence warnings that are about library internals, not about the user's run."""
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined.*")  # ours is exact
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning on torch 2.13
    # step checkpoints hold the state after the step, which is what resuming needs
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization and every_n_train_steps.*")


def _trainer(
    trainer_args: Namespace,
    *,
    callbacks: list[Callback],
    placement: dict[str, Any] | None = None,
) -> pl.Trainer:
    """A Trainer from the config's ``trainer`` node; ``placement`` (strategy, plugins, devices,
    accelerator) replaces the config's when the processes are started by someone else (Ray Train).

    Raises:
        ConfigError: Lightning refused a trainer setting (devices, strategy, accelerator, precision, ...),
            or it names more CPU processes than this machine has cores, or 16-bit mixed precision on a CPU.
    """
    args = dict(vars(trainer_args))
    callbacks = list(args.pop("callbacks") or []) + callbacks  # the engine logs the learning rate itself
    if args.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TimedProgressBar())  # Lightning's default bar redrawn at most 4 times a second
    if args.get("logger") is None:
        args["logger"] = [CSVLogger(save_dir=args["default_root_dir"], name="logs")]
    placement = dict(placement or {})
    args["plugins"] = [*(args.get("plugins") or []), *placement.pop("plugins", []), AtomicCheckpointIO()]
    args.update(placement)
    try:
        trainer = pl.Trainer(callbacks=callbacks, **args)
    except (MisconfigurationException, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the trainer settings do not work here: {first} (see `bptt fit --help`, trainer.*)") from None
    if isinstance(trainer.accelerator, CPUAccelerator):
        if str(trainer_args.precision) in ("16", "16-mixed") and "precision" not in placement:
            raise ConfigError(f"trainer.precision={trainer_args.precision} needs a GPU; on a CPU use bf16-mixed "
                              "(or 32-true)")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if "devices" not in placement and trainer.num_devices > cores:
            raise ConfigError(f"trainer.devices={trainer_args.devices} asks for {trainer.num_devices} CPU processes but "
                              f"this machine has {cores} cores; set trainer.devices <= {cores}")
    return trainer


def _windows_per_batch(init: Namespace) -> Namespace:
    """The trainer settings for Lightning, and the engine's window, when a batch holds m windows.

    With ``data.windows_per_batch`` m > 1 every optimizer step takes one window of ``data.bptt``
    steps (the engine's ``task.k1``) and a batch m of them. Users give every interval in optimizer
    steps; Lightning counts some in batches: an integer ``trainer.val_check_interval`` reaches it
    divided by m (so it must be a multiple of m), ``trainer.log_every_n_steps`` divided and rounded
    down (every ``n // m`` batches). ``trainer.max_steps`` stays (Lightning counts optimizer steps)
    but must be a multiple of m too: training stops only at a batch's end.

    Returns:
        the ``trainer`` node to build the Trainer from (``init.trainer`` itself when m = 1).

    Raises:
        ConfigError: ``task.k1`` other than ``data.bptt``, or an interval that is not a multiple of m.
    """
    m = getattr(init.data, "windows_per_batch", 1)
    if m == 1:
        return init.trainer
    bptt, task = init.data.bptt, init.task
    if task.k1 is None:
        task.k1 = task.k2 = bptt
    elif task.k1 != bptt:
        raise ConfigError(f"data.windows_per_batch={m} makes every optimizer step one window of data.bptt={bptt} "
                          f"steps, but task.k1={task.k1}; drop task.k1 or set it to {bptt}")
    trainer = Namespace(**vars(init.trainer))
    for key in ("val_check_interval", "max_steps"):
        value = trainer[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % m:
            raise ConfigError(f"trainer.{key}={value} counts optimizer steps and a batch takes "
                              f"data.windows_per_batch={m} of them; make it a multiple of {m}")
    if isinstance(trainer.val_check_interval, int) and not isinstance(trainer.val_check_interval, bool):
        trainer.val_check_interval //= m
    if trainer.log_every_n_steps:
        trainer.log_every_n_steps = max(1, trainer.log_every_n_steps // m)
    return trainer


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
    path = Path(target)
    if path.is_dir():
        path = latest_checkpoint(path)
    elif not path.exists() and not target.endswith(".ckpt") and "/" not in target:
        path = latest_checkpoint(_checkpoint_dir_of_run(target, overrides))
    checkpoint = load_checkpoint(path)
    cfg = parse_config(["--config", checkpoint["bptt"]["config"], *overrides], trusted=trusted,
                       source=f"the config inside checkpoint {path}")
    _check_training_left(cfg.trainer, checkpoint, path)
    with tracking_uri_env_kept():
        return train(cfg, callbacks=callbacks or [], checkpoint=(path, checkpoint), trusted=trusted)


def _check_training_left(trainer: Namespace, checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint that trainer.max_steps or trainer.max_epochs already stops (Lightning
    would reopen the run, train nothing and close it again), with the override that continues it. Epochs:
    where the checkpoint records the last one as ended (not one saved by the validation at its last step)."""
    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    max_steps = -1 if trainer.max_steps is None else trainer.max_steps
    max_epochs = trainer.max_epochs
    if max_epochs is None:  # Lightning's default: 1000 epochs unless max_steps is set
        max_epochs = 1000 if max_steps == -1 else -1
    if isinstance(step, int) and max_steps != -1 and step >= max_steps:
        raise ConfigError(f"checkpoint {path} is at step {step} and trainer.max_steps={max_steps} is reached: "
                          f"nothing is left to train; pass --trainer.max_steps above {step} to train further")
    if isinstance(epoch, int) and max_epochs != -1 and epoch >= max_epochs:
        raise ConfigError(f"checkpoint {path} has finished {epoch} epochs and trainer.max_epochs={max_epochs} is "
                          f"reached: nothing is left to train; pass --trainer.max_epochs above {epoch} to train "
                          "further")


def _checkpoint_dir_of_run(run_id: str, overrides: list[str]) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking = MlflowTracking(**vars(parse_tracking(overrides).tracking))
    uri, local = tracking.uri(), tracking.local_store()
    if local is not None and not local.exists():  # MLflow's client would create an empty store there
        raise CheckpointError(f"{run_id!r} is neither a checkpoint file nor a run id: there is no MLflow store at "
                              f"{uri}; pass a checkpoint path, or --tracking.tracking_uri naming the run's store")
    tracking.check()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"{run_id!r} is neither a checkpoint file nor a run id at {tracking.uri()}; pass a checkpoint path "
            "or --tracking.tracking_uri"
        ) from None
    if CHECKPOINT_DIR_TAG not in run.data.tags:
        raise CheckpointError(f"run {run_id} has no {CHECKPOINT_DIR_TAG} tag; pass its checkpoint path instead")
    return Path(run.data.tags[CHECKPOINT_DIR_TAG])


def train(
    cfg: Namespace,
    *,
    callbacks: list[Callback],
    checkpoint: tuple[Path, dict[str, Any]] | None = None,
    run_id: str | None = None,
    placement: dict[str, Any] | None = None,
    prepare: Callable[[pl.Trainer], pl.Trainer] | None = None,
    agree: Callable[[Callable[[], str]], str] | None = None,
    trusted: bool = False,
) -> dict[str, float]:
    """Train ``cfg``, from ``checkpoint`` when given, logging to the MLflow run ``run_id`` (else
    the checkpoint's run, else a new one); ``placement``, ``prepare`` and ``agree`` are for processes
    that Ray Train started (its strategy and environment, ``ray.train.lightning.prepare_trainer``, and
    rank 0's answer for every rank: ``trainer.precision: auto``).

    Every check runs before anything is written: the config and the data, the store and the
    run to continue, the output directory, the Trainer's settings and the optimizer. A run that
    fails after that is marked FAILED in MLflow, never left RUNNING.
    """
    _quiet_known_warnings()
    parser = build_parser()
    config_yaml = parser.dump(cfg)
    pl.seed_everything(cfg.seed_everything, workers=True, verbose=False)
    init = instantiate(cfg, parser)
    if checkpoint is not None and hasattr(init.data, "check_resume"):  # settings only: before data is read
        init.data.check_resume(checkpoint[1].get(type(init.data).__qualname__), f"checkpoint {checkpoint[0]}")
    check_window_fits(init)
    init.data.prepare_data()  # bad data fails here, before the Trainer starts anything
    if checkpoint is not None:
        _check_same_model(init.task, checkpoint[1], checkpoint[0])
        callbacks = [*callbacks, *_changed_optimizer_settings(cfg, checkpoint[1], parser, trusted)]
    tracking: MlflowTracking = init.tracking
    tracking.check()
    run_id = run_id or (checkpoint[1]["bptt"].get("mlflow_run_id") if checkpoint else None)
    if run_id is not None:
        tracking.check_run(run_id, what=f"checkpoint {checkpoint[0]}" if checkpoint else "this trial")
    root = Path(cfg.trainer.default_root_dir)
    check_writable_directory(root, label=f"trainer.default_root_dir={root}", fix="choose a writable directory")
    chosen = None
    if str(cfg.trainer.precision) == precision.AUTO:
        _check_optimizer(init)  # before the measurement trains with it
        if placement is None:  # the config's devices and strategy, before the measurement (Ray Train places its own)
            _trainer(Namespace(**{**vars(_windows_per_batch(init)), "precision": None}), callbacks=[])  # 32-true
        cfg, chosen = _auto_precision(cfg, parser, checkpoint, placement, agree)
        rank_zero_info(chosen.summary())
        config_yaml = parser.dump(cfg)  # the run, its checkpoints and a resume: the precision chosen
        pl.seed_everything(cfg.seed_everything, workers=True, verbose=False)  # as if it had been configured
        init = instantiate(cfg, parser)
        init.data.prepare_data()
    state = RunState(config_yaml)
    checkpoints = init.checkpoint.callbacks(root / "checkpoints") if cfg.trainer.enable_checkpointing is not False else []
    callbacks = [*callbacks, state, LogStepBeforeCheckpoint(), *checkpoints]
    trainer = _trainer(_windows_per_batch(init), callbacks=callbacks, placement=placement)
    if prepare is not None:
        trainer = prepare(trainer)
    _preflight(trainer, init)
    release_held_output()  # every check passed: Lightning's banners of the Trainer above may print
    data_input = DataInput.of(yaml.safe_load(config_yaml)["data"], init.data) if trainer.is_global_zero else None
    # MLflow's client creates a local store: only now
    logger = tracking.logger(run_id=run_id, global_zero=trainer.is_global_zero)
    if cfg.trainer.logger is None:  # the config's own loggers, when it names some, replace bptt's
        trainer.loggers = [logger, *trainer.loggers]
    with logger.failed_on_error():  # from here on the run exists in MLflow
        if trainer.is_global_zero:
            state.run_id = logger.run_id
            logger.log_config(yaml.safe_load(config_yaml))
            logger.log_data_input(data_input)
            if chosen is not None:
                logger.log_precision_choice(chosen)
            if checkpoints:
                logger.experiment.set_tag(logger.run_id, CHECKPOINT_DIR_TAG, str((root / "checkpoints").resolve()))
            root.mkdir(parents=True, exist_ok=True)
            (root / "config.yaml").write_text(config_yaml)
            if checkpoints:  # left by a process killed mid-write
                remove_stale_partials(root / "checkpoints")
        data_artifacts = init.data.save_artifacts(root) if trainer.is_global_zero and hasattr(init.data, "save_artifacts") else []
        with precision.handed_to_child_processes(chosen) if chosen is not None else nullcontext():
            trainer.fit(init.task, datamodule=init.data, ckpt_path=str(checkpoint[0]) if checkpoint else None)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}  # step: the x-axis
        if getattr(init.task, "test_after_fit", False):  # e.g. the forecaster: test metrics and plot in the same run
            best = next((c.best_model_path for c in checkpoints if c.monitor == VAL_LOSS and c.best_model_path), None)
            trainer.test(init.task, datamodule=init.data, ckpt_path=best, verbose=False)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step"}
        if trainer.is_global_zero:
            _log_artifacts(logger, tracking, root, init.task, data_artifacts)
    return metrics


def _preflight(trainer: pl.Trainer, init: Namespace) -> None:
    """What would otherwise fail inside ``trainer.fit``, after the run was written: the optimizer
    and scheduler settings, and the data on this many processes (e.g. streams that do not divide
    over the ranks).

    Raises:
        ConfigError: the optimizer or scheduler refuses its settings, the task's settings do not work
            under the trainer's precision, or the data cannot be split.
    """
    _check_optimizer(init)
    init.task.check_precision(trainer.precision_plugin)
    init.data.trainer = trainer  # rank and world size, as Lightning attaches it in fit
    try:
        init.data.setup("fit")
        _check_validation_interval(trainer, init)
    finally:
        init.data.trainer = None


def _check_validation_interval(trainer: pl.Trainer, init: Namespace) -> None:
    """An integer ``trainer.val_check_interval`` within an epoch's batches, as Lightning requires unless
    ``trainer.check_val_every_n_epoch`` is null (it would raise inside fit, after the run was written)."""
    interval, limit = trainer.val_check_interval, trainer.limit_train_batches
    if not isinstance(interval, int) or isinstance(interval, bool) or trainer.check_val_every_n_epoch is None:
        return
    try:
        batches = len(init.data.train_dataloader())
    except TypeError:  # a loader without a length: Lightning cannot check it either
        return
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    if interval > batches:
        m = getattr(init.data, "windows_per_batch", 1)
        raise ConfigError(
            f"trainer.val_check_interval={interval * m} is more than the {batches * m} optimizer steps of an epoch "
            "(per process); lower it, or set trainer.check_val_every_n_epoch: null to count it across epochs"
        )


def _check_optimizer(init: Namespace) -> None:
    """The optimizer and scheduler settings, by building them once.

    Raises:
        ConfigError: the optimizer or scheduler refuses its settings.
    """
    try:
        init.task.configure_optimizers()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"task.optimizer / task.lr_scheduler: {str(err).strip().splitlines()[0]}; fix the value in "
                          "the config") from None


def _auto_precision(
    cfg: Namespace,
    parser: Any,
    checkpoint: tuple[Path, dict[str, Any]] | None,
    placement: dict[str, Any] | None,
    agree: Callable[[Callable[[], str]], str] | None,
) -> tuple[Namespace, precision.PrecisionChoice]:
    """``cfg`` with ``trainer.precision: auto`` replaced by a precision, and the choice: a resumed run's
    own (its checkpoint's config), else the fastest measured on the run's task and data (``bptt.precision``)."""
    cfg = cfg.clone()
    saved = yaml.safe_load(checkpoint[1]["bptt"]["config"])["trainer"].get("precision") if checkpoint else None
    if saved not in (None, precision.AUTO):
        cfg.trainer.precision = saved
        return cfg, precision.PrecisionChoice(str(saved), {}, "the checkpoint's run", cached=True)
    accelerator = (placement or {}).get("accelerator") or str(cfg.trainer.accelerator)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator not in ("cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.precision: auto measures on cpu or gpu, not trainer.accelerator={accelerator}; "
                          "set trainer.precision")
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    shape = {k: v for k, v in yaml.safe_load(parser.dump(cfg)).items() if k in ("model", "task", "data")}

    def build() -> tuple[pl.LightningModule, pl.LightningDataModule]:
        probe = instantiate(cfg, parser)
        probe.data.prepare_data()
        _windows_per_batch(probe)  # a batch of m windows: the task's k1, as the run will have it
        return probe.task, probe.data

    choice = precision.resolve(accelerator, shape, build, agree)
    cfg.trainer.precision = choice.precision
    return cfg, choice


class _OptimizerSettings(Callback):
    """Puts the configured optimizer settings (lr, weight decay, ...) into the optimizer after its
    state came back from a checkpoint taken under other settings: the checkpoint's would win."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.update({k: v for k, v in self.settings.items() if k in group})
        for config in trainer.lr_scheduler_configs:
            if "lr" in self.settings and hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [self.settings["lr"]] * len(config.scheduler.base_lrs)


def _changed_optimizer_settings(cfg: Namespace, checkpoint: dict[str, Any], parser: Any, trusted: bool) -> list[Callback]:
    """An ``_OptimizerSettings`` callback when ``cfg`` sets the optimizer otherwise than the
    checkpoint's run did (``bptt resume ... --task.optimizer.init_args.lr``, or a PBT exploit)."""
    def settings(config: Namespace) -> dict[str, Any]:
        optimizer = config.task.init_args.get("optimizer")
        return dict(vars(optimizer.init_args)) if optimizer is not None and optimizer.get("init_args") else {}

    new = settings(cfg)
    old = settings(parse_config(["--config", checkpoint["bptt"]["config"]], parser, trusted=trusted,
                                source="the config inside the checkpoint"))
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    return [_OptimizerSettings(changed)] if changed else []


def _log_artifacts(
    logger: RunLogger, tracking: MlflowTracking, root: Path, task: pl.LightningModule, data_artifacts: list[Path]
) -> None:
    """The run's config, the DataModule's files (vocabulary, data report), best and last checkpoints,
    curves, and the final network."""
    curves = curves_png(logger.experiment, logger.run_id, root / "curves.png")
    logger.log_artifacts([root / "config.yaml", *data_artifacts, curves])
    logger.log_artifacts([root / "checkpoints" / "best.ckpt", root / "checkpoints" / "last.ckpt"], "checkpoints")
    if tracking.log_model and hasattr(task, "serving_model"):
        _log_network(task, tracking.uri(), logger.run_id)


def log_model(checkpoint_path: str | Path, *, tracking_uri: str, run_id: str, trusted: bool = False) -> bool:
    """Log a checkpoint's network into the MLflow run ``run_id`` as ``bptt fit`` logs its final one
    (a sweep's best trial, trained without ``tracking.log_model``).

    Returns:
        whether a model was logged (False for tasks without a serving model).
    """
    _, init, checkpoint = restore(checkpoint_path, [], trusted)
    if not hasattr(init.task, "serving_model"):
        return False
    init.task.load_state_dict(checkpoint["state_dict"])
    _log_network(init.task, tracking_uri, run_id)
    return True


def _log_network(task: pl.LightningModule, tracking_uri: str, run_id: str) -> None:
    """``task.serving_model()`` as the run's logged model, with its signature and the bptt package."""
    import mlflow
    from mlflow.models import infer_signature

    network, example = task.serving_model()
    with torch.no_grad():
        signature = infer_signature(example.numpy(), network(example).numpy())
    mlflow.set_tracking_uri(tracking_uri)
    # pickle, not pt2: torch.export unrolls the RNN over the example's length and fixes T
    # its warning about pickle concerns loading models from elsewhere, not this run: keep it off the user's screen
    quiet, level = logging.getLogger("mlflow.pytorch"), logging.getLogger("mlflow.pytorch").level
    quiet.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(network, name="model", input_example=example.numpy(), signature=signature,
                                     pip_requirements=[f"torch=={torch.__version__}"], serialization_format="pickle",
                                     code_paths=[str(Path(__file__).parent)])  # the bptt package rides along
    finally:
        quiet.setLevel(level)


def restore(
    checkpoint_path: str | Path, overrides: list[str], trusted: bool, checkpoint: dict[str, Any] | None = None
) -> tuple[Namespace, Namespace, dict[str, Any]]:
    """Rebuild a checkpoint's run: (config, instantiated objects, checkpoint); its config may name
    code outside the allow-list only when ``trusted``. ``checkpoint``: the file already loaded
    (``load_checkpoint``), when the caller read it first."""
    _quiet_known_warnings()
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(checkpoint_path)
    datamodule_state = next((v for v in checkpoint.values() if isinstance(v, dict) and "vocab" in v), None)
    parser = build_parser()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--config", checkpoint["bptt"]["config"], *overrides]
        if datamodule_state is not None:
            vocab_file = Path(tmp) / "vocab.json"
            Vocabulary.from_state_dict(datamodule_state["vocab"]).save(vocab_file)
            args += ["--data.vocab_file", str(vocab_file)]
        cfg = parse_config(args, parser, trusted=trusted, source=f"the config inside checkpoint {checkpoint_path}")
        init = instantiate(cfg, parser)
    _check_same_model(init.task, checkpoint, checkpoint_path)
    release_held_output()  # the checkpoint and its config passed
    data_state = checkpoint.get(type(init.data).__qualname__)
    if data_state is not None and datamodule_state is None:  # e.g. the speech features' normalization
        init.data.load_state_dict(data_state)
    return cfg, init, checkpoint


def _check_same_model(task: pl.LightningModule, checkpoint: dict[str, Any], path: str | Path) -> None:
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    if expected != found:
        differing = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
        raise CheckpointError(
            f"{path} holds a different model than its config builds (differs at {differing[:3]}); "
            "drop the --model overrides or pass the matching checkpoint"
        )


def evaluate(
    checkpoint_path: str | Path, stage: Literal["validate", "test"], overrides: list[str], *, trusted: bool = False
) -> dict[str, float]:
    """Run the validation or test split through a checkpoint's model with state carried.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``bptt fit``.
        stage: ``validate`` or ``test``.
        overrides: dotted config overrides, e.g. ``["--data.data_dir", "/data"]``.
        trusted: the checkpoint's config may name code outside the allow-list (``--trust-config``).

    Returns:
        the split's metrics (``val/loss`` and ``val/ppl``, or ``test/...``).
    """
    _, init, _ = restore(checkpoint_path, overrides, trusted)
    trainer = _trainer(init.trainer, callbacks=[])
    run = trainer.validate if stage == "validate" else trainer.test
    results = run(init.task, datamodule=init.data, ckpt_path=str(checkpoint_path), verbose=True)
    return {k: float(v) for k, v in results[0].items()}


def generate(
    checkpoint_path: str | Path, *, prompt: str, num_tokens: int, temperature: float, seed: int, trusted: bool = False
) -> str:
    """Sample text from a language-model checkpoint.

    Returns:
        ``prompt`` followed by ``num_tokens`` sampled tokens, decoded.
    """
    if num_tokens < 1 or not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"need --num-tokens >= 1 and a finite --temperature >= 0, got {num_tokens} and {temperature}")
    _, init, checkpoint = restore(checkpoint_path, [], trusted)
    task = init.task
    if not isinstance(task, LanguageModelTask):
        raise CheckpointError(f"{checkpoint_path} is a {type(task).__name__} checkpoint; generate needs a language model")
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    vocab = init.data.vocab
    ids = vocab.encode(prompt or "\n")
    if not ids:
        raise ConfigError(f"the prompt {prompt!r} has no tokens at level {vocab.level!r}; give some text")
    generator = torch.Generator().manual_seed(seed)
    sample = task.generate(torch.tensor([ids]), num_tokens, temperature, generator)  # (1, N)
    return prompt + vocab.decode(sample[0].tolist())


def transcribe(checkpoint_path: str | Path, audio: list[str], *, trusted: bool = False) -> list[str]:
    """Greedy transcripts of audio files by a speech-recognition checkpoint.

    Args:
        checkpoint_path: a ``.ckpt`` of a ``CTCSpeechTask`` run.
        audio: WAV or FLAC files (resampled to the run's sample rate).

    Returns:
        one transcript per file, in order.
    """
    if not audio:
        raise ConfigError("`bptt transcribe` needs audio files after the checkpoint, e.g. bptt transcribe last.ckpt a.wav")
    _, init, checkpoint = restore(checkpoint_path, [], trusted)
    task = init.task
    if not isinstance(task, CTCSpeechTask):
        raise CheckpointError(f"{checkpoint_path} is a {type(task).__name__} checkpoint; transcribe needs a speech model")
    features = [init.data.featurize(path) for path in audio]  # each (T, F); unreadable audio fails here
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    return [init.data.decode(ids) for ids in task.transcribe(features)]


def diagnose(target: str, overrides: list[str], *, probe_steps: int, warmup_steps: int, probes: int, eps: float,
             out: Path | None = None, trusted: bool = False) -> str:
    """Gradient-through-time curve of a run's network on its training data, and the truncation it suggests.

    Args:
        target: a run config (YAML: a freshly initialized network) or a checkpoint (its trained network).
        overrides: dotted config overrides.
        probe_steps: K, how many steps back to measure.
        warmup_steps: steps before each probe that warm the state up.
        probes: probe windows averaged, from consecutive training batches.
        eps: the fraction of the tau = 0 gradient that defines the suggestion.
        out: also write the curve there (.json, and a .png beside it).
        trusted: the config may name code outside the allow-list (``--trust-config``).

    Returns:
        the report: a table of g(tau) / g(0) per layer and the suggested truncation.
    """
    from bptt.gradient_diagnostics import curve_report, save_curve
    from bptt.gradient_diagnostics import diagnose as measure

    if probe_steps < 1 or warmup_steps < 0 or probes < 1 or not 0 < eps < 1:
        raise ConfigError(f"need --probe-steps >= 1, --warmup-steps >= 0, --probes >= 1 and 0 < --eps < 1; got "
                          f"{probe_steps}, {warmup_steps}, {probes}, {eps}")
    if out is not None:
        check_writable_directory(out.parent, label=f"--out={out.parent}", fix="choose a writable directory")
    if target.endswith((".yaml", ".yml")):
        _quiet_known_warnings()
        parser = build_parser()
        cfg = parse_config(["--config", target, *overrides], parser, trusted=trusted)
        pl.seed_everything(cfg.seed_everything, workers=True, verbose=False)
        init = instantiate(cfg, parser)
    else:
        _, init, checkpoint = restore(target, overrides, trusted)
        init.task.load_state_dict(checkpoint["state_dict"])
    if not isinstance(init.task, StepLossModule):
        raise ConfigError(f"{type(init.task).__name__} has a loss over whole sequences; bptt diagnose needs a per-step "
                          "loss (language models, forecasters, the synthetic tasks)")
    init.data.prepare_data()
    init.data.setup("fit")
    if hasattr(init.task, "use_data"):
        init.task.use_data(init.data.forecast_data())
    curve = measure(init.task, iter(init.data.train_dataloader()), probe_steps=probe_steps,
                    warmup_steps=warmup_steps, probes=probes)
    if out is not None:
        save_curve(curve, eps, out)
    return curve_report(curve, eps)
