"""Every YAML in conf/ parses and instantiates; bad config values fail with one line."""

from __future__ import annotations

import pytest
import yaml

from bptt.config import build_parser, instantiate, parse_config
from bptt.datamodules.vocabulary import Vocabulary
from bptt.errors import ConfigError
from bptt.lightning_modules import TBPTTModule
from tests.conftest import PROJECT

CONFIGS = sorted(p for p in (PROJECT / "conf").rglob("*.yaml") if p.parent.name not in ("sweep", "cluster"))  # training configs


def test_conf_holds_the_configs_the_issues_name():
    names = {p.relative_to(PROJECT / "conf").as_posix() for p in CONFIGS}
    assert {"lm/quickstart.yaml", "lm/tinyshakespeare_char.yaml", "lm/wikitext2_word.yaml", "asr/fsdd_digits.yaml",
            "forecast/co2.yaml", "forecast/sunspots.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(PROJECT / "conf").as_posix())
def test_every_config_instantiates(path, tmp_path):
    data = yaml.safe_load(path.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    args = ["--config", str(path)]
    if data == "TextStreamDataModule":  # a stand-in vocabulary, so that configs whose corpus is not here still build
        vocab = tmp_path / "vocab.json"
        Vocabulary(["<unk>", "<eos>", "a", "b"], "word").save(vocab)
        args += ["--data.vocab_file", str(vocab)]
    parser = build_parser()
    init = instantiate(parse_config(args, parser), parser)  # speech tokens and series need no corpus to build
    assert isinstance(init.task, TBPTTModule) and init.task.model is init.model
    if data == "TextStreamDataModule":
        assert init.model.decoder.out_features == 4  # the stand-in vocabulary
    elif data == "SpeechDataModule":
        assert init.model.head.out_features == 11  # digits + the CTC blank
    elif data == "CopyMemoryDataModule":
        assert init.model.decoder.out_features == init.data.vocab_size == init.data.symbols + 2  # + blank, delimiter
    else:
        assert init.model.head.out_features == init.model.horizon * init.model.num_targets


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.hiden_size", "3"], "Option 'hiden_size' is not accepted"),
        (["--trainer.max_steps", "many"], r'"trainer.max_steps": Expected a <class .int.>. Got value: many'),
        (["--data.level", "byte"], r"Expected a typing.Literal\['char', 'word'\]. Got value: byte"),
        (["--trainer.accumulate_grad_batches", "4"], "raise task.k1"),
        (["--trainer.use_distributed_sampler", "true"], "gives each rank its own streams"),
    ],
)
def test_bad_config_values_fail_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--config", str(PROJECT / "conf/lm/quickstart.yaml"), *override])
    assert "\n" not in str(err.value)
