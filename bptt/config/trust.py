"""Which code a config may name: the allow-list, checked on what an import path resolves to.

A run config names code twice over: every ``class_path`` is imported and instantiated, and a
string given where a callable is expected (``lr_lambda: os.system``) is imported and called.
Configs travel inside checkpoints, sweep state and MLflow artifacts, so a config from elsewhere
must never choose what runs. Unless the user passes ``--trust-config`` (a config they wrote
themselves), every import path in a config must name a class that

- is reached from one of ``ALLOWED_PACKAGES`` module by module: each step either imports a
  submodule of that package or reads an attribute, and a module read as an attribute must be
  that very submodule (``bptt.training.checkpointing.os`` is the module ``os`` reached through
  ``bptt.training.checkpointing``: refused);
- is defined in one of those packages (its ``__module__``): ``bptt.training.run.Path`` is pathlib's;
- is of a kind its key takes (``_slot_kinds``: an optimizer is an ``Optimizer``, a callback a
  ``Callback``, ...; under any other key one of those kinds). No config needs a function, so none
  is allowed.

The check reads the raw YAML and the command-line overrides, never the parsed config (parsing
imports), and imports nothing outside the allowed packages while resolving: it stops at the first
step that leaves them. It looks at every ``class_path`` value and at every other string that reads
as a dotted import path of an importable module (``os.system``, ``this.Model``).

``jsonargparse_policy`` then holds jsonargparse itself to the same packages while it parses (its
import-path policy checks where the object it resolved is defined), so a path this reading of the
YAML missed is still refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bptt.errors import ConfigError

TRUST_FLAG = "--trust-config"

# The project's own code, torch's optimizers, schedulers and layers, Lightning's callbacks and loggers.
ALLOWED_PACKAGES = ("bptt", "torch.optim", "torch.nn", "pytorch_lightning.callbacks", "pytorch_lightning.loggers")
ALLOWED = ", ".join(f"{p}.*" for p in ALLOWED_PACKAGES)

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_SEGMENTS = re.compile(r"[.\[\]+]+")


class UntrustedConfigError(ConfigError):
    """A config names code outside the allow-list."""


class _Refused(Exception):
    """Why an import path is refused (the reason, as a phrase after the path)."""


def _slot_kinds() -> dict[str, tuple[type, ...]]:
    """What the object under each config key must be (imported here, not at module level: the
    command line answers ``--help`` without torch)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import Logger

    from bptt.datamodules.resumable import ResumableDataModule
    from bptt.lightning_modules.tbptt import TBPTTModule

    return {
        "model": (torch.nn.Module,),
        "core": (torch.nn.Module,),
        "task": (TBPTTModule,),
        "data": (ResumableDataModule,),
        "optimizer": (torch.optim.Optimizer,),
        "lr_scheduler": (torch.optim.lr_scheduler.LRScheduler,),
        "callbacks": (pl.Callback,),
        "logger": (Logger,),
    }


def _slot(key: str) -> str:
    """The config key an import path fills: the name before its ``class_path`` (list indices and
    ``init_args`` skipped), else the last name (``--task.optimizer torch.optim.SGD``)."""
    names = [n for n in _SEGMENTS.split(key) if n and not n.isdigit() and n != "init_args"]
    if "class_path" in names:
        before = names[: len(names) - 1 - names[::-1].index("class_path")]
        return before[-1] if before else ""
    return names[-1] if names else ""


def _package_of(path: str) -> str | None:
    return next((p for p in ALLOWED_PACKAGES if path.startswith(p + ".")), None)


