"""Subword tokens (``data.tokenizer``): a byte-level BPE trained on the train split, or a ``tokenizer.json`` from
disk; the tokenizer kept by the run and its checkpoints, decoded by ``bptt generate``, and refused in one line when
a resume or an evaluation names another."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from bptt.cli import main
from bptt.datamodules import TextStreamDataModule
from bptt.datamodules.subword import (
    ENDOFTEXT,
    MIN_BPE_VOCAB,
    SubwordVocabulary,
    load_vocabulary,
    vocabulary_from_state,
)
from bptt.datamodules.text_corpus import Vocabulary, load_corpus
from bptt.errors import CheckpointError, ConfigError
from bptt.models import RNNLanguageModel
from tests.bptt_command import SMALL, bptt

GLOB = "json/*.py"  # SMALL's corpus: the stdlib's json package, about 45 kB
BPE = ["--data.tokenizer", "bpe", "--data.vocab_size", "300"]


@pytest.fixture(scope="module")
def stdlib_splits() -> dict[str, list[str]]:
    records, _ = load_corpus("stdlib", stdlib_glob=GLOB)
    return {split: list(records[split]["text"]) for split in records}


@pytest.fixture(scope="module")
def bpe300(stdlib_splits) -> SubwordVocabulary:
    return SubwordVocabulary.train(stdlib_splits["train"], 300)


def _other_tokenizer(texts: list[str]) -> Tokenizer:
    """A tokenizer bptt did not make: a BPE over whitespace-separated words with an unknown token."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                             show_progress=False))
    return tokenizer


def _module(**kwargs) -> TextStreamDataModule:
    return TextStreamDataModule(stdlib_glob=GLOB, batch_size=4, eval_batch_size=4, bptt=16, **kwargs)


# --------------------------------------------------------------------------------------------------
# the vocabulary


def test_bpe_round_trip_on_the_stdlib_corpus(bpe300, stdlib_splits):
    for split in ("validation", "test"):  # text the BPE was not trained on
        text = "".join(stdlib_splits[split])
        assert bpe300.decode(bpe300.encode(text)) == text
    odd = "naïve café ü 世界 😀\t\r\n\x00\x7f  x\n\n"  # bytes the train split never had: no unknown token, no loss
    assert bpe300.decode(bpe300.encode(odd)) == odd
    dm = _module(tokenizer="bpe", vocab_size=300)
    dm.load()
    assert dm.vocab.decode(dm.ids["test"].tolist()) == "".join(stdlib_splits["test"])
    assert dm.vocab.fingerprint() == bpe300.fingerprint() and dm.vocab_size == len(bpe300) == 300


def test_bpe_vocabulary_has_every_byte_and_the_boundary_token_first(bpe300):
    vocab = bpe300.tokenizer.get_vocab(with_added_tokens=True)
    assert vocab[ENDOFTEXT] == 0 and set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert len([t for t in vocab if len(t) > 1 and t != ENDOFTEXT]) == 300 - 256 - 1  # the merges
    ids = bpe300.encode(f"a{ENDOFTEXT}b")
    assert 0 in ids and bpe300.decode(ids) == f"a{ENDOFTEXT}b"
    assert max(bpe300.encode("any text at all 😀")) < len(bpe300)


@pytest.mark.slow
def test_bpe_training_is_the_same_in_another_process(bpe300):
    """A resumed run trains its BPE again (or reads the cache): in a fresh process, with its own hash seeds,
    the same train split must give the same tokenizer, hence the same ids."""
    code = ("from bptt.datamodules.subword import SubwordVocabulary; from bptt.datamodules.text_corpus import "
            f"load_corpus; r, _ = load_corpus('stdlib', stdlib_glob={GLOB!r}); "
            "print(SubwordVocabulary.train(r['train']['text'], 300).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAYON_NUM_THREADS": "3"})  # and another number of threads
    assert out.stdout.strip() == bpe300.fingerprint()


