"""Unidirectional RNN acoustic model for CTC: optional strided conv front end, RNN stack, token head.

Shape legend: B batch (utterances), T input frames, F features per frame (log-mel bins),
S subsampling factor, T' = ceil(T / S) output frames, L layers, H hidden size,
V tokens including the CTC blank (id 0).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from bptt.models.arguments import check_core_arguments

# A recurrent state is a tuple of batch-first tensors (B, L, H): (h,) for GRU, (h, c) for LSTM.
State = tuple[Tensor, ...]

_RNN_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU}


class RNNAcousticModel(nn.Module):
    """Frames -> (strided conv) -> ``num_layers`` unidirectional RNN layers -> linear head over V tokens.

    Unidirectional, so a window's outputs depend only on its frames and the carried state:
    running an utterance window by window equals running it whole, provided windows start
    at multiples of ``subsample`` (the conv has kernel = stride, so frames never straddle).

    Args:
        vocab_size: V, the token set plus the blank; filled in from the DataModule.
        num_features: F, features per input frame; must match the DataModule's (e.g. ``n_mels``).
        rnn_type: LSTM or GRU.
        hidden_size: H.
        num_layers: L.
        dropout: dropout after the front end, between layers and before the head; in [0, 1).
        subsample: S; > 1 adds a conv front end with kernel = stride = S and ``conv_channels``
            channels, which shortens the sequence the RNN runs over S times.
        conv_channels: channels of the conv front end; default H.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_features: int = 40,
        rnn_type: Literal["LSTM", "GRU"] = "LSTM",
        hidden_size: int = 256,
        num_layers: int = 3,
        dropout: float = 0.0,
        subsample: int = 1,
        conv_channels: int | None = None,
    ) -> None:
        super().__init__()
        check_core_arguments(rnn_type=rnn_type, rnn_types=_RNN_CLASSES, dropout=dropout, vocab_size=vocab_size,
                             num_features=num_features, hidden_size=hidden_size, num_layers=num_layers,
                             subsample=subsample, conv_channels=conv_channels)
        self.rnn_type = rnn_type
        self.num_features = num_features
        self.subsample = subsample
        width = num_features
        self.front = None
        if subsample > 1:
            width = hidden_size if conv_channels is None else conv_channels
            self.front = nn.Conv1d(num_features, width, kernel_size=subsample, stride=subsample)
        self.dropout = nn.Dropout(dropout)
        self.rnn = _RNN_CLASSES[rnn_type](
            width, hidden_size, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=True
        )
        self.head = nn.Linear(hidden_size, vocab_size)

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
        hx = None
        if state is not None:
            hx = tuple(s.transpose(0, 1).contiguous() for s in state)  # each (L, B, H)
            hx = hx if self.rnn_type == "LSTM" else hx[0]
        out, new = self.rnn(x, hx)  # out (B, T', H)
        new = new if isinstance(new, tuple) else (new,)
        logits = self.head(self.dropout(out))  # (B, T', V)
        return logits, tuple(s.transpose(0, 1) for s in new)  # each (B, L, H)
