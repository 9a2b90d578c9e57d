"""Subword vocabularies (``data.tokenizer``): a byte-level BPE trained on the train split with the
``tokenizers`` library, or any ``tokenizer.json``; and the one way to read back either kind of vocabulary.

``SubwordVocabulary`` has ``Vocabulary``'s methods, so the DataModule, the token cache, checkpoints
and ``bptt generate`` treat both alike: its ``state_dict`` holds the tokenizer itself (its JSON), and
``vocabulary_from_state`` / ``load_vocabulary`` build whichever kind a state or a ``vocab.json`` holds.

The trained BPE is GPT-2's scheme: text is cut at word and space boundaries, each piece's UTF-8 bytes
are the initial tokens (all 256 of them, so no text is unknown and ``decode(encode(text)) == text``),
and merges are learnt in order of frequency. ``ENDOFTEXT`` is reserved as id 0 for document boundaries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bptt.datamodules.sources import CorpusError
from bptt.datamodules.text_corpus import TokenVocabulary, Vocabulary
from bptt.errors import ConfigError

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT,)
BYTE_TOKENS = 256
MIN_BPE_VOCAB = BYTE_TOKENS + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens and at least one merge
DEFAULT_BPE_VOCAB = 4096


class SubwordVocabulary:
    """Token ids from a ``tokenizers.Tokenizer``.

    Args:
        tokenizer: the tokenizer; its ids are the vocabulary's.
        level: ``bpe``, a BPE trained by bptt on the train split, or ``file``, a ``tokenizer.json`` given.
        target_size: the ``data.vocab_size`` a ``bpe`` was trained to (a small corpus may give fewer).
        path: the ``data.tokenizer`` a ``file`` was read from, as configured.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, level: Literal["bpe", "file"], target_size: int | None = None,
        path: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.level = level
        self.target_size = target_size
        self.path = path
        self._size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1  # ids may have gaps

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> SubwordVocabulary:
        """A byte-level BPE of at most ``vocab_size`` tokens learnt from ``texts`` (the train split only);
        the same texts give the same tokenizer, in any process."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer, level="bpe", target_size=vocab_size)

    @classmethod
    def from_file(cls, path: Path, setting: str) -> SubwordVocabulary:
        """The ``tokenizer.json`` at ``path``, configured as ``data.tokenizer: setting``.

        Raises:
            ConfigError: the file is missing, or not a tokenizer the ``tokenizers`` library reads.
        """
        if not path.is_file():
            raise ConfigError(f"data.tokenizer={setting}: {path.resolve()} is not a file; give bpe or the path of a "
                              "tokenizer.json (relative to the data root, or absolute)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the library's own parse error, a pyo3 Exception
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"data.tokenizer={setting}: {path} is not a tokenizer.json the tokenizers library "
                              f"reads ({first}); give a tokenizer.json saved by tokenizers, or bpe") from None
        vocabulary = cls(tokenizer, level="file", path=setting)
        if len(vocabulary) == 0:
            raise ConfigError(f"data.tokenizer={setting}: {path} has no tokens; give a trained tokenizer.json")
        return vocabulary

    def __len__(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no template tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the library."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        """A short hash of the tokenizer (its canonical JSON): equal fingerprints give equal ids."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The settings that made it, e.g. ``data.tokenizer=bpe, data.vocab_size=4096``."""
        if self.level == "bpe":
            return f"data.tokenizer=bpe, data.vocab_size={self.target_size}"
        return f"data.tokenizer={self.path}"

    def state_dict(self) -> dict[str, object]:
        return {"level": self.level, "tokenizer": self.tokenizer.to_str(), "target_size": self.target_size,
                "path": self.path}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SubwordVocabulary:
        level = state["level"]
        if level not in ("bpe", "file"):
            raise ValueError(f"level {level!r} is not bpe or file")
        return cls(Tokenizer.from_str(state["tokenizer"]), level=level, target_size=state.get("target_size"),
                   path=state.get("path"))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.state_dict(), ensure_ascii=False), encoding="utf-8")

    def save_artifacts(self, directory: Path) -> list[Path]:
        """``vocab.json`` (bptt's, the tokenizer inside) and ``tokenizer.json`` (for any Hugging Face tool)."""
        vocab, tokenizer = directory / "vocab.json", directory / "tokenizer.json"
        self.save(vocab)
        self.tokenizer.save(str(tokenizer))
        return [vocab, tokenizer]


def vocabulary_from_state(state: dict[str, Any]) -> TokenVocabulary:
    """The vocabulary a ``state_dict`` describes: a ``SubwordVocabulary`` when it holds a tokenizer, else a
    ``Vocabulary``."""
    return SubwordVocabulary.from_state_dict(state) if "tokenizer" in state else Vocabulary.from_state_dict(state)


def load_vocabulary(path: Path) -> TokenVocabulary:
    """Read a ``vocab.json`` that a run saved, of either kind.

    Raises:
        CorpusError: it cannot be read as one.
    """
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return vocabulary_from_state(state)
    except Exception as err:  # OSError, JSON, a missing key, or the tokenizers library's parse error
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorpusError(f"cannot read vocabulary {path}: {reason}; pass the vocab.json that a run saved") from None
