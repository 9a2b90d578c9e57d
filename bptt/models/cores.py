"""Recurrent cores: the part of a model that carries state from step to step and from window to window.

Every core has one shape::

    core(x (B, T, E), state) -> (y (B, T, H), state')

Shape legend: B batch (streams or utterances), T time steps, E input size, H hidden size (the
width of y), L layers. A ``State`` is a tuple of batch-first tensors, each (B, L, H): (h,) for a
GRU or plain RNN, (h, c) for an LSTM; the first is the hidden state per layer (what
``bptt.gradient_diagnostics`` differentiates through). ``None`` stands for zeros. The TBPTT
engine detaches, shards and zeroes states row by row without knowing which core made them.

A model takes a core as a factory, a ``CoreFactory``: the core's class and its arguments less
``input_size``, which the model fills in (its embedding, front end or input columns)::

    model:
      class_path: bptt.models.RNNLanguageModel
      init_args:
        embedding_size: 256
        core:
          class_path: bptt.models.TorchRNNCore
          init_args: {rnn_type: GRU, hidden_size: 512, num_layers: 2, dropout: 0.2}

A new cell is one ``RecurrentCore`` subclass with keyword-only ``input_size``, ``hidden_size`` and
``num_layers`` among its ``__init__`` arguments and a ``forward`` of the shape above.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from bptt.errors import ConfigError
from bptt.hardware import cpu_autocast_runs_lstm
from bptt.models.arguments import check_choice, check_dropout, check_sizes

# The carried state of every core: batch-first tensors, each (B, L, H).
State = tuple[Tensor, ...]


class RecurrentCore(nn.Module):
    """The base of every core: ``forward(x (B, T, E), state: State | None) -> (y (B, T, H), State)``.

    Attributes every core sets: ``input_size`` (E), ``hidden_size`` (H), ``num_layers`` (L).
    """

    input_size: int
    hidden_size: int
    num_layers: int


class CoreFactory(Protocol):
    """A core's class with its arguments bound, less ``input_size`` (config: ``class_path`` + ``init_args``)."""

    def __call__(self, *, input_size: int) -> RecurrentCore: ...


TorchRNNType = Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
TORCH_RNN_TYPES = ("GRU", "LSTM", "RNN_RELU", "RNN_TANH")


