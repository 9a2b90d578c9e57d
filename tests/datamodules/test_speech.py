"""SpeechDataModule: FSDD composition and split, log-mel features, cache, batches, sharding, resume, bad input."""

from __future__ import annotations

import itertools
import json
import logging
import re
import types

import datasets
import numpy as np
import pytest
import soundfile
import torch

from bptt.cli import main
from bptt.datamodules import SpeechDataModule
from bptt.datamodules.audio import LogMel, mel_centres, num_frames
from bptt.datamodules.sources import CorpusError
from bptt.datamodules.speech_corpora import compose_fsdd, fsdd_recordings, fsdd_split
from bptt.datamodules.utterance_batches import evaluation_batches, training_batches
from bptt.errors import ConfigError
from tests.conftest import SHARED_DATA
from tests.speech_data import (
    LIBRISPEECH_SPLITS,
    make_fsdd,
    make_librispeech,
    speak,
    tone,
    write_speech_checkpoint,
)

SMALL = {"utterances": (24, 6, 6), "batch_size": 4, "eval_batch_size": 4, "validation_indices": (5, 7)}


@pytest.fixture(scope="module")
def fsdd(tmp_path_factory):
    """A synthetic FSDD (2 speakers, indices 0-11, 0.25 s per digit) under a data root; read-only."""
    root = tmp_path_factory.mktemp("speech-data")
    make_fsdd(root / "fsdd")
    return root


def _module(root, cache, **kwargs) -> SpeechDataModule:
    return SpeechDataModule(**{"corpus": "fsdd", "data_dir": str(root), "cache_dir": str(cache), **SMALL, **kwargs})


def _batches(dm, split, rank=0, world=1):
    dm.trainer = types.SimpleNamespace(global_rank=rank, world_size=world, training=split == "train")
    dm.setup("fit")
    return list(getattr(dm, {"train": "train_dataloader", "validation": "val_dataloader",
                             "test": "test_dataloader"}[split])())


def _one_line(err) -> bool:
    return "\n" not in str(err.value) and len(str(err.value)) < 400


def test_fsdd_composition_is_seeded_and_keeps_the_official_split(fsdd):
    by_split = fsdd_split(fsdd_recordings(fsdd / "fsdd"), (5, 7))
    assert {r.index for r in by_split["test"]} == set(range(5))
    assert {r.index for r in by_split["validation"]} == {5, 6, 7}
    assert {r.index for r in by_split["train"]} == set(range(8, 12))
    args = {"digits_per_utterance": (2, 7), "gap_seconds": (0.05, 0.3), "count": 50}
    for split, indices in (("train", range(8, 12)), ("validation", range(5, 8)), ("test", range(5))):
        composed = compose_fsdd(by_split[split], split=split, seed=3, **args)
        assert composed == compose_fsdd(by_split[split], split=split, seed=3, **args)
        assert composed != compose_fsdd(by_split[split], split=split, seed=4, **args)
        for utt in composed:
            assert {r.index for r in utt.recordings} <= set(indices)
            assert {r.speaker for r in utt.recordings} == {utt.speaker}
            assert 2 <= len(utt.recordings) <= 7 and len(utt.gaps) == len(utt.recordings) + 1
            assert all(0.05 <= g <= 0.3 for g in utt.gaps)
            assert utt.text == "".join(r.path.name[0] for r in utt.recordings)


def test_module_transcripts_are_the_composed_digits(fsdd, tmp_path):
    dm = _module(fsdd, tmp_path, seed=3)
    dm.load()
    by_split = fsdd_split(fsdd_recordings(fsdd / "fsdd"), (5, 7))
    for split, count in zip(("train", "validation", "test"), SMALL["utterances"]):
        composed = compose_fsdd(by_split[split], split=split, count=count, seed=3, digits_per_utterance=(2, 7),
                                gap_seconds=(0.05, 0.3))
        assert dm.data[split]["text"] == [c.text for c in composed]
        assert dm.data[split]["source"] == [" ".join(r.path.stem for r in c.recordings) for c in composed]
        assert dm.report["splits"][split]["utterances"] == count