def test_a_tokenizer_file_gives_the_ids_of_the_library_called_directly(tmp_path, stdlib_splits):
    tokenizer = _other_tokenizer(stdlib_splits["train"][:400])
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok/tokenizer.json"))
    direct = Tokenizer.from_file(str(tmp_path / "tok/tokenizer.json"))
    relative = _module(tokenizer="tok/tokenizer.json", data_dir=str(tmp_path))  # under the data root
    absolute = _module(tokenizer=str(tmp_path / "tok/tokenizer.json"))
    for dm in (relative, absolute):
        dm.load()
        assert dm.vocab.level == "file" and dm.vocab_size == direct.get_vocab_size()
        for split, lines in stdlib_splits.items():
            expected = [i for line in lines for i in direct.encode(line).ids]
            assert dm.ids[split].tolist() == expected, split
    assert 0 in relative.ids["train"].tolist()  # [UNK]: what this tokenizer does with unknown text, kept


def test_state_and_saved_files_give_the_same_tokenizer_back(bpe300, tmp_path):
    again = vocabulary_from_state(json.loads(json.dumps(bpe300.state_dict())))  # as a checkpoint stores it
    assert isinstance(again, SubwordVocabulary) and again.level == "bpe" and again.target_size == 300
    assert again.fingerprint() == bpe300.fingerprint()
    files = bpe300.save_artifacts(tmp_path)
    assert [p.name for p in files] == ["vocab.json", "tokenizer.json"]
    assert load_vocabulary(tmp_path / "vocab.json").fingerprint() == bpe300.fingerprint()
    text = "def f(x):\n    return {'a': [1, 2]}\n"
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == bpe300.encode(text)
    char = Vocabulary.build(["abc\n"], "char")
    assert isinstance(vocabulary_from_state(char.state_dict()), Vocabulary)
    assert char.encode_batch(["ab", "c"]) == [char.encode("ab"), char.encode("c")]


# --------------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenizer": "bpe", "vocab_size": MIN_BPE_VOCAB - 1},
         f"data.vocab_size must be >= {MIN_BPE_VOCAB} (256 byte tokens, 1 special token <|endoftext|> and at least "
         f"one merge), got {MIN_BPE_VOCAB - 1}"),
        ({"tokenizer": "bpe", "vocab_size": 0}, f"data.vocab_size must be >= {MIN_BPE_VOCAB}"),
        ({"vocab_size": 500}, "data.vocab_size=500 sizes the BPE of data.tokenizer: bpe, not data.level's tokens; "
         "set data.vocab_size: null"),
        ({"tokenizer": "t.json", "vocab_size": 500}, "data.vocab_size=500 sizes the BPE of data.tokenizer: bpe, "
         "not data.tokenizer=t.json"),
        ({"tokenizer": " "}, "data.tokenizer is empty"),
    ],
)
def test_bad_tokenizer_settings_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        TextStreamDataModule(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_smallest_bpe_is_one_merge(stdlib_splits):
    dm = _module(tokenizer="bpe", vocab_size=MIN_BPE_VOCAB)
    dm.load()
    assert dm.vocab_size == MIN_BPE_VOCAB
    assert dm.vocab.decode(dm.ids["validation"].tolist()) == "".join(stdlib_splits["validation"])


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "is not a file; give bpe or the path of a tokenizer.json"),
     ("{not json", "is not a tokenizer.json the tokenizers library reads ("),  # then the library's own words
     ('{"version": "1.0"}', "is not a tokenizer.json the tokenizers library reads ("),
     ("", "is not a tokenizer.json the tokenizers library reads (")],
    ids=["missing", "not-json", "not-a-tokenizer", "empty"],
)
def test_a_missing_or_invalid_tokenizer_file_is_one_line(content, message, tmp_path):
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    dm = _module(tokenizer="tokenizer.json", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="^data.tokenizer=tokenizer.json: ") as err:
        dm.load()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # refused before the corpus is read or anything cached


def test_the_cache_key_changes_with_the_tokenizer(tmp_path, stdlib_splits):
    tokenizer_file = tmp_path / "tokenizer.json"
    _other_tokenizer(stdlib_splits["train"][:400]).save(str(tokenizer_file))
    settings = {"char": {}, "word": {"level": "word"}, "bpe300": {"tokenizer": "bpe", "vocab_size": 300},
                "bpe400": {"tokenizer": "bpe", "vocab_size": 400}, "file": {"tokenizer": str(tokenizer_file)}}
    keys, ids = {}, {}
    for name, kwargs in settings.items():
        dm = _module(**kwargs)
        dm.load()
        keys[name], ids[name] = dm._manifest(), dm.ids["train"]
    assert len(set(keys.values())) == len(settings)
    assert not torch.equal(ids["bpe300"][:1000], ids["bpe400"][:1000])
    _other_tokenizer(stdlib_splits["train"][400:800]).save(str(tokenizer_file))  # the same path, other content
    edited = _module(tokenizer=str(tokenizer_file))
    edited.load()
    assert edited._manifest() != keys["file"]
    assert edited.ids["train"].tolist() == [i for line in stdlib_splits["train"]
                                            for i in Tokenizer.from_file(str(tokenizer_file)).encode(line).ids]


