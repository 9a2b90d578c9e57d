"""A checkpoint's run rebuilt for evaluation and inference: its config parsed, its objects built and checked
against the checkpoint's network (``bptt validate``, ``test``, ``generate``, ``transcribe``, ``forecast``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from bptt.config.parser import build_parser, instantiate, parse_config
from bptt.console import release as release_held_output
from bptt.datamodules.subword import vocabulary_from_state
from bptt.training.checkpointing import load_checkpoint
from bptt.training.checks import check_same_model
from bptt.training.trainer import quiet_known_warnings


def restore(
    checkpoint_path: str | Path, overrides: list[str], trusted: bool, checkpoint: dict[str, Any] | None = None
) -> tuple[Namespace, Namespace, dict[str, Any]]:
    """Rebuild a checkpoint's run: (config, instantiated objects, checkpoint); its config may name
    code outside the allow-list only when ``trusted``. ``checkpoint``: the file already loaded
    (``load_checkpoint``), when the caller read it first."""
    quiet_known_warnings()
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(checkpoint_path)
    datamodule_state = next((v for v in checkpoint.values() if isinstance(v, dict) and "vocab" in v), None)
    parser = build_parser()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--config", checkpoint["bptt"]["config"], *overrides]
        if datamodule_state is not None:
            vocab_file = Path(tmp) / "vocab.json"
            vocabulary_from_state(datamodule_state["vocab"]).save(vocab_file)  # its tokenizer too, if it has one
            args += ["--data.vocab_file", str(vocab_file)]
        cfg = parse_config(args, parser, trusted=trusted, source=f"the config inside checkpoint {checkpoint_path}")
        init = instantiate(cfg, parser)
    check_same_model(init.task, checkpoint, checkpoint_path)
    data_state = checkpoint.get(type(init.data).__qualname__)
    if data_state is not None:  # e.g. an override naming another tokenizer than the checkpoint's
        init.data.check_data_state(data_state)
    release_held_output()  # the checkpoint and its config passed
    if data_state is not None and datamodule_state is None:  # e.g. the speech features' normalization
        init.data.load_state_dict(data_state)
    return cfg, init, checkpoint
