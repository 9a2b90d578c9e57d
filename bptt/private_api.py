"""Every use of a private attribute of Lightning, Ray, torch, datasets or jsonargparse that bptt cannot avoid.

Each function says what it reads and what breaks without it; tests/test_private_api.py fails
loudly (not silently) when an upgrade removes one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars


def pending_train_step_metrics(trainer: pl.Trainer) -> tuple[dict[str, float], int] | None:
    """The training-step metrics that Lightning sends to the loggers after ``on_train_batch_end``,
    with their step, or None when this step is not logged (``trainer.log_every_n_steps``).

    Lightning logs a step's metrics only after every ``on_train_batch_end`` hook, so after the
    step checkpoint written there: a process killed in between resumed after that step and never
    logged it. Reads ``trainer._logger_connector`` (``should_update_logs``, ``metrics``) and
    ``fit_loop.epoch_loop._batches_that_stepped``, and mirrors ``_LoggerConnector.log_metrics``.
    """
    if not logs_this_step(trainer):
        return None
    metrics: dict[str, Any] = convert_tensors_to_scalars(dict(trainer._logger_connector.metrics["log"]))
    if not metrics:
        return None
    step = metrics.pop("step", None)
    if step is not None:
        return metrics, int(step)
    metrics.setdefault("epoch", trainer.current_epoch)
    return metrics, trainer.fit_loop.epoch_loop._batches_that_stepped


def dataset_fingerprint(dataset: Any) -> str:
    """The fingerprint ``datasets`` gives a ``datasets.Dataset``: a hash of its source files (or
    content) and of every transform applied to it, the key of its own cache.

    ``TextStreamDataModule`` keys its tokenized cache files with it, so that a changed corpus is
    tokenized again. Reads ``Dataset._fingerprint`` (datasets has no public accessor); without it
    every corpus would need hashing of its whole text to find its cache entry.
    """
    return str(dataset._fingerprint)


def head_node_resource() -> dict[str, float]:
    """A resource request that places a task on the Ray cluster's head node: a sliver of the
    ``node:__internal_head__`` resource that Ray gives only the head (Ray Train places its own
    state actor so). A sweep's trial drivers take no CPU and run there, the node least likely to
    go away. Reads ``ray._common.constants.HEAD_NODE_RESOURCE_NAME``; without it, trial drivers
    with ``resources.driver_cpus: 0`` land on any node and die with a preempted worker node."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    return {HEAD_NODE_RESOURCE_NAME: 0.001}


def forward_train_reports(reports: Any) -> Any:
    """A Ray Train callback that puts ``(metrics of rank 0, checkpoint)`` on ``reports`` (a
    ``ray.util.queue.Queue``) after every ``ray.train.report``, in the Train controller, once the
    checkpoint is persisted. Uses ``ray.train.UserCallback.after_report``, a DeveloperAPI with no
    public counterpart in Train V2 that hands Tune a checkpoint (``TuneReportCallback`` passes only
    its path); without it a sweep's trials report nothing to Tune (no ASHA, no PBT, no restart).

    The class is made here, not at module level, so that cloudpickle carries it by value and the
    Train controller does not import this module (and Lightning with it)."""
    from ray.train import UserCallback

    class ForwardTrainReports(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            reports.put((metrics[0], checkpoint))

    return ForwardTrainReports()


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended (asked from
    ``on_train_batch_end``).

    A step checkpoint written before a due validation resumes by skipping that validation, so
    bptt writes none there (``last.ckpt``, written after it, stands in). Reads
    ``trainer.fit_loop.epoch_loop._should_check_val_fx`` and ``trainer.fit_loop._data_fetcher``;
    without them a resumed run would miss a validation and its MLflow history would differ.
    """
    return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def write_last_checkpoint(callback: Any, trainer: pl.Trainer) -> None:
    """Have a ``ModelCheckpoint(save_last=True)`` write ``last.ckpt`` now, outside Lightning's own
    schedule (after every validation, and where ``max_steps`` ends training), unless Lightning
    would skip it (sanity check, not fitting, already written at this step).

    Calls ``ModelCheckpoint._should_skip_saving_checkpoint``, ``_monitor_candidates`` and
    ``_save_last_checkpoint``; without them ``last.ckpt`` would hold the state of the last
    improvement only, and a finished run resumed with more steps would not continue as one run.
    """
    if not callback._should_skip_saving_checkpoint(trainer):
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning sends this training step's ``self.log`` values to the loggers
    (every ``trainer.log_every_n_steps`` batches, counted over optimizer-stepping batches; every batch
    under ``fast_dev_run``).

    The engine logs its diagnostics (throughput, gradient norm, clip and skip counts) only on
    those steps: a ``self.log`` costs about 1 ms, and the throughput clock must run between the
    steps that are logged. Reads ``trainer._logger_connector.should_update_logs``; without it the
    engine would log every step (slower) or guess the count Lightning keeps (wrong after a resume).
    """
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def step_unless(optimizer: Any, skip: Any) -> None:
    """``optimizer.step()`` that the device skips where the 0-dim tensor ``skip`` is non-zero: no host
    read decides it. Only for optimizers that take GradScaler's ``found_inf`` (``fused=True`` Adam,
    AdamW, SGD, ...: ``supports_device_skip``); parameters, moments and step counts stay as they were.

    Sets the attributes ``found_inf`` and ``grad_scale`` that ``torch.amp.GradScaler`` sets on such an
    optimizer for one ``step()`` (torch.optim's fused step functions read them); without them a
    skipped step would need the host to read the non-finite flag every step.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or Lightning's ``LightningOptimizer`` around one.
        skip: 0-dim tensor on the parameters' device; non-zero: leave everything unchanged.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf, inner.grad_scale = skip.float(), None
    try:
        optimizer.step()
    finally:
        del inner.found_inf, inner.grad_scale


def supports_device_skip(optimizer: Any) -> bool:
    """Whether ``step_unless`` can skip this optimizer's steps on the device (torch marks the
    optimizers whose step takes ``found_inf`` with ``_step_supports_amp_scaling``)."""
    return bool(getattr(getattr(optimizer, "optimizer", optimizer), "_step_supports_amp_scaling", False))


@contextmanager
def jsonargparse_import_paths_allowed(packages: tuple[str, ...]) -> Iterator[None]:
    """While inside, jsonargparse refuses to import any path given as a value unless it and the
    place its object is defined (``some.module.os.system`` is ``posix.system``) lie in ``packages``;
    on leaving, its import-path policy is as it was.

    Sets the policy with the public ``set_parsing_settings(import_path_denylist=["*"],
    import_path_allowlist=...)``, which jsonargparse keeps for the whole process and has no public
    way to undo; restoring it writes ``jsonargparse._common.parsing_settings`` (its
    ``import_path_verdicts`` and ``import_paths_enforced``). Without that, a command that trusts its
    config (``--trust-config``) after one that does not, in one process (the tests), could not
    import the code it was trusted with.
    """
    from jsonargparse import set_parsing_settings
    from jsonargparse._common import parsing_settings

    saved = {k: parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=list(packages))
    try:
        yield
    finally:
        parsing_settings.update(saved)
