"""Bad config values fail with one line (every YAML under conf/ is loaded by tests/test_conf_files.py)."""

from __future__ import annotations

import pytest

from bptt.config.parser import parse_config
from bptt.errors import ConfigError
from tests.conftest import PROJECT


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


@pytest.mark.parametrize(("name", "path"), [("quickstart", "lm/quickstart.yaml"),
                                            ("lm/tinyshakespeare_char", "lm/tinyshakespeare_char.yaml"),
                                            ("synthetic/adding", "synthetic/adding.yaml")])
def test_a_shipped_config_is_found_by_name(name, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as an installed bptt runs: no conf/ here
    by_name = parse_config(["--config", name, "--trainer.max_steps", "7"])
    by_path = parse_config(["--config", str(PROJECT / "conf" / path), "--trainer.max_steps", "7"])
    assert by_name.trainer.max_steps == 7
    assert {k: v for k, v in by_name.as_dict().items() if k != "config"} == {
        k: v for k, v in by_path.as_dict().items() if k != "config"}


def test_a_name_that_is_no_shipped_config_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--config nope is neither a file nor a shipped config; .*lm/quickstart"):
        parse_config(["--config", "nope"])
    (tmp_path / "quickstart").write_text("trainer: {max_steps: 3}\n")  # a file of that name is the file
    with pytest.raises(ConfigError, match="model|task|data"):
        parse_config(["--config", "quickstart"])


def test_shipped_configs_are_conf_itself_and_listed_with_task_and_description():
    from bptt.config.packaged import CONF_DIR, packaged_configs

    assert CONF_DIR.resolve() == (PROJECT / "conf").resolve()  # bptt/conf is conf/, shipped as package data
    listed = {c.name: c for c in packaged_configs()}
    assert listed["lm/quickstart"].task == "LanguageModelTask"
    assert listed["lm/quickstart"].description.startswith("Quick start: a character-level LSTM")
    assert listed["sweep/quickstart"].task == "sweep" and "cluster/rayjob" not in listed
    training = {p.relative_to(PROJECT / "conf").with_suffix("").as_posix() for p in (PROJECT / "conf").rglob("*.yaml")
                if p.parent.name != "cluster"}
    assert training == set(listed)


@pytest.mark.parametrize("name", ["limit_train_batches", "limit_val_batches", "limit_test_batches",
                                  "limit_predict_batches"])
def test_an_integer_batch_limit_is_a_count_and_a_float_a_fraction(name, tmp_path):
    """As in Lightning's Trainer: ``--trainer.limit_val_batches 1`` is one batch, not 1.0 (all of them)."""
    quick = ["--config", str(PROJECT / "conf/lm/quickstart.yaml")]
    for given, expected in (("1", 1), ("3", 3), ("0.5", 0.5), ("1.0", 1.0)):
        value = getattr(parse_config([*quick, f"--trainer.{name}", given]).trainer, name)
        assert value == expected and type(value) is type(expected), (given, value)
    (tmp_path / "one.yaml").write_text(f"trainer:\n  {name}: 1\n")
    value = getattr(parse_config([*quick, "--config", str(tmp_path / "one.yaml")]).trainer, name)
    assert value == 1 and type(value) is int
