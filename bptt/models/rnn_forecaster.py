"""RNN forecaster: values of a (multivariate) series in, the next H values of the target columns out.

Shape legend: B batch (streams), T time steps, C_in input columns, C_out target columns,
H horizon (steps ahead), P values per forecast (1: a point; 2: a Gaussian's mean and scale; Q: quantiles),
L layers, Hd hidden size (the core's output width).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from bptt.models.arguments import check_dropout, check_sizes
from bptt.models.cores import CoreFactory, State, build_core


class RNNForecaster(nn.Module):
    """Recurrent core over the input columns -> a linear head with H x C_out x P outputs per step: the
    direct multi-step forecast (H = 1: the next value), P values per forecast.

    Args:
        num_inputs: C_in, columns per step (the core's input size); must match the DataModule's.
        num_targets: C_out, columns forecast; must match the DataModule's.
        horizon: H, steps ahead forecast at every step; must match the DataModule's.
        num_outputs: P, values per forecast: 1 (a point, ``task.loss: mse``), 2 (``gaussian_nll``: mean and
            unconstrained scale) or the number of ``task.quantiles`` (``quantile``); the task checks it.
        core: the recurrent core (``class_path`` + ``init_args``, less ``input_size``); None: a
            ``TorchRNNCore`` from the shorthand below.
        rnn_type: shorthand: LSTM (default) or GRU.
        hidden_size: shorthand: Hd (default 64).
        num_layers: shorthand: L (default 2).
        dropout: dropout before the head (and, in the shorthand's core, between layers); in [0, 1).
    """

    def __init__(
        self,
        *,
        num_inputs: int = 1,
        num_targets: int = 1,
        horizon: int = 1,
        num_outputs: int = 1,
        rnn_type: Literal["LSTM", "GRU"] | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        dropout: float = 0.0,
        core: CoreFactory | None = None,
    ) -> None:
        super().__init__()
        check_dropout(dropout)
        check_sizes(num_inputs=num_inputs, num_targets=num_targets, horizon=horizon, num_outputs=num_outputs)
        self.num_inputs, self.num_targets = num_inputs, num_targets
        self.horizon, self.num_outputs = horizon, num_outputs
        self.rnn = build_core(core, input_size=num_inputs, rnn_type=rnn_type, hidden_size=hidden_size,
                              num_layers=num_layers, dropout=dropout, rnn_types=("LSTM", "GRU"), default_hidden_size=64,
                              default_num_layers=2)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.rnn.hidden_size, horizon * num_targets * num_outputs)

    def forward(self, inputs: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run the model over one window.

        Args:
            inputs: (B, T, C_in) normalized values.
            state: the carried state, a tuple of (B, L, Hd) tensors, or None for zeros.

        Returns:
            forecasts (B, T, H, C_out) (normalized; (B, T, H, C_out, P) when P > 1) and the state after the
            last step.
        """
        out, state = self.rnn(inputs, state)  # out (B, T, Hd)
        flat = self.head(self.dropout(out))  # (B, T, H * C_out * P)
        forecasts = flat.view(*flat.shape[:2], self.horizon, self.num_targets, self.num_outputs)  # (B, T, H, C_out, P)
        return (forecasts[..., 0] if self.num_outputs == 1 else forecasts), state
