"""A text corpus on its way to token ids: its sources and splits, then the vocabulary built from
its train split and the tokenization of every split, cached through ``datasets``.

Sources (the ``corpus`` argument of ``TextStreamDataModule``):

- ``stdlib``: the ``.py`` files of the running Python's standard library, an offline
  code corpus every machine has;
- a ``.txt`` file, split by fractions (e.g. ``tinyshakespeare/input.txt``, 90/5/5);
- a directory with ``train.txt``, ``valid.txt`` (or ``validation.txt``) and ``test.txt``
  (PTB layout) or ``wiki.{train,valid,test}.tokens`` (WikiText layout);
- a directory written by ``Dataset(Dict).save_to_disk``;
- ``hf:NAME``, a Hugging Face Hub dataset loaded with ``datasets.load_dataset``.

Paths are relative to the data root: ``data_dir`` if given, else ``$BPTT_DATA_DIR``,
else ``./data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal, Protocol

import datasets
import numpy as np
import pyarrow.compute as pc

from bptt.datamodules.sources import SPLITS, CorpusError, data_root, load_saved, reading_cache

UNK, EOS = "<unk>", "<eos>"

_DIR_LAYOUTS = (
    {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
    {"train": "train.txt", "validation": "validation.txt", "test": "test.txt"},
    {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"},
)


def corpus_identity(
    corpus: str, *, data_dir: str | None = None, stdlib_glob: str = "**/*.py", hf_config: str | None = None,
    text_column: str = "text",
) -> list[object] | None:
    """What a corpus is made of, without reading it: paths, sizes and modification times of its
    files (or a Hugging Face name and config). None when the corpus cannot be found."""
    if corpus.startswith("hf:"):
        return [corpus, hf_config, text_column]
    if corpus == "stdlib":
        spec: list[object] = [corpus, stdlib_glob]
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob(stdlib_glob))
    else:
        path = data_root(data_dir) / corpus
        if not path.exists():
            return None
        spec = [corpus, text_column]
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return spec + [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def read_utf8(path: Path) -> str:
    """A text file's contents; a clear error when it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`"
        ) from None


def stdlib_text(pattern: str) -> tuple[str, str]:
    """The standard library's ``.py`` files matching ``pattern``, concatenated in path order.

    Returns:
        (text, a description naming the Python version and file count).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.glob(pattern)
        if p.is_file() and p.suffix == ".py" and "site-packages" not in p.parts and not {"test", "tests"} & set(p.parts)
    )
    if not files:
        raise CorpusError(f"no standard-library .py files match stdlib_glob {pattern!r} under {root}")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts), f"stdlib {root} ({len(files)} files)"


def split_by_fractions(text: str, fractions: tuple[float, float, float]) -> dict[str, str]:
    """Split ``text`` into train/validation/test at the line ends nearest the given fractions."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise CorpusError(f"split_fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    cuts, start = [], 0
    for fraction in (fractions[0], fractions[0] + fractions[1]):
        at = int(len(text) * fraction)
        newline = text.find("\n", at - 1) if at > 0 else -1  # the first line start at or after `at`
        at = 0 if at == 0 else len(text) if newline < 0 else newline + 1
        cuts.append(max(at, start))
        start = cuts[-1]
    return {"train": text[: cuts[0]], "validation": text[cuts[0] : cuts[1]], "test": text[cuts[1] :]}


def _records(texts: dict[str, str]) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"text": text.splitlines(keepends=True)}) for split, text in texts.items()}
    )


def _normalize_split_names(dsd: datasets.DatasetDict, origin: str) -> datasets.DatasetDict:
    names = {"valid": "validation", "val": "validation", "dev": "validation"}
    dsd = datasets.DatasetDict({names.get(k, k): v for k, v in dsd.items()})
    missing = [s for s in SPLITS if s not in dsd]
    if missing:
        raise CorpusError(f"{origin} has splits {sorted(dsd)} but needs train, validation and test (missing {missing})")
    return datasets.DatasetDict({s: dsd[s] for s in SPLITS})