class TorchRNNCore(RecurrentCore):
    """torch's own LSTM, GRU or Elman RNN stack (cuDNN / oneDNN kernels), batch-first in and out.

    An instance is also a ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``: ``__init__`` makes it one of three
    private subclasses, by ``rnn_type``, so its parameters keep torch's names (``weight_ih_l0``, ...),
    checkpoints of a model's ``rnn`` keep their keys, and torch's kernels (and cuDNN's flattened
    weights) run unchanged. The only code of its own is the state adapter: torch
    keeps states layer-first, (L, B, H), and splits an LSTM's (h, c) off the GRU's h.

    Args:
        input_size: E.
        rnn_type: the cell: LSTM, GRU, RNN_TANH or RNN_RELU.
        hidden_size: H.
        num_layers: L.
        dropout: dropout on the outputs of every layer but the last; in [0, 1); none with one layer.
    """

    def __init__(self, *, input_size: int, rnn_type: TorchRNNType = "LSTM", hidden_size: int = 256, num_layers: int = 2,
                 dropout: float = 0.0) -> None:
        check_choice(rnn_type, TORCH_RNN_TYPES, key="model.core.rnn_type")
        check_sizes(prefix="model.core", input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_dropout(dropout, key="model.core.dropout")
        self.__class__ = _TORCH_RNN_CORES[rnn_type]  # from here on also an nn.LSTM, nn.GRU or nn.RNN
        cell = {"nonlinearity": rnn_type[4:].lower()} if rnn_type.startswith("RNN_") else {}
        _TORCH_RNN_CLASSES[rnn_type].__init__(self, input_size, hidden_size, num_layers=num_layers, batch_first=True,
                                              dropout=dropout if num_layers > 1 else 0.0, **cell)

    @property
    def rnn_type(self) -> str:
        """LSTM, GRU, RNN_TANH or RNN_RELU (torch's ``mode``)."""
        return self.mode

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run the stack over one window.

        Args:
            x: (B, T, E) inputs.
            state: the carried state, a tuple of (B, L, H) tensors, or None for zeros.

        Returns:
            y (B, T, H), the last layer's outputs, and the state after the last step, each (B, L, H).
        """
        hx = None
        if state is not None:
            hx = tuple(s.transpose(0, 1).contiguous() for s in state)  # each (L, B, H)
            hx = hx if self.mode == "LSTM" else hx[0]
        if self.mode == "LSTM" and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") \
                and not cpu_autocast_runs_lstm():
            with torch.autocast("cpu", enabled=False):  # this CPU's oneDNN has no bf16 LSTM: fp32, as for a GRU
                x, hx = x.float(), None if hx is None else tuple(h.float() for h in hx)
                y, new = super().forward(x, hx)  # y (B, T, H); new (h, c), each (L, B, H)
        else:
            y, new = super().forward(x, hx)  # y (B, T, H); new (h, c) or h, each (L, B, H)
        new = new if isinstance(new, tuple) else (new,)
        return y, tuple(s.transpose(0, 1) for s in new)  # each (B, L, H)


class _TorchLSTMCore(TorchRNNCore, nn.LSTM):
    pass


class _TorchGRUCore(TorchRNNCore, nn.GRU):
    pass


class _TorchElmanCore(TorchRNNCore, nn.RNN):
    pass


_TORCH_RNN_CORES = {"LSTM": _TorchLSTMCore, "GRU": _TorchGRUCore, "RNN_TANH": _TorchElmanCore,
                    "RNN_RELU": _TorchElmanCore}
_TORCH_RNN_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


def build_core(
    core: CoreFactory | None,
    *,
    input_size: int,
    rnn_type: str | None,
    hidden_size: int | None,
    num_layers: int | None,
    dropout: float,
    rnn_types: tuple[str, ...],
    default_hidden_size: int,
    default_num_layers: int,
) -> RecurrentCore:
    """A model's core: ``core`` built on ``input_size``, or a ``TorchRNNCore`` from the shorthand.

    The shorthand (``model.rnn_type``, ``model.hidden_size``, ``model.num_layers``, with the model's
    ``model.dropout`` between layers) is what every config before the core interface used; a
    config gives either it or ``model.core``.

    Args:
        core: the configured core, or None for the shorthand.
        input_size: E, what the model feeds the core per step.
        rnn_type: the shorthand's cell (default LSTM), one of ``rnn_types``.
        hidden_size: the shorthand's H (default ``default_hidden_size``).
        num_layers: the shorthand's L (default ``default_num_layers``).
        dropout: the model's dropout; between layers in the shorthand's core.

    Raises:
        ConfigError: the shorthand given beside ``model.core``, or a value out of range.
    """
    shorthand = {"rnn_type": rnn_type, "hidden_size": hidden_size, "num_layers": num_layers}
    if core is not None:
        given = [f"model.{k}" for k, v in shorthand.items() if v is not None]
        if given:
            raise ConfigError(f"model.core is set, and so is {', '.join(given)}: give the core's sizes in "
                              "model.core.init_args, or drop model.core")
        return core(input_size=input_size)
    rnn_type = "LSTM" if rnn_type is None else rnn_type
    hidden_size = default_hidden_size if hidden_size is None else hidden_size
    num_layers = default_num_layers if num_layers is None else num_layers
    check_choice(rnn_type, rnn_types, key="model.rnn_type")
    check_sizes(hidden_size=hidden_size, num_layers=num_layers)
    return TorchRNNCore(input_size=input_size, rnn_type=rnn_type, hidden_size=hidden_size, num_layers=num_layers,
                        dropout=dropout)