def _defined_in_allowed(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


def resolve(path: str) -> Any:
    """The object ``path`` names, importing only modules of ``ALLOWED_PACKAGES``.

    Raises:
        _Refused: the path leaves the allowed packages (outside them, or a module reached through
            another module), or names nothing.
        ConfigError: an allowed module fails to import.
    """
    package = _package_of(path)
    if package is None:
        raise _Refused(f"is outside {ALLOWED}")
    try:
        node: Any = importlib.import_module(package)
    except ImportError as err:
        raise _Refused(f"needs {package}, which does not import here ({err})") from None
    name = package
    for part in path[len(package) + 1 :].split("."):
        if not inspect.ismodule(node):
            raise _Refused(f"reads {part} of {name}, which is not a module")
        child = f"{name}.{part}"
        if part in vars(node):
            obj = vars(node)[part]
        elif hasattr(node, "__path__") and importlib.util.find_spec(child) is not None:
            try:
                obj = importlib.import_module(child)
            except ImportError as err:
                raise ConfigError(f"{path}: importing {child} failed ({err})") from None
        else:
            raise _Refused(f"names nothing: {name} has no {part}")
        if inspect.ismodule(obj) and obj.__name__ != child:
            raise _Refused(f"is the module {obj.__name__} reached through {name}")
        node, name = obj, child
    return node


def _check_import_path(path: str, key: str = "") -> None:
    """Refuse ``path`` unless it names a class of ``ALLOWED_PACKAGES`` of the kind ``key`` takes.

    Raises:
        _Refused: why not.
    """
    obj = resolve(path)
    if not inspect.isclass(obj):
        raise _Refused(f"is a {type(obj).__name__}, not a class")
    if not _defined_in_allowed(obj):
        raise _Refused(f"is {obj.__module__}.{obj.__qualname__}, defined outside {ALLOWED}")
    kinds = _slot_kinds()
    expected = kinds.get(_slot(key)) or tuple(k for ks in kinds.values() for k in ks)
    if not issubclass(obj, expected):
        raise _Refused(f"is not a {' or '.join(k.__name__ for k in dict.fromkeys(expected))}")


def _names_code(text: str) -> bool:
    """A string that jsonargparse would import: a dotted path whose top-level module exists.

    A module already imported is followed attribute by attribute (``json.txt`` names nothing in
    ``json``); one not yet imported cannot be looked into without running it, so any path under
    it counts. ``find_spec`` locates a module without running it.
    """
    if not _DOTTED.match(text):
        return False
    parts = text.split(".")
    if parts[0] not in sys.modules:
        try:
            return importlib.util.find_spec(parts[0]) is not None
        except (ImportError, ValueError):
            return False
    node: Any = sys.modules[parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(node, part):
            node = getattr(node, part)
            continue
        if not hasattr(node, "__path__"):  # not a package: nothing more to import below it
            return False
        try:
            return importlib.util.find_spec(".".join(parts[: i + 1])) is not None
        except (ImportError, ValueError):
            return False
    return True


def _config_file(text: str, base: Path | None) -> Path | None:
    """A YAML/JSON file that the string names (jsonargparse reads such a value as a nested config)."""
    if not text.endswith((".yaml", ".yml", ".json")):
        return None
    for path in ([base / text] if base is not None else []) + [Path(text)]:
        try:
            if path.is_file():
                return path
        except OSError:
            continue
    return None


def import_paths(node: Any, key: str = "", base: Path | None = None, depth: int = 0) -> Iterator[tuple[str, str]]:
    """Every ``(dotted key, import path)`` in a config tree: ``class_path`` values, strings that
    read as import paths, and those inside config files that a value names (relative to ``base``)."""
    if isinstance(node, dict):
        for name, value in node.items():
            child = f"{key}.{name}" if key else str(name)
            if name == "class_path" and isinstance(value, str):
                yield child, value
            else:
                yield from import_paths(value, child, base, depth)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from import_paths(value, f"{key}[{i}]", base, depth)
    elif isinstance(node, str) and _names_code(node):
        yield key, node
    elif isinstance(node, str) and depth < 8 and (path := _config_file(node, base)) is not None:
        try:
            nested = yaml.safe_load(path.read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            return
        yield from import_paths(nested, key, path.parent, depth + 1)


def check_config(config: Any, *, source: str, trusted: bool = False, base: Path | None = None) -> None:
    """Refuse a config tree that names code outside the allow-list.

    Args:
        config: the config as plain data (from ``yaml.safe_load``).
        source: where it came from, for the message (a file, "checkpoint X", "sweep state X").
        trusted: the user vouches for it (``--trust-config``): nothing is refused.
        base: the directory relative paths of nested config files start from.

    Raises:
        UntrustedConfigError: the first refused path.
    """
    if trusted:
        return
    for key, path in import_paths(config, base=base):
        try:
            _check_import_path(path, key)
        except _Refused as why:
            raise UntrustedConfigError(
                f"{source} names code outside the allow-list at {key}: {path!r} {why} (allowed: classes defined in "
                f"{ALLOWED}, of the kind their key takes); if you wrote it yourself, pass {TRUST_FLAG}"
            ) from None


def check_yaml(text: str, *, source: str, trusted: bool = False, base: Path | None = None) -> None:
    """``check_config`` on YAML text; YAML that does not parse is left to the config parser."""
    if trusted:
        return
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    check_config(config, source=source, base=base)


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # inline YAML: too long, or NUL bytes, for a path
        return False


def check_args(args: list[str], *, trusted: bool = False, source: str | None = None) -> None:
    """``check_config`` on a command line of config files and dotted overrides, before it is parsed.

    ``--config FILE`` (or inline YAML, named ``source`` in the message) is read as YAML; every
    override value is read as YAML too (``--trainer.callbacks '[{"class_path": ...}]'``,
    ``--trainer.callbacks+=CLASS``), and a value that is a config file is read.
    """
    if trusted:
        return
    values: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            values.append(tuple(arg[2:].split("=", 1)))  # type: ignore[arg-type]
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values.append((arg[2:], args[i + 1]))
            i += 1
        i += 1
    for key, value in values:
        key = key.removesuffix("+")  # --trainer.callbacks+=CLASS appends to the list
        path = Path(value)
        if (key == "config" or path.suffix in (".yaml", ".yml", ".json")) and _is_file(value):
            check_yaml(path.read_text(errors="replace"), source=f"config file {value}", base=path.parent)
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if key == "config":
            check_config(parsed, source=source or "the --config YAML")
        else:
            tree = ({key.removesuffix(".class_path"): {"class_path": parsed}} if key.endswith("class_path")
                    else {key: parsed})
            check_config(tree, source="the command line")


def split_trust_flag(args: list[str]) -> tuple[bool, list[str]]:
    """(whether ``--trust-config`` is among ``args``, ``args`` without it)."""
    return TRUST_FLAG in args, [a for a in args if a != TRUST_FLAG]


@contextmanager
def jsonargparse_policy(trusted: bool) -> Iterator[None]:
    """While parsing, jsonargparse itself refuses any import path whose object is defined outside
    ``ALLOWED_PACKAGES`` (nothing when ``trusted``): the second lock behind ``check_args``."""
    if trusted:
        yield
        return
    from bptt.private_api import jsonargparse_import_paths_allowed

    with jsonargparse_import_paths_allowed(ALLOWED_PACKAGES):
        yield
