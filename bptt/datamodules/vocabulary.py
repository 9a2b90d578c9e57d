"""Character or word vocabularies built from a training split, and tokenization through ``datasets``."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow.compute as pc

from bptt.datamodules.caches import reading_cache
from bptt.datamodules.sources import CorpusError

UNK, EOS = "<unk>", "<eos>"


def split_tokens(text: str, level: Literal["char", "word"]) -> list[str]:
    """One record's tokens: its characters, or its whitespace-separated words then ``<eos>`` per line."""
    if level == "char":
        return list(text)
    tokens: list[str] = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


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
        kept = sorted((t for t, c in counts.items() if c >= min_count and t not in specials), key=lambda t: (-counts[t], t))
        return cls(specials + kept, level)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; unknown tokens map to ``<unk>`` (0)."""
        return [self.index.get(t, 0) for t in split_tokens(text, self.level)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: characters joined as they are, words by spaces with ``<eos>`` as a line end."""
        tokens = [self.tokens[i] for i in ids]
        if self.level == "char":
            return "".join(tokens)
        return " ".join(tokens).replace(f" {EOS} ", "\n").replace(EOS, "\n")

    def fingerprint(self) -> str:
        """A short hash of the token list and level, for cache keys."""
        return hashlib.sha256(json.dumps([self.level, self.tokens]).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "level": self.level}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> Vocabulary:
        return cls(list(state["tokens"]), state["level"])  # type: ignore[arg-type]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.state_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read a ``vocab.json`` written by ``save``."""
        try:
            return cls.from_state_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorpusError(f"cannot read vocabulary {path}: {err}; pass the vocab.json that a run saved") from None


def tokenize_split(records: datasets.Dataset, vocab: Vocabulary, cache_file: Path) -> np.ndarray:
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
            return {"ids": [vocab.encode(text) for text in batch["text"]]}

        with reading_cache(cache_file) if cache_file.exists() else nullcontext():  # else written here
            tokenized = records.map(
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
