"""Unidirectional RNN acoustic model for CTC: optional strided conv front end, recurrent core, token head.

Shape legend: B batch (utterances), T input frames, F features per frame (log-mel bins),
S subsampling factor, T' = ceil(T / S) output frames, C conv channels, L layers,
H hidden size (the core's output width), V tokens including the CTC blank (id 0).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from bptt.errors import ConfigError
from bptt.models.arguments import check_dropout, check_sizes
from bptt.models.cores import CoreFactory, State, build_core


class RNNAcousticModel(nn.Module):
    """Frames -> (strided conv) -> unidirectional recurrent core -> linear head over V tokens.

    Unidirectional, so a window's outputs depend only on its frames and the carried state:
    running an utterance window by window equals running it whole, provided windows start
    at multiples of ``subsample`` (the conv has kernel = stride, so frames never straddle).

    Args:
        vocab_size: V, the token set plus the blank; filled in from the DataModule.
        num_features: F, features per input frame; must match the DataModule's (e.g. ``n_mels``).
        core: the recurrent core (``class_path`` + ``init_args``, less ``input_size``); None: a
            ``TorchRNNCore`` from the shorthand below.
        rnn_type: shorthand: LSTM (default) or GRU.
        hidden_size: shorthand: H (default 256).
        num_layers: shorthand: L (default 3).
        dropout: dropout after the front end and before the head (and, in the shorthand's core,
            between layers); in [0, 1).
        subsample: S; > 1 adds a conv front end with kernel = stride = S and ``conv_channels``
            channels, which shortens the sequence the core runs over S times.
        conv_channels: C, channels of the conv front end; default H with the shorthand, required
            with ``core``.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_features: int = 40,
        rnn_type: Literal["LSTM", "GRU"] | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        dropout: float = 0.0,
        subsample: int = 1,
        conv_channels: int | None = None,
        core: CoreFactory | None = None,
    ) -> None:
        super().__init__()
        check_dropout(dropout)
        check_sizes(vocab_size=vocab_size, num_features=num_features, subsample=subsample, conv_channels=conv_channels,
                    hidden_size=hidden_size)
        self.num_features = num_features
        self.subsample = subsample
        width = num_features
        self.front = None
        if subsample > 1:
            if conv_channels is None and core is not None:
                raise ConfigError(f"model.subsample={subsample} with model.core needs model.conv_channels "
                                  "(the conv front end's width, the core's input size)")
            width = conv_channels or (256 if hidden_size is None else hidden_size)  # C, default H
            self.front = nn.Conv1d(num_features, width, kernel_size=subsample, stride=subsample)
        self.dropout = nn.Dropout(dropout)
        self.rnn = build_core(core, input_size=width, rnn_type=rnn_type, hidden_size=hidden_size, num_layers=num_layers,
                              dropout=dropout, rnn_types=("LSTM", "GRU"), default_hidden_size=256, default_num_layers=3)
        self.head = nn.Linear(self.rnn.hidden_size, vocab_size)

    def output_lengths(self, input_lengths: Tensor) -> Tensor:
        """(B,) input frame counts -> (B,) output frame counts, ceil(T / S)."""
        return (input_lengths + self.subsample - 1) // self.subsample

    def forward(self, frames: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run the model over one window.

        Args:
            frames: (B, T, F) features.
            state: the carried state, a tuple of (B, L, H) tensors, or None for zeros.

        Returns:
            logits (B, T', V) and the state after the last frame, batch-first like ``state``.
        """
        x = frames
        if self.front is not None:
            pad = -frames.shape[1] % self.subsample
            x = F.pad(frames, (0, 0, 0, pad))  # (B, S * T', F): the last partial stride zero-padded
            x = F.relu(self.front(x.transpose(1, 2))).transpose(1, 2)  # (B, F, S*T') -> (B, C, T') -> (B, T', C)
        x = self.dropout(x)
        out, state = self.rnn(x, state)  # out (B, T', H)
        logits = self.head(self.dropout(out))  # (B, T', V)
        return logits, state