def load_corpus(
    corpus: str,
    *,
    data_dir: str | None = None,
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    stdlib_glob: str = "**/*.py",
    hf_config: str | None = None,
    text_column: str = "text",
) -> tuple[datasets.DatasetDict, str]:
    """Load a corpus as line records.

    Returns:
        (a DatasetDict with train/validation/test splits and a ``text`` column,
        a one-line description of where it came from).
    """
    if corpus == "stdlib":
        text, origin = stdlib_text(stdlib_glob)
        return _records(split_by_fractions(text, split_fractions)), origin
    if corpus.startswith("hf:"):
        name = corpus[3:]
        try:
            dsd = datasets.load_dataset(name, hf_config)
        except Exception as err:  # the hub or the cache; its message says which
            raise CorpusError(f"could not load Hugging Face dataset {name!r} ({type(err).__name__}: {err})") from None
        return _select_text(_normalize_split_names(dsd, f"dataset {name!r}"), text_column, name), f"hf:{name}"
    path = data_root(data_dir) / corpus
    if not path.exists():
        raise CorpusError(
            f"corpus {corpus!r} not found: {path.resolve()} does not exist; set $BPTT_DATA_DIR or data.data_dir "
            "to the directory that holds it, or use corpus: stdlib"
        )
    if path.is_file():
        return _records(split_by_fractions(read_utf8(path), split_fractions)), str(path)
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = load_saved(path)
        if isinstance(loaded, datasets.Dataset):
            raise CorpusError(f"{path} holds a single Dataset; save a DatasetDict with train/validation/test splits")
        return _select_text(_normalize_split_names(loaded, str(path)), text_column, str(path)), str(path)
    for layout in _DIR_LAYOUTS:
        if all((path / name).is_file() for name in layout.values()):
            return _records({split: read_utf8(path / name) for split, name in layout.items()}), str(path)
    raise CorpusError(
        f"{path} is a directory without train.txt/valid.txt/test.txt, wiki.*.tokens or a saved DatasetDict; "
        "point corpus at a .txt file to split it by fractions"
    )




def _select_text(dsd: datasets.DatasetDict, column: str, origin: str) -> datasets.DatasetDict:
    if column not in dsd["train"].column_names:
        raise CorpusError(f"{origin} has columns {dsd['train'].column_names}, not text_column {column!r}")
    return datasets.DatasetDict({s: d.select_columns([column]).rename_column(column, "text") if column != "text"
                                 else d.select_columns(["text"]) for s, d in dsd.items()})


def split_tokens(text: str, level: Literal["char", "word"]) -> list[str]:
    """One record's tokens: its characters, or its whitespace-separated words then ``<eos>`` per line."""
    if level == "char":
        return list(text)
    tokens: list[str] = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


