"""RNN forecaster: values of a (multivariate) series in, the next H values of the target columns out.

Shape legend: B batch (streams), T time steps, C_in input columns, C_out target columns,
H horizon (steps ahead), L layers, Hd hidden size.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from bptt.models.arguments import check_core_arguments

# A recurrent state is a tuple of batch-first tensors (B, L, Hd): (h,) for GRU, (h, c) for LSTM.
State = tuple[Tensor, ...]

_RNN_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU}


class RNNForecaster(nn.Module):
    """``num_layers`` RNN layers over the input columns -> a linear head with H x C_out outputs
    per step: the direct multi-step forecast (H = 1: the next value).

    Args:
        num_inputs: C_in, columns per step; must match the DataModule's.
        num_targets: C_out, columns forecast; must match the DataModule's.
        horizon: H, steps ahead forecast at every step; must match the DataModule's.
        rnn_type: LSTM or GRU.
        hidden_size: Hd.
        num_layers: L.
        dropout: dropout between layers and before the head; in [0, 1).
    """

    def __init__(
        self,
        *,
        num_inputs: int = 1,
        num_targets: int = 1,
        horizon: int = 1,
        rnn_type: Literal["LSTM", "GRU"] = "LSTM",
        hidden_size: int = 64,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_core_arguments(rnn_type=rnn_type, rnn_types=_RNN_CLASSES, dropout=dropout, num_inputs=num_inputs,
                             num_targets=num_targets, horizon=horizon, hidden_size=hidden_size, num_layers=num_layers)
        self.rnn_type = rnn_type
        self.num_inputs, self.num_targets, self.horizon = num_inputs, num_targets, horizon
        self.rnn = _RNN_CLASSES[rnn_type](
            num_inputs, hidden_size, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, horizon * num_targets)

    def forward(self, inputs: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run the model over one window.

        Args:
            inputs: (B, T, C_in) normalized values.
            state: the carried state, a tuple of (B, L, Hd) tensors, or None for zeros.

        Returns:
            forecasts (B, T, H, C_out) (normalized) and the state after the last step.
        """
        hx = None
        if state is not None:
            hx = tuple(s.transpose(0, 1).contiguous() for s in state)  # each (L, B, Hd)
            hx = hx if self.rnn_type == "LSTM" else hx[0]
        out, new = self.rnn(inputs, hx)  # out (B, T, Hd)
        new = new if isinstance(new, tuple) else (new,)
        flat = self.head(self.dropout(out))  # (B, T, H * C_out)
        forecasts = flat.view(*flat.shape[:2], self.horizon, self.num_targets)  # (B, T, H, C_out)
        return forecasts, tuple(s.transpose(0, 1) for s in new)  # each (B, L, Hd)
