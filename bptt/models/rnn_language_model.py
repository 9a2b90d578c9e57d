"""Word- or character-level RNN language model: embedding, recurrent core, decoder.

Shape legend: B batch (streams), T time steps, L layers, E embedding size,
H hidden size (the core's output width), V vocabulary size.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from bptt.errors import ConfigError
from bptt.models.arguments import check_dropout, check_sizes
from bptt.models.cores import CoreFactory, State, build_core


class RNNLanguageModel(nn.Module):
    """Embedding -> recurrent core -> linear decoder over the vocabulary.

    Args:
        vocab_size: number of tokens V; filled in from the DataModule's vocabulary.
        embedding_size: E, the core's input size.
        core: the recurrent core (``class_path`` + ``init_args``, less ``input_size``); None: a
            ``TorchRNNCore`` from the shorthand below.
        rnn_type: shorthand: the cell, LSTM (default), GRU, RNN_TANH or RNN_RELU.
        hidden_size: shorthand: H (default 256).
        num_layers: shorthand: L (default 2).
        dropout: dropout on the embeddings and before the decoder (and, in the shorthand's core,
            between layers); in [0, 1).
        tie_weights: share the embedding and decoder matrices (Press & Wolf 2017);
            needs E == H.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        rnn_type: Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU"] | None = None,
        embedding_size: int = 256,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = False,
        core: CoreFactory | None = None,
    ) -> None:
        super().__init__()
        check_dropout(dropout)
        check_sizes(vocab_size=vocab_size, embedding_size=embedding_size)
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        self.rnn = build_core(core, input_size=embedding_size, rnn_type=rnn_type, hidden_size=hidden_size,
                              num_layers=num_layers, dropout=dropout, rnn_types=("LSTM", "GRU", "RNN_TANH", "RNN_RELU"),
                              default_hidden_size=256, default_num_layers=2)
        if tie_weights and embedding_size != self.rnn.hidden_size:
            hidden_key = "model.hidden_size" if core is None else "model.core.hidden_size"
            raise ConfigError(
                f"model.tie_weights needs model.embedding_size == {hidden_key} (got {embedding_size} and "
                f"{self.rnn.hidden_size}); set both to the same value or tie_weights: false"
            )
        self.decoder = nn.Linear(self.rnn.hidden_size, vocab_size)
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
        out, state = self.rnn(x, state)  # out (B, T, H)
        logits = self.decoder(self.dropout(out))  # (B, T, V)
        return logits, state