def test_a_checkpoint_of_other_tokens_is_refused_in_one_line(bpe300, tmp_path, stdlib_splits):
    bpe_state = {"vocab": bpe300.state_dict()}
    bpe300.tokenizer.save(str(tmp_path / "same.json"))
    _other_tokenizer(stdlib_splits["train"][:400]).save(str(tmp_path / "other.json"))
    file_state = {"vocab": SubwordVocabulary.from_file(tmp_path / "same.json", "same.json").state_dict()}
    char_state = {"vocab": Vocabulary.build(["ab\n"], "char").state_dict()}
    accepted = [(bpe_state, {"tokenizer": "bpe", "vocab_size": 300}),
                (bpe_state, {"tokenizer": str(tmp_path / "same.json")}),  # the checkpoint's tokenizer, as a file
                (file_state, {"tokenizer": str(tmp_path / "same.json")}),
                (char_state, {})]
    for state, kwargs in accepted:
        TextStreamDataModule(**kwargs).check_data_state(state)
    refused = [(bpe_state, {"tokenizer": "bpe", "vocab_size": 400}, "data.tokenizer=bpe, data.vocab_size=400"),
               (bpe_state, {"tokenizer": str(tmp_path / "other.json")}, "other.json, whose tokenizer differs"),
               (bpe_state, {}, "not from data.level=char"),
               (file_state, {"tokenizer": "bpe"}, "come from data.tokenizer=same.json, not from data.tokenizer=bpe"),
               (char_state, {"level": "word"}, "come from data.level=char, not from data.level=word"),
               (char_state, {"tokenizer": "bpe"}, "come from data.level=char, not from data.tokenizer=bpe")]
    for state, kwargs, message in refused:
        with pytest.raises(CheckpointError, match="^the checkpoint's tokens come from ") as err:
            TextStreamDataModule(**kwargs).check_data_state(state)
        assert message in str(err.value) and "drop the data.tokenizer" in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# the bptt command


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """`bptt fit` of SMALL with a 300-token BPE: 12 steps, step checkpoints, tracked in a sqlite store."""
    root = tmp_path_factory.mktemp("bpe")
    result = bptt("fit", *SMALL, *BPE, "--checkpoint.every_n_steps", "6", "--checkpoint.keep_last", "5",
                  "--trainer.default_root_dir", str(root / "run"), "--tracking.tracking_uri",
                  f"sqlite:///{root}/mlflow.db", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _mlflow_run(root: Path):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bptt").experiment_id])
    return client, run


@pytest.mark.slow
def test_fit_keeps_the_tokenizer_with_the_run_and_its_checkpoints(bpe_run):
    run = bpe_run / "run"
    tokenizer = SubwordVocabulary(Tokenizer.from_file(str(run / "tokenizer.json")), level="bpe")
    assert len(tokenizer) == 300
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    saved = vocabulary_from_state(checkpoint["TextStreamDataModule"]["vocab"])
    assert saved.fingerprint() == tokenizer.fingerprint() == load_vocabulary(run / "vocab.json").fingerprint()
    assert checkpoint["state_dict"]["model.embedding.weight"].shape[0] == 300
    client, logged = _mlflow_run(bpe_run)
    assert {"tokenizer.json", "vocab.json"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}


@pytest.mark.slow
def test_generate_decodes_with_the_checkpoints_tokenizer(bpe_run):
    ckpt = bpe_run / "run/checkpoints/last.ckpt"
    greedy = bptt("generate", str(ckpt), "--prompt", "def ", "--num-tokens", "12", "--temperature", "0", cwd=bpe_run)
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    tokenizer = Tokenizer.from_file(str(bpe_run / "run/tokenizer.json"))  # the library itself, not bptt's wrapper
    model = RNNLanguageModel(vocab_size=300, embedding_size=64, hidden_size=32, num_layers=1)
    model.load_state_dict({k.removeprefix("model."): v for k, v in
                           torch.load(ckpt, weights_only=True)["state_dict"].items()})
    ids, state, out = torch.tensor([tokenizer.encode("def ").ids]), None, []
    with torch.no_grad():
        for _ in range(12):
            logits, state = model.eval()(ids, state)
            ids = logits[:, -1:].argmax(-1)
            out.append(ids.item())
    assert greedy.stdout == "def " + tokenizer.decode(out, skip_special_tokens=False) + "\n"


@pytest.mark.slow
def test_a_resumed_bpe_run_trains_its_tokenizer_again_and_ends_bit_for_bit(bpe_run, tmp_path, monkeypatch):
    """From a step checkpoint, in a fresh process with an empty token cache (so the BPE is trained again):
    the same 12 steps as the uninterrupted run."""
    (middle,) = (bpe_run / "run/checkpoints").glob("step-*.ckpt")
    assert 0 < torch.load(middle, weights_only=True)["global_step"] < 12
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "empty-cache"))
    result = bptt("resume", str(middle), "--trainer.default_root_dir", str(tmp_path / "resumed"),
                  "--tracking.enabled", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "empty-cache").glob("corpus-*.json")), "the resumed run did not tokenize afresh"
    expected, found = (torch.load(r / "checkpoints/last.ckpt", weights_only=True) for r in (bpe_run / "run",
                                                                                          tmp_path / "resumed"))
    assert found["global_step"] == expected["global_step"] == 12
    for name, value in expected["state_dict"].items():
        assert torch.equal(found["state_dict"][name], value), name


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bptt: error: "), err[-5:]
    return err[0]