class TokenVocabulary(Protocol):
    """What the DataModule, the token cache, checkpoints and ``bptt generate`` ask of a vocabulary: ``Vocabulary``
    (``data.level``) and ``bptt.datamodules.subword.SubwordVocabulary`` (``data.tokenizer``) alike."""

    level: str  # char, word, bpe or file

    def __len__(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> str: ...

    def state_dict(self) -> dict[str, object]: ...

    def save(self, path: Path) -> None: ...

    def save_artifacts(self, directory: Path) -> list[Path]: ...


class Vocabulary:
    """Token <-> id maps. Id 0 is ``<unk>``; for words, ``<eos>`` follows.

    Args:
        tokens: the tokens in id order.
        level: ``char`` or ``word``.
    """

    def __init__(self, tokens: list[str], level: Literal["char", "word"]) -> None:
        self.tokens = tokens
        self.level = level
        self.index = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], level: Literal["char", "word"], min_count: int = 1) -> Vocabulary:
        """Count tokens in ``texts`` (the train split only); those under ``min_count`` become ``<unk>``.

        Tokens are ordered by count, then by text, so the ids are reproducible.
        """
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(split_tokens(text, level))
        specials = [UNK] if level == "char" else [UNK, EOS]
        kept = sorted((t for t, c in counts.items() if c >= min_count and t not in specials),
                      key=lambda t: (-counts[t], t))
        return cls(specials + kept, level)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; unknown tokens map to ``<unk>`` (0)."""
        return [self.index.get(t, 0) for t in split_tokens(text, self.level)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: characters joined as they are, words by spaces with ``<eos>`` as a line end."""
        tokens = [self.tokens[i] for i in ids]
        if self.level == "char":
            return "".join(tokens)
        return " ".join(tokens).replace(f" {EOS} ", "\n").replace(EOS, "\n")

    def fingerprint(self) -> str:
        """A short hash of the token list and level, for cache keys."""
        return hashlib.sha256(json.dumps([self.level, self.tokens]).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The setting that made it, e.g. ``data.level=char``."""
        return f"data.level={self.level}"

    def state_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "level": self.level}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> Vocabulary:
        return cls(list(state["tokens"]), state["level"])  # type: ignore[arg-type]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.state_dict(), ensure_ascii=False), encoding="utf-8")

    def save_artifacts(self, directory: Path) -> list[Path]:
        """``vocab.json``."""
        path = directory / "vocab.json"
        self.save(path)
        return [path]

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read a ``vocab.json`` written by ``save``."""
        try:
            return cls.from_state_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorpusError(f"cannot read vocabulary {path}: {err}; pass the vocab.json that a run saved") from None


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """``datasets`` draws no progress bar inside (it is switched process-wide: restored on leaving)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def tokenize_split(records: datasets.Dataset, vocab: TokenVocabulary, cache_file: Path) -> np.ndarray:
    """Token ids of a split's records, concatenated in order, memory-mapped from disk.

    The ids are computed with a batched ``datasets.map`` whose result is cached in
    ``cache_file`` (an Arrow file), so a second run reads them instead of tokenizing.
    Their concatenation is written once beside it as ``.npy`` and memory-mapped, so a
    corpus of any length costs page cache, not process memory.

    Returns:
        (N,) int32 ids, a copy-on-write memory map.

    Raises:
        CorpusError: a cache file is corrupt.
    """
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    flat_file = cache_file.with_suffix(".npy")
    if not flat_file.exists():

        def encode_batch(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            return {"ids": vocab.encode_batch(batch["text"])}

        with reading_cache(cache_file) if cache_file.exists() else nullcontext(), _no_progress_bars():  # a refusal
            tokenized = records.map(  # that follows (the data's checks) is one line
                encode_batch,
                batched=True,
                remove_columns=records.column_names,
                cache_file_name=str(cache_file),
                load_from_cache_file=True,
                desc=f"tokenizing {cache_file.stem}",
            )
            column = tokenized.data.column("ids")
        total = int(pc.sum(pc.list_value_length(column)).as_py() or 0)
        partial = flat_file.with_suffix(".partial.npy")
        flat = np.lib.format.open_memmap(partial, mode="w+", dtype=np.int32, shape=(total,))
        position = 0
        for chunk in column.chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            flat[position : position + len(values)] = values
            position += len(values)
        flat.flush()
        del flat
        os.replace(partial, flat_file)  # atomic: a crash leaves no half-written cache
    return load_token_ids(flat_file, len(vocab))


def load_token_ids(path: Path, vocab_size: int) -> np.ndarray:
    """The ids that ``tokenize_split`` saved in ``path`` (``.npy``), memory-mapped copy-on-write.

    Raises:
        CorpusError: the file is corrupt: unreadable, not a 1-D int32 array, or holding ids
            outside the vocabulary (which would fail later, inside the embedding).
    """
    with reading_cache(path):
        ids = np.load(path, mmap_mode="c")
        if ids.dtype != np.int32 or ids.ndim != 1:
            raise ValueError(f"{ids.dtype} array of shape {ids.shape}, not 1-D int32 token ids")
        if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
            raise ValueError(f"ids from {int(ids.min())} to {int(ids.max())} in a vocabulary of {vocab_size}")
    return ids
