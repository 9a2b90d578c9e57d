"""The run config: a jsonargparse parser whose every node maps onto keyword-only ``__init__`` arguments.

A config has these top-level keys::

    seed_everything: 0
    trainer: {...}                   # pytorch_lightning.Trainer arguments
    model: {class_path, init_args}   # the network, a plain nn.Module
    task: {class_path, init_args}    # the LightningModule on the TBPTT engine
    data: {class_path, init_args}    # the LightningDataModule
    tracking: {...}                  # bptt.tracking.mlflow_tracking.MlflowTracking: MLflow URI, experiment, run name
    checkpoint: {...}                # bptt.training.checkpointing.CheckpointPolicy: every_n_steps, keep_last

``model.vocab_size`` is filled in from the DataModule and ``task.model`` is the
instantiated network, as LightningCLI's ``link_arguments`` does. Dotted overrides on
the command line (``--model.hidden_size 512``) replace single values.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union, get_type_hints

import pytorch_lightning as pl
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from torch import nn

from bptt.config.packaged import resolve_config_args
from bptt.config.trust import TRUST_FLAG, UntrustedConfigError, check_args, jsonargparse_policy
from bptt.console import start_holding
from bptt.datamodules.resumable import ResumableDataModule
from bptt.errors import BpttError, ConfigError
from bptt.lightning_modules.tbptt import TBPTTModule
from bptt.tracking.mlflow_tracking import MlflowTracking
from bptt.training.checkpointing import CheckpointPolicy
from bptt.training.checks import check_trainer_config

# the Trainer's batch limits: an integer counts batches, a float is a fraction (Lightning's meaning)
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
PRECISIONS = "32-true, bf16-mixed, 16-mixed (GPU), bf16-true, 16-true, 64-true (or 32, 16, bf16, 64)"


def _vocab_size(data: Any) -> int | None:
    return getattr(data, "vocab_size", None)  # a forecaster's data has none, nor does its model take one


def build_parser(prog: str = "bptt fit") -> ArgumentParser:
    """The parser of ``bptt fit``; ``bptt validate``/``test``/``generate`` reuse it on a checkpoint's config."""
    parser = ArgumentParser(prog=prog, exit_on_error=False, allow_abbrev=False,
                            description="Train with truncated BPTT.")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML config, e.g. conf/lm/quickstart.yaml (bptt configs lists those shipped by name)")
    parser.add_argument("--seed_everything", type=int, default=0, help="seed of torch, numpy and random")
    parser.add_class_arguments(pl.Trainer, "trainer", instantiate=False, skip={"precision", *LIMITS})
    for name in LIMITS:  # Lightning types them float | int, which reads --trainer.limit_val_batches 1 as 1.0 (100%)
        parser.add_argument(f"--trainer.{name}", type=Optional[int | float], default=None,  # noqa: UP045 (a runtime type)
                            help=f"Lightning's {name}: an integer is a number of batches, a float a fraction of them")
    lightning_precision = get_type_hints(pl.Trainer.__init__)["precision"]
    parser.add_argument("--trainer.precision", type=Union[lightning_precision, Literal["auto"]],  # noqa: UP007
                        default=None, help="Lightning's precision (default 32-true), or auto: the fastest on this "
                        "machine for this run, measured over a few steps (bptt.training.precision)")
    parser.set_defaults({"trainer.use_distributed_sampler": False, "trainer.default_root_dir": "runs"})
    _add_components(parser)
    parser.add_class_arguments(MlflowTracking, "tracking")
    parser.add_class_arguments(CheckpointPolicy, "checkpoint")
    parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=_vocab_size, apply_on="instantiate")
    return parser


def _add_components(parser: ArgumentParser) -> None:
    """The network, the task built around it, and the DataModule."""
    parser.add_subclass_arguments(nn.Module, "model", required=True)
    parser.add_subclass_arguments(TBPTTModule, "task", required=True)
    parser.add_subclass_arguments(ResumableDataModule, "data", required=True)
    parser.link_arguments("model", "task.init_args.model", apply_on="instantiate")


def one_line(err: BaseException) -> str:
    """A parser or constructor error as one line: the first user-facing cause, else jsonargparse's
    message with its nested union explanation reduced to the branch that failed."""
    for cause in _chain(err):
        if isinstance(cause, BpttError):
            return str(cause)
    lines = [line.rstrip() for line in str(err).splitlines() if line.strip()]
    hint = "; `bptt fit --help-all` lists every key and type"
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("- ") and "NoneType" not in text:  # the class branch of "Optional[Class]"
            indent = len(line) - len(line.lstrip())
            detail = [text[2:]]
            for following in lines[i + 1 :]:
                if len(following) - len(following.lstrip()) <= indent:
                    break
                detail.append(following.strip())
            return f"{lines[0].strip()} {' '.join(detail)}{hint}"
    return " ".join(line.strip() for line in lines[:3]) + hint


