"""Word- or character-level RNN language model: embedding, RNN stack, decoder.

Shape legend: B batch (streams), T time steps, L layers, E embedding size,
H hidden size, V vocabulary size.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from bptt.errors import ConfigError
from bptt.models.arguments import check_core_arguments

# A recurrent state is a tuple of batch-first tensors (B, L, H): (h,) for GRU/RNN, (h, c) for LSTM.
State = tuple[Tensor, ...]

_RNN_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


class RNNLanguageModel(nn.Module):
    """Embedding -> ``num_layers`` RNN layers -> linear decoder over the vocabulary.

    Args:
        vocab_size: number of tokens V; filled in from the DataModule's vocabulary.
        rnn_type: the recurrent cell: LSTM, GRU, RNN_TANH or RNN_RELU.
        embedding_size: E.
        hidden_size: H.
        num_layers: L.
        dropout: dropout on the embeddings, between layers and before the decoder; in [0, 1).
        tie_weights: share the embedding and decoder matrices (Press & Wolf 2017);
            needs ``embedding_size == hidden_size``.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        rnn_type: Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU"] = "LSTM",
        embedding_size: int = 256,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        check_core_arguments(rnn_type=rnn_type, rnn_types=_RNN_CLASSES, dropout=dropout, vocab_size=vocab_size,
                             embedding_size=embedding_size, hidden_size=hidden_size, num_layers=num_layers)
        if tie_weights and embedding_size != hidden_size:
            raise ConfigError(
                f"model.tie_weights needs model.embedding_size == model.hidden_size (got {embedding_size} and "
                f"{hidden_size}); set both to the same value or tie_weights: false"
            )
        self.rnn_type = rnn_type
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        rnn_kwargs = {"nonlinearity": rnn_type[4:].lower()} if rnn_type.startswith("RNN_") else {}
        self.rnn = _RNN_CLASSES[rnn_type](
            embedding_size,
            hidden_size,
            num_layers=num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
            **rnn_kwargs,
        )
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run the model over one window.

        Args:
            tokens: (B, T) token ids.
            state: the carried state, a tuple of (B, L, H) tensors, or None for zeros.

        Returns:
            logits (B, T, V) and the state after the last step, batch-first like ``state``.
        """
        x = self.dropout(self.embedding(tokens))  # (B, T, E)
        hx = None
        if state is not None:
            hx = tuple(s.transpose(0, 1).contiguous() for s in state)  # each (L, B, H)
            hx = hx if self.rnn_type == "LSTM" else hx[0]
        out, new = self.rnn(x, hx)  # out (B, T, H)
        new = new if isinstance(new, tuple) else (new,)
        logits = self.decoder(self.dropout(out))  # (B, T, V)
        return logits, tuple(s.transpose(0, 1) for s in new)  # each (B, L, H)
