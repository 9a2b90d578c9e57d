"""TextStreamDataModule: sources, vocabulary from the train split, token cache, sharding, bad input."""

from __future__ import annotations

import json
import re
import types

import datasets
import pytest
import torch

from bptt.cli import main
from bptt.datamodules import TextStreamDataModule
from bptt.datamodules.sources import CorpusError
from bptt.datamodules.streams import stream_layout
from bptt.datamodules.text_corpus import EOS, UNK, load_corpus
from bptt.errors import ConfigError
from tests.bptt_command import SMALL


def _write_splits(root, train, valid, test):
    (root / "corpus").mkdir()
    for name, text in (("train.txt", train), ("valid.txt", valid), ("test.txt", test)):
        (root / "corpus" / name).write_text(text)
    return "corpus"


def test_word_level_vocab_from_train_only_with_eos_and_unk(tmp_path):
    corpus = _write_splits(tmp_path, "a b a c\na b\n" * 20, "a z b\n" * 20, "c a\n" * 20)
    dm = TextStreamDataModule(corpus=corpus, level="word", min_count=21, data_dir=str(tmp_path),
                              batch_size=2, eval_batch_size=2, bptt=3)
    dm.load()
    assert dm.vocab.tokens[:2] == [UNK, EOS] and set(dm.vocab.tokens) == {UNK, EOS, "a", "b"}  # c seen 20 times
    val = [dm.vocab.tokens[i] for i in dm.ids["validation"][:4]]
    assert val == ["a", UNK, "b", EOS]  # z never occurs in train
    assert dm.ids["train"].numel() == 20 * (5 + 3)


def test_char_level_file_split_by_fractions_at_line_ends(tmp_path):
    lines = [f"line {i:03d}\n" for i in range(200)]
    (tmp_path / "t.txt").write_text("".join(lines))
    records, _ = load_corpus("t.txt", data_dir=str(tmp_path), split_fractions=(0.8, 0.1, 0.1))
    assert records["train"]["text"] == lines[:160] and records["validation"]["text"] == lines[160:180]
    assert records["test"]["text"] == lines[180:]
    dm = TextStreamDataModule(corpus="t.txt", data_dir=str(tmp_path), split_fractions=(0.8, 0.1, 0.1),
                              batch_size=4, eval_batch_size=2, bptt=8)
    dm.load()
    assert dm.vocab.decode(dm.ids["test"].tolist()) == "".join(lines[180:])


def test_saved_dataset_dict_and_hf_dataset_by_name(tmp_path):
    splits = {"train": ["hello world\n"] * 50, "validation": ["hello\n"] * 20, "test": ["world\n"] * 20}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "saved"))
    saved = TextStreamDataModule(corpus="saved", text_column="body", data_dir=str(tmp_path), batch_size=2,
                                 eval_batch_size=2, bptt=4)
    saved.load()
    assert saved.vocab.decode(saved.ids["validation"].tolist()) == "hello\n" * 20
    (tmp_path / "jsonl").mkdir()
    for name, rows in splits.items():  # load_dataset by name: here a local folder of JSON-lines splits
        (tmp_path / "jsonl" / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    hub = TextStreamDataModule(corpus=f"hf:{tmp_path / 'jsonl'}", batch_size=2, eval_batch_size=2, bptt=4)
    hub.load()
    assert hub.vocab.decode(hub.ids["test"].tolist()) == "world\n" * 20


def test_stdlib_corpus_is_offline_python_source():
    records, origin = load_corpus("stdlib", stdlib_glob="json/*.py")
    text = "".join(records["train"]["text"])
    assert "def " in text and "import" in text and "files)" in origin


def test_tokenized_splits_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = _write_splits(tmp_path, "abcabc\n" * 50, "abc\n" * 20, "cab\n" * 20)
    first = TextStreamDataModule(corpus=corpus, data_dir=str(tmp_path), batch_size=2, eval_batch_size=2, bptt=4)
    first.load()
    cached = sorted((tmp_path / "cache" / "tokenized").glob("*.*"))
    assert sorted(p.suffix for p in cached) == [".arrow"] * 3 + [".lock"] * 3 + [".npy"] * 3
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = TextStreamDataModule(corpus=corpus, data_dir=str(tmp_path), batch_size=2, eval_batch_size=2, bptt=4)
    second.load()
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read back, not tokenized again
    assert all(torch.equal(first.ids[s], second.ids[s]) for s in first.ids)

    def unread(*args, **kwargs):
        raise AssertionError("a cached corpus must not be read again")

    monkeypatch.setattr("bptt.datamodules.text.load_corpus", unread)
    third = TextStreamDataModule(corpus=corpus, data_dir=str(tmp_path), batch_size=2, eval_batch_size=2, bptt=4)
    third.load()
    assert third.vocab.tokens == first.vocab.tokens and torch.equal(third.ids["train"], first.ids["train"])

    monkeypatch.undo()
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / corpus / "test.txt").write_text("bca\n" * 21)  # an edited corpus is tokenized afresh
    edited = TextStreamDataModule(corpus=corpus, data_dir=str(tmp_path), batch_size=2, eval_batch_size=2, bptt=4)
    edited.load()
    assert edited.vocab.decode(edited.ids["test"].tolist()) == "bca\n" * 21


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_read_disjoint_streams_covering_the_corpus(tmp_path, world):
    corpus = _write_splits(tmp_path, "".join(f"{i}\n" for i in range(500)), "1\n" * 80, "2\n" * 80)
    seen = []
    for rank in range(world):
        dm = TextStreamDataModule(corpus=corpus, data_dir=str(tmp_path), batch_size=8, eval_batch_size=4, bptt=5)
        dm.trainer = types.SimpleNamespace(global_rank=rank, world_size=world)
        dm.setup("fit")
        windows = list(dm.train_dataloader())
        assert windows[0]["inputs"].shape == (8 // world, 5)
        seen.append(torch.cat([w["inputs"] for w in windows], dim=1))
    streams = stream_layout(dm.ids["train"], 8)
    assert torch.equal(torch.cat(seen), streams[:, :-1])


def test_state_dict_resumes_the_read_position(tmp_path):
    corpus = _write_splits(tmp_path, "abcdefg\n" * 100, "abc\n" * 30, "cab\n" * 30)
    kwargs = dict(corpus=corpus, data_dir=str(tmp_path), batch_size=4, eval_batch_size=2, bptt=6, random_bptt=True)
    dm = TextStreamDataModule(**kwargs)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    dm._position = (0, 5)  # as after five consumed training windows
    state = dm.state_dict()
    resumed = TextStreamDataModule(**kwargs)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert len(resumed.train_dataloader()) == len(full)  # the whole epoch: Lightning counts the five consumed
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a["inputs"], b["inputs"]) for a, b in zip(rest, full[5:]))