def parse_config(
    args: list[str], parser: ArgumentParser | None = None, *, trusted: bool = False, source: str | None = None
) -> Namespace:
    """Parse ``--config FILE`` plus dotted overrides and check what the parser cannot.

    Every import path in ``args`` is checked against the allow-list (``bptt.config.trust``) before
    anything is parsed, since parsing imports what a config names.

    Args:
        args: ``--config FILE_OR_YAML_OR_NAME`` and dotted overrides; a name (``quickstart``,
            ``lm/tinyshakespeare_char``) is a config shipped in the package (``bptt.config.packaged``).
        parser: the parser to use (default: ``build_parser()``).
        trusted: the user vouches for the config (``--trust-config``): any import path goes.
        source: what the ``--config`` YAML is, for messages (e.g. "checkpoint runs/x/last.ckpt").

    Raises:
        ConfigError: unknown key, wrong type, code outside the allow-list, or a Trainer setting
            the TBPTT engine does not support.
    """
    args = resolve_config_args(args, "train")
    check_args(args, trusted=trusted, source=source)
    start_holding()  # what Lightning and MLflow print waits until the command's checks pass (bptt.console)
    parser = parser or build_parser()
    try:
        with jsonargparse_policy(trusted):
            cfg = parser.parse_args(args)
    except Exception as err:  # jsonargparse raises ArgumentError, ValueError or TypeError
        if "import path denylist" in str(err):  # jsonargparse's own policy (bptt.config.trust.jsonargparse_policy)
            denied = str(err).split("Importing ", 1)[-1].split(" is not allowed", 1)[0]
            raise UntrustedConfigError(
                f"{source or 'the config'} names code outside the allow-list: {denied} (jsonargparse's import-path "
                f"policy); if you wrote it yourself, pass {TRUST_FLAG}") from None
        if 'key "trainer.precision"' in str(err):  # its union of Literals would name only the first branch
            raise ConfigError(f"trainer.precision must be auto, or one of Lightning's: {PRECISIONS}") from None
        raise ConfigError(one_line(err)) from None
    check_trainer_config(cfg.trainer)
    if not 0 <= cfg.seed_everything < 2**32:
        raise ConfigError(f"seed_everything must be >= 0 and < 2**32 (numpy's seeds), got {cfg.seed_everything}")
    return cfg


def parse_tracking(args: list[str]) -> Namespace:
    """Only the ``--tracking.*`` options of ``args``, for commands that have no run config yet."""
    parser = ArgumentParser(prog="bptt", exit_on_error=False)
    parser.add_class_arguments(MlflowTracking, "tracking")
    picked = [a for i, a in enumerate(args)
              if a.startswith("--tracking.") or (i and args[i - 1].startswith("--tracking."))]
    try:
        return parser.parse_args(picked)
    except Exception as err:
        raise ConfigError(one_line(err)) from None


def build_without_data(cfg: Namespace) -> Namespace:
    """``cfg``'s DataModule, network and task built by their constructors alone, reading no data (a sweep's
    driver may have none): every constructor's checks run, and the network's parameter shapes are known.
    A vocabulary size, where the network takes one, is a placeholder: compare shapes within one data setting.

    Raises:
        ConfigError: a constructor rejected a value.
    """
    model = cfg.model.clone()
    if "vocab_size" in model.init_args:
        model.init_args.vocab_size = 2
    parser = ArgumentParser(exit_on_error=False)
    _add_components(parser)  # without build_parser's data -> vocabulary link, which would read the data
    try:
        return parser.instantiate(Namespace(model=model, task=cfg.task.clone(), data=cfg.data.clone()))
    except Exception as err:
        raise ConfigError(one_line(err)) from None  # one_line: a constructor's own message, when it gave one


def parameter_shapes(network: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of ``network``'s state (parameters and buffers), by name in the network's order."""
    return {name: tuple(value.shape) for name, value in network.state_dict().items()}


def instantiate(cfg: Namespace, parser: ArgumentParser | None = None) -> Namespace:
    """Build the DataModule, network and task of ``cfg``; ``trainer`` stays a namespace of arguments.

    Raises:
        BpttError: a constructor rejected a value, or the corpus cannot be read.
    """
    parser = parser or build_parser()
    try:
        return parser.instantiate(cfg)
    except Exception as err:
        cause = next((e for e in _chain(err) if isinstance(e, BpttError)), None)
        if cause is not None:
            raise cause from None
        raise


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    out: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out
