"""Checkpoints that a long training resumes from exactly: atomic files, everything that decides
the next step, and the choice of which checkpoint to resume.

A checkpoint holds Lightning's state (model, optimizers, schedulers, precision scaler, loop
progress), the DataModule's read position and vocabulary, the engine's carried stream states
keyed by global stream index (``TBPTTModule.on_save_checkpoint``), and under ``"bptt"`` the
run's config, the MLflow run id and the RNG states of torch, numpy and Python. Everything is
tensors, numbers and strings: it loads with ``torch.load(weights_only=True)``.

Under ``"bptt_checksum"`` it carries a SHA-256 of all the rest (every tensor's dtype, shape and
bytes, every key, number and string), which ``load_checkpoint`` verifies: damage after writing
(a bad disk, a bad copy) stops with one line instead of resuming from wrong weights. The digest
is over the loaded content, not the file's bytes, so it rides along wherever the file is copied
and holds for remote paths and memory-mapped loading alike.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import socket
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from bptt import __version__
from bptt.errors import CheckpointError, ConfigError
from bptt.hardware import usable_cores
from bptt.metric_names import VAL_LOSS
from bptt.private_api import validation_follows, write_last_checkpoint

log = logging.getLogger(__name__)

CHECKSUM_KEY = "bptt_checksum"
_CHECKSUM_ALGORITHM = "sha256/canonical-1"  # names the encoding of ``content_digest``: a new encoding, a new name


class CheckpointPolicy:
    """When checkpoints are written (the ``checkpoint`` config node).

    Args:
        every_n_steps: write ``step-NNNNNNN.ckpt`` every this many optimizer steps.
        keep_last: keep this many of those, the newest.
    """

    def __init__(self, *, every_n_steps: int = 500, keep_last: int = 3) -> None:
        if every_n_steps < 1 or keep_last < 1:
            raise ConfigError(
                f"checkpoint.every_n_steps and checkpoint.keep_last must be >= 1, got {every_n_steps} and {keep_last}"
            )
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last

    def callbacks(self, directory: Path) -> list[ModelCheckpoint]:
        """Step checkpoints, ``best.ckpt`` (lowest ``val/loss``) at validations that improve it, and
        ``last.ckpt`` after every validation and at the end of training."""
        return [
            _StepCheckpoint(dirpath=directory, filename="step-{step:07d}", monitor="step", mode="max",
                            save_top_k=self.keep_last, every_n_steps=self.every_n_steps,
                            auto_insert_metric_name=False, enable_version_counter=False),
            # a resumed run writes into the same directory: replace, never add "-v1" copies
            ModelCheckpoint(dirpath=directory, filename="best", monitor=VAL_LOSS, mode="min",
                            enable_version_counter=False),
            _LastCheckpoint(dirpath=directory),
        ]


class _StepCheckpoint(ModelCheckpoint):
    """A checkpoint each time the step count passes a multiple of ``every_n_steps`` (a batch can
    take several optimizer steps when task.k1 is shorter than the window), except after a batch
    that a validation follows: Lightning resumes a checkpoint written before a due validation by
    skipping that validation, so there the ``last.ckpt`` written after it stands in.

    A resumed run writes and prunes as the uninterrupted run would: every checkpoint carries, with
    the files this callback keeps (Lightning's ``best_k_models``), the step of its last write, and
    the checkpoint a run resumed from is pruned in its turn (Lightning keeps that one for good)."""

    def __init__(self, *, every_n_steps: int, **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=1, **kwargs)
        self.every_n_steps = every_n_steps
        self.saved_at_step = 0  # the step of the run's last step checkpoint (none yet: as at step 0)
        self._trainer_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step // self.every_n_steps == self.saved_at_step // self.every_n_steps:
            return
        if validation_follows(trainer):
            return
        self._trainer_step = trainer.global_step
        self.saved_at_step = trainer.global_step  # before the write: the checkpoint carries it (state_dict)
        kept = set(self.best_k_models)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)  # writes: "step" is always a candidate
        self._remove_resumed_from(trainer, kept - set(self.best_k_models))

    def _remove_resumed_from(self, trainer: pl.Trainer, dropped: set[str]) -> None:
        """Delete the checkpoint the run resumed from once it drops out of the newest ``keep_last``:
        Lightning never deletes that one (``trainer.ckpt_path``), any other it deletes itself."""
        if trainer.ckpt_path is None or self.dirpath is None:
            return
        resumed_from = Path(trainer.ckpt_path).absolute()
        for path in dropped:
            if Path(path).absolute() == resumed_from and Path(self.dirpath).absolute() in resumed_from.parents:
                trainer.strategy.remove_checkpoint(path)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "saved_at_step": self.saved_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.saved_at_step = int(state_dict.get("saved_at_step", self.saved_at_step))  # absent: an older bptt's

    def format_checkpoint_name(self, metrics: dict[str, Any], *args: Any, **kwargs: Any) -> str:
        """``step-NNNNNNN.ckpt`` with the optimizer steps taken, also where the engine logs ``step`` (the
        loggers' x-axis, the index of the last step, which would otherwise stand in as the candidate)."""
        if self._trainer_step is not None:
            metrics = {**metrics, "step": torch.tensor(self._trainer_step)}
        return super().format_checkpoint_name(metrics, *args, **kwargs)


class _LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, the run's final state: after every validation (Lightning's ``save_last``
    writes it only when ``best.ckpt`` improved) and when training ends. When ``max_steps`` ends
    training after a batch that no validation follows, it is written at that batch's end, where
    a step checkpoint would be, so that a resume with a larger ``max_steps`` continues as the
    uninterrupted run would: by ``on_train_end`` Lightning has closed the epoch (its epoch-end
    hooks ran, e.g. an epoch-interval scheduler stepped) and a resume would count a new one. Any
    other end (``max_epochs``, early stopping, ``max_time``) writes it at ``on_train_end``."""

    def __init__(self, *, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)

    def _write_last(self, trainer: pl.Trainer) -> None:
        write_last_checkpoint(self, trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if 0 <= trainer.max_steps <= trainer.global_step and not validation_follows(trainer):
            self._write_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_last(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint with its checksum to a temporary file (``.NAME.PID@HOST.partial``),
    fsyncs it and renames it into place, so a crash mid-write leaves the previous checkpoint
    intact; loads with ``weights_only=True`` and verifies the checksum."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        checkpoint = with_checksum(checkpoint)
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.partial")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:  # e.g. a full disk: no partial file stays (a kill -9 leaves one: remove_stale_partials)
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return None

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True)
        _raise_problem(_loaded_problem(checkpoint, path), path)
        return checkpoint


def with_checksum(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` with the checksum of its content under ``CHECKSUM_KEY``."""
    content = {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY}
    return {**content, CHECKSUM_KEY: {"algorithm": _CHECKSUM_ALGORITHM, "digest": content_digest(content)}}


def verify_checksum(checkpoint: Any, path: Any) -> None:
    """Check a loaded checkpoint against the checksum it carries; one without a checksum (written
    before bptt wrote them) passes unchecked.

    Raises:
        CheckpointError: the content differs from what was written, or the checksum is not one
            this version of bptt computes.
    """
    _raise_problem(_checksum_problem(checkpoint), path)


def _raise_problem(problem: str | None, path: Any) -> None:
    if problem is not None:
        fix = "resume from an older checkpoint" if "mismatch" in problem else "upgrade bptt or use an older checkpoint"
        raise CheckpointError(f"checkpoint {path} {problem}; {fix}")


def _checksum_problem(checkpoint: Any) -> str | None:
    """What is wrong with the checkpoint's checksum, as a predicate ("is corrupt ..."); None: nothing."""
    if not isinstance(checkpoint, dict) or CHECKSUM_KEY not in checkpoint:
        return None
    stored = checkpoint[CHECKSUM_KEY]
    if not isinstance(stored, dict) or stored.get("algorithm") != _CHECKSUM_ALGORITHM:
        algorithm = stored.get("algorithm") if isinstance(stored, dict) else type(stored).__name__
        return f"carries a checksum of an unknown kind ({algorithm!r}): damaged, or written by a newer bptt"
    content = {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY}
    if content_digest(content) != stored.get("digest"):
        return "is corrupt (checksum mismatch): it was damaged after writing"
    return None


# Files this process found intact, by (path, size, modification time, stored checksum): resuming
# reads one file three times (to choose it, to read its config, in Lightning's load) but hashes it once.
_intact_files: set[tuple[str, int, int, str]] = set()


def _loaded_problem(checkpoint: Any, path: Any) -> str | None:
    """``_checksum_problem`` of a checkpoint just loaded from ``path``; a file unchanged since this
    process found it intact is not hashed again."""
    key = None
    if "://" not in str(path) and isinstance(checkpoint, dict):
        try:
            stat = os.stat(path)
            key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, repr(checkpoint.get(CHECKSUM_KEY)))
        except OSError:
            pass
    if key is not None and key in _intact_files:
        return None
    problem = _checksum_problem(checkpoint)
    if problem is None and key is not None:
        _intact_files.add(key)
    return problem


