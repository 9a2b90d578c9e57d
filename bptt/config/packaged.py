"""The configs of ``conf/`` that ship inside the package (``bptt/conf``), found by name.

``bptt fit --config quickstart`` and ``--config lm/tinyshakespeare_char`` name a shipped config;
a value that is an existing path, or ends in ``.yaml``/``.yml``/``.json``, or is inline YAML,
stays what it is. A bare name (``quickstart``) is looked up among the configs of one kind:
training configs for ``fit`` and ``diagnose``, sweep files for ``sweep``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from bptt.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # bptt/conf: a link to the repository's conf/
_NAME = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_NOT_RUN_BY_BPTT = ("cluster",)  # Ray's launcher and KubeRay read these, not bptt

Kind = Literal["train", "sweep"]


@dataclass(frozen=True)
class PackagedConfig:
    """One shipped config.

    Attributes:
        name: its path under ``conf/`` without ``.yaml`` (``lm/quickstart``).
        path: the file.
        task: the task class a training config names (``LanguageModelTask``), or ``sweep``.
        description: the first line of the YAML's opening comment.
    """

    name: str
    path: Path
    task: str
    description: str

    @property
    def kind(self) -> Kind:
        return "sweep" if self.name.startswith("sweep/") else "train"


def packaged_configs() -> list[PackagedConfig]:
    """Every shipped training and sweep config, by name."""
    found = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        name = path.relative_to(CONF_DIR).with_suffix("").as_posix()
        if name.split("/")[0] in _NOT_RUN_BY_BPTT:
            continue
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            raw = {}
        task = ("sweep" if name.startswith("sweep/")
                else str((raw.get("task") or {}).get("class_path", "?")).rsplit(".", 1)[-1])
        found.append(PackagedConfig(name=name, path=path, task=task, description=_first_sentence(text)))
    return found


def _first_sentence(text: str, width: int = 100) -> str:
    """The first sentence of the comment that opens a YAML file, cut to ``width`` characters."""
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(comment), maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."


def resolve_config(value: str, kind: Kind) -> str:
    """The file of the shipped config ``value`` names, else ``value`` unchanged.

    Raises:
        ConfigError: ``value`` reads as a config name (no suffix, not a path here) but names
            no shipped config of this kind, or more than one.
    """
    if not _NAME.match(value) or Path(value).exists():
        return value
    configs = [c for c in packaged_configs() if c.kind == kind]
    matches = [c for c in configs if c.name == value or c.name.split("/", 1)[-1] == value]
    if len(matches) == 1:
        return str(matches[0].path)
    names = ", ".join(c.name for c in (matches or configs))
    what = "names several shipped configs" if matches else "is neither a file nor a shipped config"
    raise ConfigError(f"--config {value} {what}; pass a path or one of: {names} (bptt configs lists them)")


def resolve_config_args(args: list[str], kind: Kind) -> list[str]:
    """``args`` with the value of each ``--config NAME`` (or ``--config=NAME``) replaced by its file."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1], kind)
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.removeprefix("--config="), kind)
    return out


def configs_table() -> str:
    """``bptt configs``: name, task and description of every shipped config."""
    rows = [("name", "task", "description")] + [(c.name, c.task, c.description) for c in packaged_configs()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{n.ljust(widths[0])}  {t.ljust(widths[1])}  {d}".rstrip() for n, t, d in rows)
