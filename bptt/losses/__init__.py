"""Losses that the tasks compute beside torch's own."""

from bptt.losses.checkpointed_ctc import checkpointed_ctc_loss

__all__ = ["checkpointed_ctc_loss"]