def content_digest(content: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``content`` in an unambiguous encoding (a tag, then a length or a count, then
    the content) that a ``torch.save`` / ``torch.load(weights_only=True)`` round trip preserves:
    dict order, and each tensor's dtype, shape and bytes wherever it lives. A tensor's bytes enter
    as the SHA-256 of each ``_CHUNK`` of them, hashed on several threads (hashlib lets go of the GIL)."""
    parts: list[bytes | Future[bytes]] = []
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        _encode(content, parts, pool)
        sha = hashlib.sha256()
        for part in parts:
            sha.update(part if isinstance(part, bytes) else part.result())
    return sha.hexdigest()


_CHUNK = 1 << 24  # 16 MiB; part of the encoding, like the algorithm


def _chunk_digest(flat: torch.Tensor, start: int) -> bytes:
    return hashlib.sha256(flat[start : start + _CHUNK].cpu().numpy()).digest()  # (N,) uint8; a GPU chunk copies


def _encode_tensor(value: torch.Tensor, parts: list[bytes | Future[bytes]], pool: ThreadPoolExecutor) -> None:
    tensor = value.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    tensor = tensor.resolve_conj().resolve_neg().contiguous()
    flat = tensor.reshape(-1).view(torch.uint8)  # (N,) its bytes
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    parts.append(b"%s%d:%s" % (b"T", len(header), header))
    parts.append(b"B%d:" % flat.numel())
    for start in range(0, flat.numel(), _CHUNK):
        small = flat.numel() - start < _CHUNK // 16 and flat.device.type == "cpu"  # not worth a thread
        parts.append(_chunk_digest(flat, start) if small else pool.submit(_chunk_digest, flat, start))


def _encode(value: Any, parts: list[bytes | Future[bytes]], pool: ThreadPoolExecutor) -> None:
    def atom(tag: bytes, payload: bytes) -> None:
        parts.append(b"%s%d:%s" % (tag, len(payload), payload))

    if isinstance(value, torch.Tensor):
        _encode_tensor(value, parts, pool)
    elif isinstance(value, Mapping):
        parts.append(b"D%d:" % len(value))
        for key, item in value.items():
            _encode(key, parts, pool)
            _encode(item, parts, pool)
    elif isinstance(value, (list, tuple)):
        parts.append(b"%s%d:" % (b"L" if isinstance(value, list) else b"U", len(value)))
        for item in value:
            _encode(item, parts, pool)
    elif isinstance(value, (set, frozenset)):  # no order survives a round trip: sort the items' digests
        parts.append(b"E%d:" % len(value))
        parts.extend(sorted(content_digest({"item": item}).encode() for item in value))
    elif isinstance(value, str):
        atom(b"S", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        atom(b"Y", bytes(value))
    elif value is None or isinstance(value, (bool, int, float, complex)):  # repr is exact and tells bool from int
        atom(b"N", repr(value).encode())
    else:  # torch.dtype, torch.device, ...: what weights_only admits besides the above
        atom(b"O", f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode())


def _rng_states() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunState(pl.Callback):
    """Puts the run's config, MLflow run id and RNG states into every checkpoint, and on resume
    restores the RNG states right before the first training step (after the sanity check and
    the new dataloader iterator, which draw random numbers an uninterrupted run drew earlier)."""

    def __init__(self, config_yaml: str, run_id: str | None = None) -> None:
        self.config_yaml = config_yaml
        self.run_id = run_id
        self._pending_rng: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["bptt"] = {"config": self.config_yaml, "version": __version__, "mlflow_run_id": self.run_id,
                              "rng": _rng_states()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._pending_rng = checkpoint.get("bptt", {}).get("rng")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_rng is not None:
            _set_rng_states(self._pending_rng)
            self._pending_rng = None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``bptt fit``, loaded with ``weights_only=True`` and its checksum verified.

    Raises:
        CheckpointError: missing, unreadable, truncated, corrupt (checksum mismatch) or not
            written by ``bptt fit``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .ckpt from a run's checkpoints/ directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); it is damaged or not a checkpoint"
        ) from None
    _raise_problem(_loaded_problem(checkpoint, path), path)
    run = checkpoint.get("bptt") if isinstance(checkpoint, dict) else None
    if not isinstance(run, dict) or not isinstance(run.get("config"), str) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} was not written by `bptt fit` (no run config inside); pass a bptt checkpoint")
    try:
        config = yaml.safe_load(run["config"])
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} carries a run config that is not a YAML mapping of settings; it was altered or "
                              "not written by `bptt fit`: pass a bptt checkpoint")
    return checkpoint


def latest_checkpoint(directory: Path) -> Path:
    """The intact checkpoint in ``directory`` with the most optimizer steps (``last.ckpt`` first
    among equals). Unreadable and corrupt ones are skipped with a warning naming them.

    Only the newest files are read whole (to verify their checksums, newest first, until one
    passes); of the others, memory mapping reads just the few pages that hold ``global_step``.

    Raises:
        CheckpointError: none there is intact.
    """
    def mapped(path: Path) -> dict[str, Any] | None:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            int(checkpoint["global_step"])
            return checkpoint
        except Exception as err:  # torch raises many types for a damaged file
            log.warning("skipping checkpoint %s: it cannot be read (%s)", path, type(err).__name__)
            return None

    loaded = {p: c for p in directory.glob("*.ckpt") if (c := mapped(p)) is not None}
    newest_first = sorted(loaded, key=lambda p: (int(loaded[p]["global_step"]), p.name == "last.ckpt", p.name),
                          reverse=True)
    for path in newest_first:
        problem = _loaded_problem(loaded[path], path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: it %s", path, problem)
    raise CheckpointError(f"no intact checkpoint in {directory}; pass a checkpoint path to bptt resume")


# .NAME.PID@HOST.partial (before hosts were named: .NAME.PID.partial)
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[^@/]+))?\.partial")
_FOREIGN_PARTIAL_AGE_S = 3600.0  # a write in progress changes its file far more often than this


def remove_stale_partials(directory: str | Path) -> list[Path]:
    """Delete the temporary files that checkpoint writes killed mid-way left in ``directory``
    (``AtomicCheckpointIO``'s ``.NAME.PID@HOST.partial``), but never one a live process may
    still be writing: on this host, those whose process is gone; from another host (a shared
    filesystem), those unchanged for an hour. Remote (``://``) and missing directories: nothing.

    Returns:
        the files deleted.
    """
    if "://" in str(directory) or not Path(directory).is_dir():
        return []
    here, now, removed = socket.gethostname(), time.time(), []
    for path in Path(directory).glob(".*.partial"):
        match = _PARTIAL.fullmatch(path.name)
        if match is None:
            continue
        try:
            if match["host"] in (None, here):
                if _process_exists(int(match["pid"])):
                    continue
            elif now - path.stat().st_mtime < _FOREIGN_PARTIAL_AGE_S:
                continue
            path.unlink()
        except FileNotFoundError:  # its writer renamed it into place, or another process removed it
            continue
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
