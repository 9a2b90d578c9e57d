"""``TextStreamDataModule``: a text corpus, tokenized and laid out as contiguous streams.

From corpus to batch: ``load_corpus`` gives line records per split ->
``Vocabulary.build`` counts the train split (``data.level``), or ``SubwordVocabulary`` trains a BPE on it
or reads a ``tokenizer.json`` (``data.tokenizer``) -> ``tokenize_split`` maps records to ids
(cached by ``datasets``) -> ``stream_layout`` cuts each split into B_global streams ->
``bptt.datamodules.sharding.shard`` keeps this rank's block -> ``StreamWindows`` yields (B_local, T)
windows in order. See ``bptt.datamodules.streams`` for the picture.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock

from bptt.datamodules.resumable import ResumableDataModule, SplitReader
from bptt.datamodules.sharding import shard
from bptt.datamodules.sources import CorpusError, check_writable, data_root, default_cache_dir, reading_cache
from bptt.datamodules.streams import StreamWindows, stream_layout, token_streams
from bptt.datamodules.subword import (
    DEFAULT_BPE_VOCAB,
    MIN_BPE_VOCAB,
    SPECIAL_TOKENS,
    SubwordVocabulary,
    load_vocabulary,
    vocabulary_from_state,
)
from bptt.datamodules.text_corpus import (
    TokenVocabulary,
    Vocabulary,
    corpus_identity,
    load_corpus,
    load_token_ids,
    tokenize_split,
)
from bptt.errors import CheckpointError, ConfigError
from bptt.private_api import dataset_fingerprint


class TextStreamDataModule(ResumableDataModule):
    """Streams of tokens for language modelling with carried hidden state.

    Args:
        corpus: ``stdlib``, a path under the data root (``.txt`` file, split directory or
            saved DatasetDict) or ``hf:NAME``; see ``bptt.datamodules.text_corpus``.
        level: ``char`` or ``word`` tokens (without ``tokenizer``).
        min_count: words seen fewer times in the train split become ``<unk>`` (without ``tokenizer``).
        tokenizer: subword tokens instead of ``level``'s: ``bpe``, a byte-level BPE trained on the train
            split (``bptt.datamodules.subword``), or the path of a ``tokenizer.json`` (under the data root,
            or absolute).
        vocab_size: the tokens of the BPE that ``tokenizer: bpe`` trains (default 4096, at least 258: the
            256 bytes, ``<|endoftext|>`` and a merge).
        split_fractions: train/validation/test fractions for a single-text corpus.
        stdlib_glob: which standard-library files make up the ``stdlib`` corpus.
        hf_config: configuration name of a Hugging Face dataset.
        text_column: the text column of a Hugging Face or saved dataset.
        batch_size: B_global, the number of training streams over all ranks.
        eval_batch_size: the number of validation/test streams over all ranks.
        bptt: window length T: time steps per optimizer step (and per batch, unless
            ``windows_per_batch`` says otherwise).
        windows_per_batch: m, training windows of T steps in one batch of m * T steps: m optimizer
            steps per batch (the engine's ``task.k1`` is T), one trip through the data loader and
            Lightning's loop for m steps. Trains bit for bit as m = 1; logging, validation and
            checkpoint intervals and schedulers count optimizer steps either way.
        random_bptt: AWD-LSTM-style random window lengths in training (with ``windows_per_batch: 1``).
        seed: seed of the random window lengths.
        data_dir: the data root; default ``$BPTT_DATA_DIR``, else ``./data``.
        cache_dir: where tokenized splits are cached; default ``$BPTT_CACHE_DIR``,
            else ``~/.cache/bptt``.
        vocab_file: a ``vocab.json`` saved by an earlier run (its tokenizer, if it has one) to use instead of
            building the vocabulary from the train split.
    """

    # streams, window length, windows per batch and random lengths: batch k of the training streams
    READ_LAYOUT = ("batch_size", "bptt", "windows_per_batch", "random_bptt")

    def __init__(
        self,
        *,
        corpus: str = "stdlib",
        level: Literal["char", "word"] = "char",
        min_count: int = 1,
        split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
        stdlib_glob: str = "**/*.py",
        hf_config: str | None = None,
        text_column: str = "text",
        batch_size: int = 32,
        eval_batch_size: int = 10,
        bptt: int = 64,
        windows_per_batch: int = 1,
        random_bptt: bool = False,
        seed: int = 0,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        vocab_file: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if level not in ("char", "word"):
            raise ConfigError(f"data.level must be char or word, got {level!r}")
        self.bpe_vocab_size = self._check_tokenizer(tokenizer, vocab_size)
        self.check_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size, bptt=bptt, min_count=min_count,
                            windows_per_batch=windows_per_batch)
        if random_bptt and windows_per_batch > 1:
            raise ConfigError(f"data.random_bptt draws a length per batch, data.windows_per_batch={windows_per_batch} "
                              "cuts a batch into equal windows; "
                              "set data.windows_per_batch: 1 or data.random_bptt: false")
        fractions = tuple(split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(f"data.split_fractions must be three non-negative numbers summing to 1 (train, "
                              f"validation, test), got {list(fractions)}")
        self.corpus = corpus
        self.level = level
        self.min_count = min_count
        self.split_fractions = fractions
        self.stdlib_glob = stdlib_glob
        self.hf_config = hf_config
        self.text_column = text_column
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bptt = bptt
        self.windows_per_batch = windows_per_batch
        self.random_bptt = random_bptt
        self.seed = seed
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer = tokenizer
        self.vocab_file = vocab_file
        self.vocab: TokenVocabulary | None = load_vocabulary(Path(vocab_file)) if vocab_file else None
        self.ids: dict[str, torch.Tensor] = {}

    @staticmethod
    def _check_tokenizer(tokenizer: str | None, vocab_size: int | None) -> int | None:
        """The size of the BPE to train (None without ``tokenizer: bpe``), after checking the two settings."""
        if tokenizer is not None and not tokenizer.strip():
            raise ConfigError("data.tokenizer is empty; give bpe, the path of a tokenizer.json, or null for "
                              "data.level's tokens")
        if tokenizer != "bpe":
            if vocab_size is not None:
                tokens = "data.level's tokens" if tokenizer is None else f"data.tokenizer={tokenizer}"
                raise ConfigError(f"data.vocab_size={vocab_size} sizes the BPE of data.tokenizer: bpe, not {tokens}; "
                                  "set data.vocab_size: null (--data.vocab_size null) or data.tokenizer: bpe")
            return None
        size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        if size < MIN_BPE_VOCAB:
            raise ConfigError(f"data.vocab_size must be >= {MIN_BPE_VOCAB} (256 byte tokens, {len(SPECIAL_TOKENS)} "
                              f"special token {', '.join(SPECIAL_TOKENS)} and at least one merge), got {size}")
        return size

    @property
    def tokenization(self) -> str:
        """What this config tokenizes with: ``char``, ``word``, ``bpe`` or ``file``."""
        return self.level if self.tokenizer is None else "bpe" if self.tokenizer == "bpe" else "file"

    def _tokenizer_file(self) -> SubwordVocabulary:
        """The ``tokenizer.json`` that ``data.tokenizer`` names, under the data root unless absolute."""
        assert self.tokenizer is not None
        path = Path(self.tokenizer).expanduser()
        return SubwordVocabulary.from_file(path if path.is_absolute() else data_root(self.data_dir) / path,
                                           self.tokenizer)

    def _build_vocab(self, train_texts: list[str]) -> TokenVocabulary:
        """``data.level``'s vocabulary, or ``tokenizer: bpe``'s (``load`` reads a tokenizer file before the corpus)."""
        if self.tokenizer is None:
            return Vocabulary.build(train_texts, self.level, self.min_count)
        assert self.bpe_vocab_size is not None
        return SubwordVocabulary.train(train_texts, self.bpe_vocab_size)

    def load(self) -> None:
        """Read the corpus, build the vocabulary and tokenize every split; idempotent.

        A corpus seen before (same files, sizes and times, same settings) is not read again:
        its vocabulary and memory-mapped token ids come from the cache.

        Raises:
            ConfigError: the cache directory cannot be written (and the corpus is not cached yet), or
                ``data.tokenizer``'s file is missing or not a tokenizer.
            CorpusError: the corpus cannot be read, or a cache file is corrupt.
        """
        if self.ids:
            return
        if self.vocab is None and self.tokenization == "file":  # its content keys the cache; read before the corpus
            self.vocab = self._tokenizer_file()
        manifest = self._manifest()
        if manifest is not None and manifest.exists():
            with reading_cache(manifest):
                cached = json.loads(manifest.read_text())
                files = {split: Path(cached["splits"][split]) for split in self._stream_counts()}
                vocab = self.vocab or vocabulary_from_state(cached["vocab"])
                origin = str(cached["origin"])
            if all(f.exists() for f in files.values()):
                self.ids = {s: torch.from_numpy(load_token_ids(f, len(vocab))) for s, f in files.items()}
                self.vocab, self.origin = vocab, origin
        if not self.ids:
            self._tokenize(manifest)
        self._check_stream_lengths()

    def _tokenize(self, manifest: Path | None) -> None:
        check_writable(self.cache_dir)
        records, origin = load_corpus(
            self.corpus,
            data_dir=self.data_dir,
            split_fractions=self.split_fractions,
            stdlib_glob=self.stdlib_glob,
            hf_config=self.hf_config,
            text_column=self.text_column,
        )
        for split, dataset in records.items():
            if not any(text.strip() for text in dataset["text"]):
                raise CorpusError(f"the {split} split of {origin} is empty; "
                                  "use a larger corpus or other split_fractions")
        vocab = self.vocab or self._build_vocab(records["train"]["text"])
        files = {}
        for split, dataset in records.items():
            key = hashlib.sha256(f"{dataset_fingerprint(dataset)}/{vocab.fingerprint()}".encode()).hexdigest()[:20]
            cache_file = self.cache_dir / "tokenized" / f"{split}-{key}.arrow"
            with FileLock(str(cache_file) + ".lock"):  # DDP ranks on one machine tokenize once
                self.ids[split] = torch.from_numpy(tokenize_split(dataset, vocab, cache_file))
            files[split] = str(cache_file.with_suffix(".npy"))
        self.vocab, self.origin = vocab, origin
        if manifest is not None:
            partial = manifest.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps({"origin": origin, "vocab": vocab.state_dict(), "splits": files}))
            os.replace(partial, manifest)

    def _manifest(self) -> Path | None:
        """The cache entry of this corpus and these settings, or None when the corpus is not found."""
        identity = corpus_identity(self.corpus, data_dir=self.data_dir, stdlib_glob=self.stdlib_glob,
                                   hf_config=self.hf_config, text_column=self.text_column)
        if identity is None:
            return None
        # the tokenizer: its settings, and a given vocabulary's (or tokenizer file's) content by its fingerprint
        settings = [self.level, self.min_count, list(self.split_fractions),
                    self.vocab.fingerprint() if self.vocab else None, self.tokenizer, self.bpe_vocab_size]
        key = hashlib.sha256(json.dumps([identity, settings]).encode()).hexdigest()[:20]
        return self.cache_dir / f"corpus-{key}.json"  # written after tokenize_split created the directory

    def _check_stream_lengths(self) -> None:
        for split, streams_global in self._stream_counts().items():
            length = self.ids[split].numel() // streams_global
            if length - 1 < self.bptt:
                raise ConfigError(
                    f"data.bptt={self.bptt} is longer than the {split} streams ({self.ids[split].numel()} tokens in "
                    f"{streams_global} streams of {length}); lower data.bptt or {self._count_key(split)}"
                )

    def _stream_counts(self) -> dict[str, int]:
        return {"train": self.batch_size, "validation": self.eval_batch_size, "test": self.eval_batch_size}

    @staticmethod
    def _count_key(split: str) -> str:
        return "data.batch_size" if split == "train" else "data.eval_batch_size"

    @property
    def vocab_size(self) -> int:
        """V; builds the vocabulary from the corpus unless it was given."""
        if self.vocab is None:
            self.load()
        assert self.vocab is not None
        return len(self.vocab)

    def save_artifacts(self, directory: Path) -> list[Path]:
        """Write what a run needs to read its outputs back: ``vocab.json``, for subwords ``tokenizer.json`` too."""
        assert self.vocab is not None
        return self.vocab.save_artifacts(directory)

    def readers(self, rank: int, world_size: int) -> dict[str, SplitReader]:
        self.check_divides(world_size, "streams", batch_size=self.batch_size, eval_batch_size=self.eval_batch_size)
        readers = {}
        for split, streams_global in self._stream_counts().items():
            streams = shard(stream_layout(self.ids[split], streams_global), rank, world_size)  # (B_local, L)
            train = split == "train"
            length = self.bptt * self.windows_per_batch if train else self.bptt  # evaluation: no optimizer steps
            if train:
                self.check_batch_fits(streams.shape[1] - 1, self.bptt, self.windows_per_batch)  # inputs: L - 1 steps
            readers[split] = SplitReader(StreamWindows(token_streams(streams), bptt=length,
                                                       random_bptt=self.random_bptt and train, seed=self.seed))
        return readers

    def data_state(self) -> dict[str, Any]:
        """The vocabulary; the skeleton adds the read position (epoch, next window) of training."""
        assert self.vocab is not None
        return {"vocab": self.vocab.state_dict()}

    def check_data_state(self, state: dict[str, Any]) -> None:
        """Refuse to continue or evaluate a checkpoint whose tokens these settings do not make: another
        ``data.level`` or ``data.tokenizer``, another BPE ``data.vocab_size``, a tokenizer file of other content.

        Raises:
            CheckpointError: names the checkpoint's tokenizer settings and the fix.
        """
        if not isinstance(state.get("vocab"), dict):
            return
        saved = vocabulary_from_state(state["vocab"])
        if self.tokenization == "file" and isinstance(saved, SubwordVocabulary):  # the file's content decides
            kept = self.vocab_file is not None and saved.path == self.tokenizer  # restore: the checkpoint's own
            same = kept or saved.fingerprint() == self._tokenizer_file().fingerprint()
        elif isinstance(saved, SubwordVocabulary) and saved.level == "bpe" == self.tokenization:
            same = saved.target_size == self.bpe_vocab_size
        else:
            same = saved.level == self.tokenization
        if not same:
            now = {"char": "data.level=char", "word": "data.level=word", "bpe": f"data.tokenizer=bpe, data.vocab_size="
                   f"{self.bpe_vocab_size}", "file": f"data.tokenizer={self.tokenizer}, whose tokenizer differs"}
            saved_file = ", or give data.tokenizer the tokenizer.json saved with the checkpoint's run" if isinstance(
                saved, SubwordVocabulary) else ""
            raise CheckpointError(f"the checkpoint's tokens come from {saved.describe()}, not from "
                                  f"{now[self.tokenization]}: drop the data.tokenizer, data.vocab_size or data.level "
                                  f"override{saved_file}")

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.vocab = vocabulary_from_state(state["vocab"])