def test_bad_corpora_fail_with_one_line_naming_the_fix(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 100)
    (tmp_path / "empty.txt").write_text("")
    cases = {
        "missing.txt": r"does not exist; set \$BPTT_DATA_DIR",
        "latin1.txt": "is not UTF-8 text",
        "empty.txt": "split of .* is empty",
    }
    for corpus, message in cases.items():
        dm = TextStreamDataModule(corpus=corpus, data_dir=str(tmp_path))
        with pytest.raises(CorpusError, match=message) as err:
            dm.load()
        assert "\n" not in str(err.value)


def test_window_longer_than_a_stream_is_rejected_before_training(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij\n" * 40)
    dm = TextStreamDataModule(corpus="t.txt", data_dir=str(tmp_path), batch_size=4, bptt=200)
    with pytest.raises(ConfigError, match=r"data.bptt=200 is longer than the train streams.*lower data.bptt"):
        dm.load()


def test_shakespeare_splits_90_5_5(shakespeare):
    records, _ = load_corpus(str(shakespeare), split_fractions=(0.9, 0.05, 0.05))
    sizes = [sum(map(len, records[s]["text"])) for s in ("train", "validation", "test")]
    assert sum(sizes) == len(shakespeare.read_text())
    assert [round(s / sum(sizes), 3) for s in sizes] == [0.9, 0.05, 0.05]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size must be >= 1, got 0$"),
        ({"eval_batch_size": -2}, "data.eval_batch_size must be >= 1, got -2$"),
        ({"bptt": 0}, "data.bptt must be >= 1, got 0$"),
        ({"min_count": 0}, "data.min_count must be >= 1, got 0$"),
        ({"level": "words"}, "data.level must be char or word, got 'words'$"),
        ({"split_fractions": (0.5, 0.5)}, r"data.split_fractions must be three non-negative numbers summing to 1 "
                                          r"\(train, validation, test\), got \[0.5, 0.5\]$"),
        ({"split_fractions": (0.9, 0.2, -0.1)}, r"data.split_fractions must be .*, got \[0.9, 0.2, -0.1\]$"),
    ],
)
def test_bad_settings_are_config_errors_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        TextStreamDataModule(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("damaged", "content", "message"),
    [
        ("dataset_dict.json", "{not json", "JSONDecodeError"),
        ("dataset_dict.json", '{"splits": 3}', "TypeError"),
        ("train/state.json", "", "JSONDecodeError"),
        ("validation/dataset_info.json", "[", "JSONDecodeError"),
    ],
)
def test_a_damaged_saved_corpus_fails_with_one_line(damaged, content, message, tmp_path):
    records = {s: {"text": [f"{s} line {i}\n" for i in range(20)]} for s in ("train", "validation", "test")}
    datasets.DatasetDict({s: datasets.Dataset.from_dict(r) for s, r in records.items()}).save_to_disk(
        str(tmp_path / "saved"))
    (tmp_path / "saved" / damaged).write_text(content)
    dm = TextStreamDataModule(corpus="saved", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorpusError, match=f"^cannot load the saved dataset {tmp_path / 'saved'} \\({message}: ") as err:
        dm.load()
    assert "\n" not in str(err.value) and str(err.value).endswith(
        "save it again with save_to_disk, or point data.corpus at another corpus")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.min_count", "0"], "data.min_count must be >= 1, got 0"),
        (["--data.split_fractions", "[0.5, 0.6, 0.1]"], r"data.split_fractions must be three non-negative numbers"),
        (["--data.eval_batch_size", "0"], "data.eval_batch_size must be >= 1, got 0"),
    ],
)
def test_bptt_fit_stops_with_one_line_and_exit_2(args, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", *SMALL, *args, "--trainer.default_root_dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bptt: error: ") and re.search(message, err[0]), err
    assert not run_dir.exists()