@pytest.mark.parametrize("sample_rate", [8000, 16000])
def test_log_mel_puts_a_tone_in_the_bin_with_the_nearest_centre(sample_rate):
    logmel, centres = LogMel(sample_rate=sample_rate, n_mels=40), mel_centres(40, sample_rate)
    for frequency in np.linspace(200, sample_rate / 2 - 300, 25):
        t = np.arange(sample_rate // 2) / sample_rate  # 0.5 s
        feats = logmel(np.sin(2 * np.pi * frequency * t).astype(np.float32))
        assert feats.shape == (num_frames(sample_rate // 2, sample_rate), 40) == (51, 40)
        assert int(feats[5:-5].mean(0).argmax()) == int(np.abs(centres - frequency).argmin()), frequency


def test_features_are_cached_and_reloaded_without_reading_audio(fsdd, tmp_path, monkeypatch):
    first = _module(fsdd, tmp_path)
    first.load()

    def no_reading(*args, **kwargs):
        raise RuntimeError("audio was read although the features are cached")  # as libsndfile fails

    monkeypatch.setattr(soundfile, "read", no_reading)
    second = _module(fsdd, tmp_path)
    second.load()
    assert second.data["train"]["text"] == first.data["train"]["text"]
    assert np.array_equal(np.concatenate(second.data["validation"].with_format("numpy")["features"]),
                          np.concatenate(first.data["validation"].with_format("numpy")["features"]))
    assert torch.equal(second.stats[0], first.stats[0])
    with pytest.raises(CorpusError, match="no usable utterances"):  # another setting is another entry: read again
        _module(fsdd, tmp_path, n_mels=20).load()


def test_normalization_is_fitted_on_the_train_split_only(tmp_path):
    make_fsdd(tmp_path / "fsdd", indices=range(10))
    for path in (tmp_path / "fsdd" / "recordings").glob("*_*_[0-4].wav"):  # test recordings 20x quieter
        wave, rate = soundfile.read(path, dtype="float32")
        soundfile.write(path, wave / 20, rate)
    dm = _module(tmp_path, tmp_path / "cache", validation_indices=(5, 6))
    dm.load()
    frames = {s: np.concatenate(dm.data[s].with_format("numpy")["features"]).astype(np.float64) for s in dm.data}
    mean, std = dm.stats
    assert np.allclose(mean, frames["train"].mean(0), atol=1e-4) and np.allclose(std, frames["train"].std(0), atol=1e-4)
    pooled = np.concatenate(list(frames.values())).mean(0)
    assert np.abs(pooled - frames["train"].mean(0)).max() > 0.5  # so the check above tells them apart
    batch = _batches(dm, "test")[0]
    raw = dm.data["test"].with_format("numpy")[int(evaluation_batches(np.array(dm.data["test"]["num_frames"]),
                                                                      batch_size=4)[0][0])]["features"]
    assert torch.allclose(batch["inputs"][0, : len(raw)], (torch.from_numpy(raw) - mean) / std, atol=1e-5)


def test_batches_follow_the_contract(fsdd, tmp_path):
    dm = _module(fsdd, tmp_path)
    for split in ("train", "validation"):
        for batch in _batches(dm, split):
            assert set(batch) == {"inputs", "input_lengths", "targets", "target_lengths", "epoch", "batch"}
            inputs, lengths, targets, target_lengths = (batch[k] for k in ("inputs", "input_lengths", "targets",
                                                                             "target_lengths"))
            assert inputs.dtype == torch.float32 and inputs.shape[2] == dm.num_features == 40
            assert lengths.dtype == targets.dtype == target_lengths.dtype == torch.int64
            assert inputs.shape[:2] == (len(lengths), int(lengths.max()))
            assert targets.shape == (len(lengths), int(target_lengths.max()))
            for row, (length, target_length) in enumerate(zip(lengths.tolist(), target_lengths.tolist())):
                assert not inputs[row, length:].any() and inputs[row, :length].abs().sum(1).gt(0).all()
                assert not targets[row, target_length:].any() and targets[row, :target_length].ge(1).all()
            assert torch.isfinite(inputs).all()
    val = _batches(dm, "validation")
    order = evaluation_batches(np.array(dm.data["validation"]["num_frames"]), batch_size=4)
    texts = dm.data["validation"]["text"]
    assert [[dm.decode(t.tolist()) for t in b["targets"]] for b in val] == [[texts[i] for i in b] for b in order]
    assert [len(b["input_lengths"]) for b in val] == [4, 2]  # 6 utterances, nothing dropped
    assert [b["input_lengths"].tolist() for b in val] == [sorted(b["input_lengths"].tolist()) for b in val]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("spec_augment", [False, True])  # masks follow the utterance, not the rank
def test_ranks_read_disjoint_blocks_covering_every_global_batch(fsdd, tmp_path, world, spec_augment):
    dm = _module(fsdd, tmp_path, batch_size=4, spec_augment=spec_augment)
    whole = _batches(dm, "train")
    assert len(whole) == 24 // 4
    per_rank = [_batches(_module(fsdd, tmp_path, batch_size=4, spec_augment=spec_augment), "train", rank, world)
                for rank in range(world)]
    rows = 4 // world
    for k, batch in enumerate(whole):
        for rank in range(world):
            mine = per_rank[rank][k]
            for i, length in enumerate(mine["input_lengths"].tolist()):
                assert length == batch["input_lengths"][rank * rows + i]
                assert torch.equal(mine["inputs"][i, :length], batch["inputs"][rank * rows + i, :length])
    # evaluation: whole batches dealt out r::W, every rank at least one, every utterance exactly once
    whole_val = torch.cat([b["input_lengths"] for b in _batches(dm, "validation")])
    val = [_batches(_module(fsdd, tmp_path), "validation", rank, world) for rank in range(world)]
    assert all(len(v) >= 1 for v in val)
    assert sorted(torch.cat([b["input_lengths"] for v in val for b in v]).tolist()) == sorted(whole_val.tolist())
    with pytest.raises(ConfigError, match="multiple of 3"):
        _batches(_module(fsdd, tmp_path, batch_size=4), "train", 0, 3)


def test_bucketing_reads_each_utterance_at_most_once_in_batches_of_similar_length():
    frames = np.random.default_rng(0).integers(50, 1000, size=1003)
    epoch0 = training_batches(frames, batch_size=10, batches_per_bucket=100, seed=1, epoch=0)
    assert len(epoch0) == 100 and all(len(b) == 10 for b in epoch0)
    flat = np.concatenate(epoch0)
    assert len(set(flat.tolist())) == 1000  # 3 dropped, none twice
    ranges = sorted((frames[b].min(), frames[b].max()) for b in epoch0)  # one bucket: sorted runs
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(ranges))
    def padding(batches):
        return sum(int(frames[b].max() * len(b) - frames[b].sum()) for b in batches)

    unbucketed = training_batches(frames, batch_size=10, batches_per_bucket=1, seed=1, epoch=0)
    assert padding(epoch0) < padding(unbucketed) / 10
    again = training_batches(frames, batch_size=10, batches_per_bucket=100, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, again))
    epoch1 = training_batches(frames, batch_size=10, batches_per_bucket=100, seed=1, epoch=1)
    assert [b.tolist() for b in epoch1] != [b.tolist() for b in epoch0]


def test_resume_from_state_dict_gives_the_same_remaining_batches(fsdd, tmp_path):
    settings = {"spec_augment": True, "batches_per_bucket": 2}
    dm = _module(fsdd, tmp_path, **settings)
    epoch0 = _batches(dm, "train")
    loader = dm.train_dataloader()
    epoch1 = list(loader)
    assert epoch0[0]["epoch"] == 0 and epoch1[0]["epoch"] == 1
    assert [b["input_lengths"].tolist() for b in epoch1] != [b["input_lengths"].tolist() for b in epoch0]
    for batch in epoch1[:2]:  # as if a checkpoint were written after the second batch of epoch 1
        dm.on_after_batch_transfer(batch, 0)
    state = dm.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2) and state["tokens"] == "0123456789"

    resumed = _module(fsdd, tmp_path, **settings)
    resumed.load_state_dict(state)
    rest = _batches(resumed, "train")
    assert [b["batch"] for b in rest] == list(range(2, len(epoch1)))
    for mine, theirs in zip(rest, epoch1[2:]):
        assert torch.equal(mine["inputs"], theirs["inputs"]) and torch.equal(mine["targets"], theirs["targets"])
    assert next(iter(resumed.train_dataloader()))["epoch"] == 2


