"""Text corpora as ``datasets.DatasetDict``s of line records with train/validation/test splits.

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

import sysconfig
from pathlib import Path

import datasets

from bptt.datamodules.sources import SPLITS, CorpusError, data_root

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


def load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """A directory written by ``save_to_disk``; a one-line CorpusError when its files are damaged."""
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # json, pyarrow and datasets raise many types for damaged files
        detail = " ".join(str(err).split())[:160]
        raise CorpusError(f"cannot load the saved dataset {path} ({type(err).__name__}: {detail}); save it again "
                          "with save_to_disk, or point data.corpus at another corpus") from None


def _select_text(dsd: datasets.DatasetDict, column: str, origin: str) -> datasets.DatasetDict:
    if column not in dsd["train"].column_names:
        raise CorpusError(f"{origin} has columns {dsd['train'].column_names}, not text_column {column!r}")
    return datasets.DatasetDict({s: d.select_columns([column]).rename_column(column, "text") if column != "text"
                                 else d.select_columns(["text"]) for s, d in dsd.items()})
