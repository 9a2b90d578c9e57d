"""The TBPTT engine: truncated backpropagation through time as LightningModule base classes.

Everything about truncation lives in this folder; a task subclasses one of two classes and
supplies only its network and loss:

- ``StepLossModule`` (step_loss.py): a loss per time step (language models, forecasters,
  synthetic tasks). The task supplies ``window_step(window, state) -> (losses (B, t), state)``.
  TBPTT(k1, k2) in stream mode (state carried across batches) or split mode.
- ``SequenceLossModule`` (sequence_loss.py): a loss over whole sequences (CTC). The task supplies
  ``window_outputs(window, state) -> (outputs, state)`` and ``sequence_losses(outputs, batch)``;
  three passes over windows of k1 steps keep activation memory at one window's.
- ``TBPTTModule`` (engine.py): what both share: the optimizer and schedulers, the one
  all-reduce and the one host wait of a step, the non-finite guard, clipping, the logged
  metrics and the carried state (``CarriedState``) with its checkpoint format.

TBPTT(k1, k2) (Williams & Peng 1990): every k1 new time steps, one optimizer step whose loss
is over those k1 steps and whose gradient flows back k2 steps::

    time ->        |<---------------- k2 ---------------->|
                   |<-- history (k2-k1) -->|<---- k1 ---->|
    carried.start ^        no loss           loss over these
                                            ^ the next history starts k1 steps later

Batches come in two layouts, told apart by a ``reset`` key:

- *stream mode* (``reset`` present, (B,) bools): the batch is the next window of B persistent
  streams; the carried state goes on from the previous batch, and rows where ``reset`` is
  true start again from zeros.
- *split mode* (no ``reset``): the batch holds whole sequences (B, T); every batch starts
  from zeros and the engine cuts it into windows itself.

Time-indexed entries of a batch (``time_keys``) are (B, T, ...); an optional ``mask`` (B, T)
marks valid steps. A recurrent state is a tuple of batch-first tensors (``State``).
"""

from bptt.lightning_modules.tbptt.engine import CarriedState, NonFiniteLossError, State, TBPTTModule
from bptt.lightning_modules.tbptt.sequence_loss import SequenceLossModule
from bptt.lightning_modules.tbptt.step_loss import StepLossModule

__all__ = ["CarriedState", "NonFiniteLossError", "SequenceLossModule", "State", "StepLossModule", "TBPTTModule"]