@pytest.mark.parametrize(("settings", "message"), [
    ({"tokens": "chars"}, "trained with tokens '0123456789', but data.tokens is chars"),
    ({"n_mels": 32}, "has 40 mel bins, but data.n_mels is 32; set data.n_mels to match the checkpoint"),
])
def test_resuming_under_other_tokens_or_mel_bins_is_refused_before_training(fsdd, tmp_path, settings, message):
    state = _module(fsdd, tmp_path).state_dict()
    _module(fsdd, tmp_path).check_resume(state, "checkpoint last.ckpt")  # the same settings continue it
    with pytest.raises(ConfigError, match=re.escape(message)):
        _module(fsdd, tmp_path, **settings).check_resume(state, "checkpoint last.ckpt")
    with pytest.raises(ConfigError, match="set data.tokens to match"):  # a checkpoint without the key
        _module(fsdd, tmp_path).check_resume({k: v for k, v in state.items() if k != "tokens"}, "checkpoint x")


def test_spec_augment_masks_training_batches_only(fsdd, tmp_path):
    plain, masked = _module(fsdd, tmp_path), _module(fsdd, tmp_path, spec_augment=True, time_mask_width=10)
    for a, b in zip(_batches(plain, "validation"), _batches(masked, "validation")):
        assert torch.equal(a["inputs"], b["inputs"])
    changed = 0
    for a, b in zip(_batches(plain, "train"), _batches(masked, "train")):
        differ = a["inputs"] != b["inputs"]
        assert not b["inputs"][differ].any()  # masks only zero values
        changed += int(differ.sum())
    assert changed > 0
    again = _batches(_module(fsdd, tmp_path, spec_augment=True, time_mask_width=10), "train")
    assert all(torch.equal(x["inputs"], y["inputs"]) for x, y in zip(again, _batches(masked, "train")))


def test_loader_workers_yield_the_same_batches(fsdd, tmp_path):
    single = _batches(_module(fsdd, tmp_path), "train")
    workers = _batches(_module(fsdd, tmp_path, num_workers=2), "train")
    assert [(b["epoch"], b["batch"]) for b in workers] == [(0, k) for k in range(len(single))]
    assert all(torch.equal(a["inputs"], b["inputs"]) for a, b in zip(single, workers))


def test_librispeech_layout_and_hf_audio_datasets_give_the_same_features(tmp_path):
    make_librispeech(tmp_path / "ls")
    common = {"tokens": "chars", "sample_rate": 16000, "data_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
              "batch_size": 2, "eval_batch_size": 2}
    libri = SpeechDataModule(corpus="ls", **common)
    libri.load()
    assert libri.data["validation"]["text"] == ["a dab", "face", "bee"]  # speaker 19, then 26
    splits = {}
    for split, folder in LIBRISPEECH_SPLITS.items():
        rows = []
        for transcript in sorted((tmp_path / "ls" / folder).rglob("*.trans.txt")):
            for line in transcript.read_text().splitlines():
                utt, text = line.split(" ", 1)
                rows.append({"audio": str(transcript.parent / f"{utt}.flac"), "sentence": text})
        splits[split] = rows
    saved = datasets.DatasetDict({s: datasets.Dataset.from_list(r).cast_column("audio", datasets.Audio())
                                  for s, r in splits.items()})
    saved.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub").mkdir()
    for split, rows in splits.items():  # load_dataset by name: here a local folder of JSON-lines splits
        (tmp_path / "hub" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for corpus in ("saved", f"hf:{tmp_path / 'hub'}"):
        hf = SpeechDataModule(corpus=corpus, text_column="sentence", **common)
        hf.load()
        for split in LIBRISPEECH_SPLITS:
            assert hf.data[split]["text"] == libri.data[split]["text"]
            a, b = (np.concatenate(m.data[split].with_format("numpy")["features"]) for m in (hf, libri))
            assert np.array_equal(a, b)


def test_bad_utterances_are_skipped_counted_and_reported(tmp_path, caplog):
    make_librispeech(tmp_path / "ls", transcripts={"train": ["a cab", "bad ace", "dead bee", "faded", "cafe", "x",
                                                             "caf\u00e9", "abcdefabcdef", "dab"],
                                                   "validation": ["a dab"], "test": ["cab"]})
    train = tmp_path / "ls" / "train-clean-100"
    (train / "19" / "198" / "19-198-0000.flac").write_bytes(b"not a flac file" * 10)  # "a cab": corrupt
    trans = next((train / "26" / "198").glob("*.trans.txt"))
    trans.write_text(trans.read_text().replace("26-198-0005 X", "26-198-0005 "))  # empty transcript
    soundfile.write(train / "26" / "198" / "26-198-0007.flac", speak("a", 16000)[:480], 16000)  # 3 frames, 12 labels
    dm = SpeechDataModule(corpus="ls", tokens="chars", sample_rate=16000, data_dir=str(tmp_path),
                          cache_dir=str(tmp_path / "cache"), batch_size=2, eval_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="bptt.datamodules.speech"):
        batches = _batches(dm, "train")
    assert dm.report["splits"]["train"]["skipped"] == {"unreadable audio": 1, "empty transcript": 1,
                                                       "characters outside the token set": 1,
                                                       "too short for its transcript": 1}
    assert dm.report["splits"]["train"]["utterances"] == 5
    assert sorted(dm.data["train"]["text"]) == ["bad ace", "cafe", "dab", "dead bee", "faded"]
    assert all(torch.isfinite(b["inputs"]).all() for b in batches)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("4 utterances skipped in split train: unreadable audio 1") and "19-198-0000.flac" in line
    (path,) = dm.save_artifacts(tmp_path)
    report = json.loads(path.read_text())
    assert path.name == "data_report.json" and report["splits"]["train"]["skipped"]["empty transcript"] == 1
    assert report["splits"]["validation"]["frames"] == dm.data["validation"]["num_frames"][0]


def test_a_16khz_recording_in_an_8khz_corpus_is_resampled(tmp_path):
    make_fsdd(tmp_path / "fsdd", indices=range(10))
    test = fsdd_split(fsdd_recordings(tmp_path / "fsdd"), (5, 6))["test"]
    composed = compose_fsdd(test, split="test", count=8, seed=0, digits_per_utterance=(2, 7), gap_seconds=(0.05, 0.3))
    odd = composed[0].recordings[0]
    soundfile.write(odd.path, tone([400.0, 1900.0], 0.25, 16000), 16000)  # same 0.25 s, twice the samples
    dm = _module(tmp_path, tmp_path / "cache", validation_indices=(5, 6), utterances=(8, 4, 8))
    dm.load()
    expected = [num_frames(sum(round(g * 8000) for g in c.gaps) + 2000 * len(c.recordings), 8000) for c in composed]
    assert dm.data["test"]["num_frames"] == expected


def test_a_split_left_empty_fails_with_one_line_naming_the_reason(tmp_path):
    make_librispeech(tmp_path / "ls", transcripts={"train": ["a cab", "dab"], "validation": ["caf\u00e9"],
                                                   "test": ["cab"]})
    dm = SpeechDataModule(corpus="ls", tokens="chars", sample_rate=16000, data_dir=str(tmp_path),
                          cache_dir=str(tmp_path / "cache"), batch_size=1)
    with pytest.raises(CorpusError,
                       match=r"validation split .* no usable utterances \(characters outside the token set 1;") as err:
        dm.load()
    assert _one_line(err)


def test_missing_corpora_and_bad_settings_fail_with_one_line(tmp_path):
    with pytest.raises(CorpusError, match="does not exist; set data.data_dir or \\$BPTT_DATA_DIR") as err:
        SpeechDataModule(data_dir=str(tmp_path), cache_dir=str(tmp_path)).load()
    assert _one_line(err) and str(tmp_path / "fsdd") in str(err.value)
    (tmp_path / "fsdd" / "recordings").mkdir(parents=True)
    with pytest.raises(CorpusError, match="no {digit}_{speaker}_{index}.wav recordings") as err:
        SpeechDataModule(data_dir=str(tmp_path), cache_dir=str(tmp_path)).load()
    assert _one_line(err)
    (tmp_path / "ls" / "dev-clean").mkdir(parents=True)
    with pytest.raises(CorpusError, match="set data.splits.train") as err:
        SpeechDataModule(corpus="ls", data_dir=str(tmp_path), cache_dir=str(tmp_path)).load()
    for bad, match in (({"batch_size": 0}, "batch_size"), ({"eval_batch_size": 0}, "eval_batch_size"),
                       ({"digits_per_utterance": (3, 2)}, "digits_per_utterance"),
                       ({"gap_seconds": (-0.1, 0.2)}, "gap_seconds"), ({"validation_indices": (3, 8)}, "test split"),
                       ({"utterances": (10, 0, 5)}, "utterances"), ({"n_mels": 200}, "n_mels"),
                       ({"tokens": "words"}, "tokens"), ({"splits": {"train": "a"}}, "splits")):
        with pytest.raises(ConfigError, match=match):
            SpeechDataModule(**bad)


def test_tokens_and_featurize_from_a_checkpoint_without_the_corpus(fsdd, tmp_path):
    assert SpeechDataModule(data_dir=str(tmp_path / "nowhere")).vocab_size == 11
    chars = SpeechDataModule(tokens="chars")
    assert chars.vocab_size == 29 and chars.tokens[0] == " " and chars.encode("It's  A") == [11, 22, 2, 21, 1, 3]
    assert chars.decode([0, 11, 22, 0, 99, 2, -1, 21]) == "it's"
    with pytest.raises(CorpusError, match="not in the chars token set"):
        chars.encode("caf\u00e9")
    dm = _module(fsdd, tmp_path)
    dm.load()
    wav = fsdd / "fsdd" / "recordings" / "7_bob_3.wav"
    feats = dm.featurize(wav)
    assert feats.shape == (num_frames(2000, 8000), 40)
    state = dm.state_dict()
    fresh = SpeechDataModule(data_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "empty"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.featurize(wav), feats) and not (tmp_path / "empty").exists()
    with pytest.raises(ConfigError, match="set data.tokens"):
        SpeechDataModule(tokens="chars").load_state_dict(state)


def test_real_fsdd_official_split_and_features():
    root = SHARED_DATA / "fsdd"
    if not (root / "recordings").is_dir():
        pytest.skip(f"reference data absent: {root} (only in the workspace that has ../shared/data)")
    by_split = fsdd_split(fsdd_recordings(root), (5, 9))
    assert len(by_split["test"]) == 300 and {r.index for r in by_split["test"]} == set(range(5))
    assert len(by_split["validation"]) == 300 and len(by_split["train"]) == 2400
    assert {r.speaker for r in by_split["test"]} == {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
    dm = SpeechDataModule(corpus=str(root), utterances=(8, 4, 4), batch_size=4, eval_batch_size=4)
    batch = _batches(dm, "test")[0]
    assert batch["inputs"].shape[0] == 4 and torch.isfinite(batch["inputs"]).all()
    assert all(2 <= n <= 7 for n in batch["target_lengths"].tolist())


def test_evaluation_batches_give_every_rank_one_when_few():
    frames = np.array([5, 3, 9, 1, 7])
    assert [b.tolist() for b in evaluation_batches(frames, batch_size=64)] == [[3, 1, 0, 4, 2]]
    assert [b.tolist() for b in evaluation_batches(frames, batch_size=64, world_size=2)] == [[3, 1, 0], [4, 2]]
    assert [b.tolist() for b in evaluation_batches(frames, batch_size=2, world_size=2)] == [[3, 1], [0, 4], [2]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 1}, r"data.sample_rate must be in \[1000, 384000\] \(Hz\), got 1$"),
        ({"sample_rate": 999}, r"data.sample_rate must be in \[1000, 384000\] \(Hz\), got 999$"),
        ({"sample_rate": 384_001}, r"data.sample_rate must be in \[1000, 384000\] \(Hz\), got 384001$"),
        ({"seed": -1}, r"data.seed must be >= 0 \(numpy seeds the composition and the order\), got -1$"),
        ({"num_workers": -1}, "data.num_workers must be >= 0, got -1$"),
        ({"batches_per_bucket": 0}, "data.batches_per_bucket must be >= 1, got 0$"),
        ({"time_mask_width": -5}, "data.time_mask_width must be >= 0, got -5$"),
    ],
)
def test_bad_settings_are_config_errors_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        SpeechDataModule(**kwargs)
    assert _one_line(err)


def _wave(seconds: float = 0.5, rate: int = 8000) -> np.ndarray:
    return tone([400.0, 1900.0], seconds, rate)


def _cut(size: int):
    def write(path):
        soundfile.write(path, _wave(), 8000, format="WAV", subtype="PCM_16")
        path.write_bytes(path.read_bytes()[:size])
    return write


def _float_with(value: float, at: int):
    def write(path):
        wave = _wave()
        wave[at] = value
        soundfile.write(path, wave, 8000, format="WAV", subtype="FLOAT")
    return write


def _at_rate(rate: int):
    return lambda path: soundfile.write(path, _wave(0.5, 8000), rate, format="WAV", subtype="PCM_16")


BAD_AUDIO = {  # how to write the file, what the one line says after "audio PATH " (or "cannot read audio PATH")
    "header-only": (_cut(44), "has no samples; replace or remove the file"),
    "truncated": (_cut(100), r"has 28 sample\(s\) at 8000 Hz \(3.5 ms\), fewer than one 25 ms feature window \(200\); "
                             "it is cut short or empty: replace or remove the file"),
    "cut-short": (_cut(2000), r"is cut short: its header declares 4000 sample\(s\) \(0.500 s\) and it holds 978; "
                              "replace or remove the file"),
    "one-sample": (lambda path: soundfile.write(path, _wave()[:1], 8000, format="WAV"),
                   r"has 1 sample\(s\) at 8000 Hz \(0.1 ms\), fewer than one 25 ms feature window"),
    "24-ms": (lambda path: soundfile.write(path, _wave(0.024), 8000, format="WAV"), r"has 192 sample\(s\) at 8000 Hz"),
    "nan": (_float_with(np.nan, 300), r"has a non-finite sample \(nan\) at sample 300 \(0.037 s\); replace or remove"),
    "inf": (_float_with(np.inf, 3999), r"has a non-finite sample \(inf\) at sample 3999 \(0.500 s\)"),
    "-inf": (_float_with(-np.inf, 0), r"has a non-finite sample \(-inf\) at sample 0 \(0.000 s\)"),
    "huge": (_float_with(1e30, 100), r"gives non-finite features \(peak sample 1e\+30, audio lies in \[-1, 1\]\)"),
    "1-hz": (_at_rate(1), r"has a sample rate of 1 Hz, outside 1000..384000 Hz; its header is damaged or it is not a "
                          "recording: replace or remove the file"),
    "999-hz": (_at_rate(999), "has a sample rate of 999 Hz, outside 1000..384000 Hz"),
    "768-khz": (_at_rate(768_000), "has a sample rate of 768000 Hz, outside"),
    "not-audio": (lambda path: path.write_bytes(b"RIFF not really a wave file"), "Error opening"),
}


def _featurizer() -> SpeechDataModule:
    """A SpeechDataModule with the normalization a checkpoint gives it: featurize needs no corpus."""
    dm = SpeechDataModule(data_dir="/nonexistent", cache_dir="/nonexistent")
    dm.load_state_dict({"tokens": dm.tokens, "mean": [0.0] * 40, "std": [1.0] * 40, "epoch": 0, "batch": 0})
    return dm


@pytest.mark.parametrize(("write", "message"), list(BAD_AUDIO.values()), ids=list(BAD_AUDIO))
def test_featurize_refuses_unusable_audio_in_one_line_naming_the_file(write, message, tmp_path):
    path = tmp_path / "bad.wav"
    write(path)
    with pytest.raises(CorpusError, match=f"^(cannot read )?audio {re.escape(str(path))}:? {message}") as err:
        _featurizer().featurize(path)
    assert _one_line(err)


@pytest.mark.parametrize(("seconds", "rate"), [(0.025, 8000), (0.025, 1000), (0.5, 384_000), (0.3, 44_100)])
def test_featurize_accepts_audio_at_the_edges_of_the_rules(seconds, rate, tmp_path):
    soundfile.write(tmp_path / "ok.wav", _wave(seconds, rate), rate, subtype="FLOAT")
    feats = _featurizer().featurize(tmp_path / "ok.wav")
    assert feats.shape == (num_frames(round(seconds * 8000), 8000), 40) and torch.isfinite(feats).all()


def test_unusable_training_audio_is_a_counted_skip(tmp_path):
    texts = ["a cab", "bad ace", "dead bee", "faded", "cafe", "dab", "bead", "deaf cab", "ace"]
    make_librispeech(tmp_path / "ls", transcripts={"train": texts, "validation": ["a dab"], "test": ["cab"]})
    train = tmp_path / "ls" / "train-clean-100"
    bad = ["truncated", "cut-short", "one-sample", "nan", "inf", "huge", "1-hz"]
    for i, name in enumerate(bad):  # soundfile reads what the bytes are, whatever the .flac name says
        BAD_AUDIO[name][0](next(train.rglob(f"*-{i:04d}.flac")))
    dm = SpeechDataModule(corpus="ls", tokens="chars", sample_rate=16000, data_dir=str(tmp_path),
                          cache_dir=str(tmp_path / "cache"), batch_size=2, eval_batch_size=1)
    dm.load()
    assert dm.report["splits"]["train"]["skipped"] == {"unreadable audio": len(bad)}
    assert sorted(dm.data["train"]["text"]) == sorted(texts[len(bad):])
    assert all(np.isfinite(f).all() for f in dm.data["train"].with_format("numpy")["features"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_speech_checkpoint(tmp_path_factory.mktemp("speech-checkpoint") / "untrained.ckpt")


@pytest.mark.parametrize("name", ["truncated", "cut-short", "one-sample", "nan", "-inf", "huge", "1-hz", "768-khz"])
def test_bptt_transcribe_stops_with_one_line_naming_the_file_and_exit_2(name, checkpoint, tmp_path, capsys):
    good, bad = tmp_path / "good.wav", tmp_path / f"{name}.wav"
    soundfile.write(good, _wave(), 8000)
    BAD_AUDIO[name][0](bad)
    assert main(["transcribe", str(checkpoint), str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and re.match(f"bptt: error: audio {re.escape(str(bad))} {BAD_AUDIO[name][1]}", err[0]), err
    assert captured.out == ""  # not even the good file's line: every file is checked before any is transcribed
    assert main(["transcribe", str(checkpoint), str(good)]) == 0
    assert capsys.readouterr().out.startswith(f"{good}\t")