@pytest.mark.slow
def test_resume_or_evaluate_with_another_tokenizer_is_refused_and_changes_nothing(bpe_run, capsys, monkeypatch):
    monkeypatch.chdir(bpe_run)
    other = bpe_run / "other.json"
    if not other.exists():
        _other_tokenizer(["a b c\n", "ab bc\n"] * 50).save(str(other))
    before = _tree(bpe_run)
    client, logged = _mlflow_run(bpe_run)
    history = client.get_metric_history(logged.info.run_id, "train/loss")
    last = str(bpe_run / "run/checkpoints/last.ckpt")
    cases = [
        (["resume", last, "--trainer.max_steps", "20", "--data.tokenizer", str(other), "--data.vocab_size", "null"],
         f"the checkpoint's tokens come from data.tokenizer=bpe, data.vocab_size=300, not from data.tokenizer={other}"),
        (["resume", last, "--trainer.max_steps", "20", "--data.tokenizer", str(other)],
         f"data.vocab_size=300 sizes the BPE of data.tokenizer: bpe, not data.tokenizer={other}"),
        (["resume", last, "--trainer.max_steps", "20", "--data.vocab_size", "400"],
         "not from data.tokenizer=bpe, data.vocab_size=400"),
        (["resume", last, "--trainer.max_steps", "20", "--data.tokenizer", "null", "--data.vocab_size", "null"],
         "not from data.level=char"),
        (["validate", last, "--data.tokenizer", str(other), "--data.vocab_size", "null"],
         "the checkpoint's tokens come from data.tokenizer=bpe"),
        (["test", last, "--data.tokenizer", "nowhere/tokenizer.json", "--data.vocab_size", "null"],
         "data.tokenizer=nowhere/tokenizer.json: "),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in _one_line(capsys), args
    assert _tree(bpe_run) == before
    assert client.get_metric_history(logged.info.run_id, "train/loss") == history
    assert client.get_run(logged.info.run_id).info.status == "FINISHED"


def test_fit_with_a_missing_or_invalid_tokenizer_writes_nothing(tmp_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/broken.json").write_text('{"model": {"type": "BPE"}}')
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for tokenizer, message in (("missing.json", "is not a file"), ("broken.json", "is not a tokenizer.json")):
        args = ["fit", *SMALL, "--data.tokenizer", tokenizer, "--data.data_dir", str(tmp_path / "data"),
                "--trainer.default_root_dir", str(tmp_path / "work/run")]
        assert main(args) == 2
        line = _one_line(capsys)
        assert f"data.tokenizer={tokenizer}: " in line and message in line, line
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []
