"""DataModule caches: a cache directory that cannot be written and cache files that cannot be read back
stop in one line naming the path and the fix; deleting what the line names rebuilds the cache."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bptt.cli import main
from bptt.datamodules import SpeechDataModule, TextStreamDataModule
from bptt.datamodules.sources import CorpusError
from bptt.errors import ConfigError
from tests.bptt_command import SMALL
from tests.conftest import PROJECT
from tests.speech_data import make_fsdd

FIX = "point data.cache_dir or $BPTT_CACHE_DIR at another directory"
ASR = str(PROJECT / "conf/asr/fsdd_digits.yaml")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """A data root with a small text file and a synthetic FSDD (indices 0-7: test 0-4, validation 5-6, train 7)."""
    root = tmp_path_factory.mktemp("cache-corpora")
    (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 60)
    make_fsdd(root / "fsdd", indices=range(8))
    return root


def _text(root: Path, cache: Path | None) -> TextStreamDataModule:
    return TextStreamDataModule(corpus="t.txt", data_dir=str(root), cache_dir=cache and str(cache), batch_size=2,
                                eval_batch_size=2, bptt=4)


def _speech(root: Path, cache: Path | None) -> SpeechDataModule:
    return SpeechDataModule(corpus="fsdd", data_dir=str(root), cache_dir=cache and str(cache), utterances=(4, 2, 2),
                            batch_size=2, eval_batch_size=2, validation_indices=(5, 6))


MODULES: dict[str, Callable] = {"text": _text, "speech": _speech}


def _mount_tmpfs(path: Path, options: str) -> None:
    """Mount a small tmpfs at ``path``; a skip where this process may not mount (the tests run as root, where
    permission bits do not stop writes, so a read-only mount is the way to get a directory that refuses them)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},size=16m", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot run mount: {err}")
    if done.returncode:
        pytest.skip(f"a read-only mount needs root with CAP_SYS_ADMIN ({done.stderr.strip()})")


@pytest.fixture
def mounts():
    """Mount tmpfs file systems (``mount(path, options)``), unmounted after the test; skips where mounting fails."""
    mounted: list[Path] = []

    def mount(path: Path, options: str = "rw") -> Path:
        _mount_tmpfs(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only mount"])
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_an_unusable_cache_dir_fails_in_one_line_and_writes_nothing(kind, where, corpora, tmp_path, mounts):
    (tmp_path / "file").write_text("not a directory")
    cache = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "cache",
             "read-only mount": tmp_path / "ro" / "cache"}[where]
    if where == "read-only mount":
        mounts(tmp_path / "ro", "ro")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=f"^cache directory {re.escape(str(cache))}") as err:
        MODULES[kind](corpora, cache).prepare_data()
    message = str(err.value)
    assert "\n" not in message and message.endswith(FIX)
    assert ("is a file, not a directory" in message) == (where != "read-only mount")
    assert "Read-only file system" in message or where != "read-only mount"
    assert _tree(tmp_path) == before and (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_a_cache_dir_from_the_environment_is_named(kind, corpora, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=f"cache directory {re.escape(str(tmp_path / 'file'))}.* is a file"):
        MODULES[kind](corpora, None).prepare_data()


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_a_built_cache_on_a_read_only_mount_is_still_used(kind, corpora, tmp_path, mounts):
    cache = mounts(tmp_path / "cache")
    built = MODULES[kind](corpora, cache)
    built.prepare_data()
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    reread = MODULES[kind](corpora, cache)
    reread.prepare_data()
    if kind == "text":
        assert all(torch.equal(reread.ids[s], built.ids[s]) for s in built.ids)
    else:
        assert reread.data["train"]["features"] == built.data["train"]["features"]


@pytest.mark.parametrize(
    ("kind", "args"),
    [("text", SMALL), ("speech", ["--config", ASR, "--data.corpus", "fsdd", "--data.utterances", "[4, 2, 2]"])],
)
@pytest.mark.parametrize("how", ["--data.cache_dir", "$BPTT_CACHE_DIR"])
def test_bptt_fit_stops_with_one_line_and_exit_2(kind, args, how, corpora, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BPTT_DATA_DIR", str(corpora))
    if how == "$BPTT_CACHE_DIR":
        monkeypatch.setenv("BPTT_CACHE_DIR", str(tmp_path / "file"))
    cache = [] if how == "$BPTT_CACHE_DIR" else ["--data.cache_dir", str(tmp_path / "file" / "sub")]
    run_dir = tmp_path / "run"
    code = main(["fit", *args, *cache, "--trainer.default_root_dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"bptt: error: cache directory {tmp_path / 'file'}"), err
    assert not run_dir.exists()


# ---------------------------------------------------------------- corrupt cache files


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 3)


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _json(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def _short_mean(path: Path) -> None:
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "mean": manifest["mean"][:3]}))


def _ids_beyond_the_vocabulary(path: Path) -> None:
    np.save(path, np.full(500, 10_000, dtype=np.int32))


def _float_ids(path: Path) -> None:
    np.save(path, np.zeros(500, dtype=np.float64))


TEXT_CASES = {  # the file to damage, the damage, the files to delete first, the error detail
    "manifest-not-json": ("corpus-*.json", _json("{not json"), [], "JSONDecodeError"),
    "manifest-empty": ("corpus-*.json", _json("{}"), [], "KeyError: 'splits'"),
    "manifest-bad-path": ("corpus-*.json", _json('{"splits": {"train": 1}}'), [], "TypeError"),
    "ids-garbage": ("tokenized/train-*.npy", _garbage, [], "ValueError"),
    "ids-cut-short": ("tokenized/train-*.npy", _halve, [], "ValueError: mmap length is greater than file size"),
    "ids-beyond-vocab": ("tokenized/train-*.npy", _ids_beyond_the_vocabulary, [],
                         "ids from 10000 to 10000 in a vocabulary of"),
    "ids-float": ("tokenized/train-*.npy", _float_ids, [], "float64 array of shape (500,), not 1-D int32 token ids"),
    "arrow-garbage": ("tokenized/train-*.arrow", _garbage, ["tokenized/train-*.npy"], "ArrowInvalid"),
}
SPEECH_CASES = {  # the file to damage, the damage, what the error names as corrupt, the error detail
    "manifest-not-json": ("manifest.json", _json("{not json"), "manifest.json", "JSONDecodeError"),
    "manifest-empty": ("manifest.json", _json("{}"), "manifest.json", "KeyError: 'report'"),
    "manifest-short-mean": ("manifest.json", _short_mean, "manifest.json",
                            "the normalization is not 40 finite means and stds"),
    "info-not-json": ("train/dataset_info.json", _json("{not json"), "train", "JSONDecodeError"),
    "state-a-list": ("validation/state.json", _json("[]"), "validation", "TypeError"),
    "arrow-cut-short": ("test/data-00000-of-00001.arrow", _halve, "test", "OSError"),
    "arrow-garbage": ("train/data-00000-of-00001.arrow", _garbage, "train", "ArrowInvalid"),
}


@pytest.mark.parametrize(("target", "damage", "deleted", "detail"), list(TEXT_CASES.values()), ids=list(TEXT_CASES))
def test_a_corrupt_token_cache_names_the_file_and_deleting_it_rebuilds(target, damage, deleted, detail, corpora,
                                                                        tmp_path):
    pristine = _text(corpora, tmp_path)
    pristine.prepare_data()
    expected = {split: ids.clone() for split, ids in pristine.ids.items()}  # not the memory map damaged below
    for pattern in deleted:
        next(tmp_path.glob(pattern)).unlink()
    path = next(tmp_path.glob(target))
    damage(path)
    with pytest.raises(CorpusError) as err:
        _text(corpora, tmp_path).prepare_data()
    message = str(err.value)
    assert message.startswith(f"the cache {path} is corrupt (") and detail in message and "\n" not in message
    assert message.endswith(f"delete {path} to rebuild it, or {FIX}")
    path.unlink()
    rebuilt = _text(corpora, tmp_path)
    rebuilt.prepare_data()
    assert all(torch.equal(rebuilt.ids[s], expected[s]) for s in expected)


@pytest.fixture(scope="module")
def speech_cache(corpora, tmp_path_factory) -> Path:
    """A built feature cache of the synthetic FSDD, to copy and damage."""
    cache = tmp_path_factory.mktemp("speech-cache")
    _speech(corpora, cache).prepare_data()
    return cache


@pytest.mark.parametrize(("target", "damage", "named", "detail"), list(SPEECH_CASES.values()),
                         ids=list(SPEECH_CASES))
def test_a_corrupt_feature_cache_names_the_entry_and_deleting_it_rebuilds(target, damage, named, detail, corpora,
                                                                          speech_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(speech_cache, cache)
    (entry,) = (p for p in (cache / "speech").iterdir() if p.is_dir())
    damage(entry / target)
    with pytest.raises(CorpusError) as err:
        _speech(corpora, cache).prepare_data()
    message = str(err.value)
    assert message.startswith(f"the cache {entry / named} is corrupt (") and detail in message and "\n" not in message
    assert message.endswith(f"delete {entry} to rebuild it, or {FIX}")
    shutil.rmtree(entry)
    rebuilt, pristine = _speech(corpora, cache), _speech(corpora, speech_cache)
    rebuilt.prepare_data()
    pristine.prepare_data()
    assert rebuilt.data["train"]["features"] == pristine.data["train"]["features"]
    assert torch.equal(rebuilt.stats[0], pristine.stats[0])
