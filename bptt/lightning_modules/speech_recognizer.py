"""``CTCSpeechTask``: speech recognition with a CTC loss over whole utterances, trained window by window.

CTC sums over every alignment of the whole utterance, so the engine runs it as a
sequence-level loss (``SequenceLossModule``): windows of ``k1`` frames, ``backprop:
truncated`` or ``exact``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import MLFlowLogger
from torch import Tensor, nn
from torchmetrics.text import CharErrorRate, WordErrorRate

from bptt.datamodules.speech import SpeechData, SpeechDataModule
from bptt.errors import ConfigError
from bptt.lightning_modules.tbptt import SequenceLossModule, State
from bptt.losses.checkpointed_ctc import checkpointed_ctc_loss
from bptt.metric_names import TRAIN, metric

BLANK = 0  # the CTC blank's token id


def ctc_feasible(output_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
    """(B,) whether each utterance has enough output frames for its labels: CTC needs one frame
    per label plus one blank between each pair of equal adjacent labels.

    Args:
        output_lengths: (B,) output frames.
        targets: (B, S) label ids, padded.
        target_lengths: (B,) labels per utterance.
    """
    positions = torch.arange(targets.shape[1], device=targets.device)  # (S,)
    inside = positions[1:] < target_lengths[:, None]  # (B, S - 1): pairs within the labels
    repeats = ((targets[:, 1:] == targets[:, :-1]) & inside).sum(dim=1)  # (B,)
    return output_lengths >= target_lengths + repeats


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: the most likely token per frame, repeats merged, blanks dropped.

    Args:
        log_probs: (B, T', V).
        lengths: (B,) valid output frames.

    Returns:
        B lists of token ids.
    """
    best = log_probs.argmax(dim=-1).cpu()  # (B, T')
    decoded = []
    for row, length in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[:length])
        decoded.append(ids[ids != BLANK].tolist())
    return decoded


class CTCSpeechTask(SequenceLossModule):
    """CTC loss in nats per label; token (digit or character) and word error rates with greedy decoding.

    Batches hold ``inputs`` (B, T, F), ``input_lengths`` (B,), ``targets`` (B, S) and
    ``target_lengths`` (B,) (``bptt.datamodules.SpeechDataModule``). Utterances with too few
    frames for their labels are left out of the loss and counted (``train/skipped_utterances``).

    Args:
        model: the network, ``(frames (B, T, F), state) -> (logits (B, T', V), state)``
            with ``output_lengths``, e.g. ``bptt.models.RNNAcousticModel``.
        num_decodings: validation utterances whose reference and greedy decoding are logged to
            MLflow as ``decodings/val-step-N.txt`` after each validation.
        ctc_lattice_limit_mb: CTC's forward and backward variables (2 x B x T' x (2S + 1) floats)
            up to this size come from ``torch.nn.functional.ctc_loss``; larger ones (long
            utterances: they grow with T' squared) from ``checkpointed_ctc_loss``, whose memory
            grows with sqrt(T'); null: always torch's.
        **engine: the ``SequenceLossModule`` arguments; ``k1`` is the window in input frames,
            ``backprop`` ``truncated`` or ``exact``.
    """

    time_keys = ("inputs",)

    def __init__(
        self, *, model: nn.Module, num_decodings: int = 10, ctc_lattice_limit_mb: float | None = 64.0, **engine: Any
    ) -> None:
        super().__init__(**engine)
        subsample = getattr(model, "subsample", 1)
        if self.k1 is not None and self.k1 % subsample:
            raise ConfigError(
                f"task.k1={self.k1} frames is not a multiple of model.subsample={subsample}; windows must start on "
                f"a stride boundary: make task.k1 a multiple of {subsample}"
            )
        self.model = model
        self.num_decodings = num_decodings
        self.ctc_lattice_limit_mb = ctc_lattice_limit_mb
        self.val_ter, self.test_ter = CharErrorRate(), CharErrorRate()  # one character per token
        self.val_wer, self.test_wer = WordErrorRate(), WordErrorRate()
        self.skipped = 0
        self._samples: list[tuple[str, str]] = []
        self.speech_data: SpeechData | None = None  # from use_data; decoding needs it

    def use_datamodule(self, datamodule: pl.LightningDataModule) -> None:
        if isinstance(datamodule, SpeechDataModule):  # else: training on bare batches
            self.use_data(datamodule.speech_data())

    def use_data(self, data: SpeechData) -> None:
        """Check the model's features per frame against the data's; keep the tokens for decoding."""
        if data.num_features != self.model.num_features:
            raise ConfigError(
                f"model.num_features={self.model.num_features} but the data has {data.num_features} features per "
                f"frame; set model.init_args.num_features: {data.num_features}"
            )
        self.speech_data = data

    def window_outputs(self, window: dict[str, Tensor], state: State | None) -> tuple[Tensor, State]:
        """Args: window with ``inputs`` (B, t, F). Returns: log-probabilities (B, t', V) in >= fp32, new state."""
        logits, state = self.model(window["inputs"], state)  # (B, t', V)
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1), state

    def sequence_losses(self, outputs: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """CTC negative log-likelihood of each utterance (B,) and its label count (B,)."""
        lengths = self.model.output_lengths(batch["input_lengths"])  # (B,)
        targets, target_lengths = batch["targets"], batch["target_lengths"]
        feasible = ctc_feasible(lengths, targets, target_lengths)
        if self.training:
            self.skipped += int((~feasible).sum())
        lattice_mb = (2 * outputs.shape[0] * outputs.shape[1] * (2 * targets.shape[1] + 1) * outputs.element_size()
                      / 2**20)
        if self.ctc_lattice_limit_mb is not None and lattice_mb > self.ctc_lattice_limit_mb:
            losses = checkpointed_ctc_loss(outputs, targets, lengths, target_lengths)
        else:
            losses = F.ctc_loss(outputs.transpose(0, 1), targets, lengths, target_lengths,  # (T', B, V)
                                blank=BLANK, reduction="none", zero_infinity=True)
        zero = torch.zeros_like(losses)
        return torch.where(feasible, losses, zero), torch.where(feasible, target_lengths, 0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log(metric(TRAIN, "skipped_utterances"), float(self.skipped), on_step=True, on_epoch=False)

    # ---- evaluation: loss from the engine, then greedy decoding -------------------------------
    def _decode_batch(self, outputs: Tensor, batch: dict[str, Any], ter: CharErrorRate, wer: WordErrorRate) -> None:
        data = self._data()
        hypotheses = [data.decode(ids)
                      for ids in greedy_decode(outputs, self.model.output_lengths(batch["input_lengths"]))]
        references = [data.decode(row[:n].tolist()) for row, n in zip(batch["targets"], batch["target_lengths"])]
        ter.update(hypotheses, references)
        if " " in data.tokens:
            wer.update(hypotheses, references)
        room = self.num_decodings - len(self._samples)
        self._samples += list(zip(references, hypotheses))[: max(room, 0)]

    def _data(self) -> SpeechData:
        if self.speech_data is None:
            raise RuntimeError("CTCSpeechTask decodes with the data's tokens: its DataModule needs speech_data(), "
                               "or call use_data first")
        return self.speech_data

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._decode_batch(self.evaluate_batch(batch, self.val_loss), batch, self.val_ter, self.val_wer)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._decode_batch(self.evaluate_batch(batch, self.test_loss), batch, self.test_ter, self.test_wer)

    def _log_error_rates(self, split: str, ter: CharErrorRate, wer: WordErrorRate) -> None:
        self.log(metric(split, "ter"), ter.compute(), prog_bar=True)
        ter.reset()
        if " " in self._data().tokens:
            self.log(metric(split, "wer"), wer.compute())
        wer.reset()

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._samples = []

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_error_rates("val", self.val_ter, self.val_wer)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        text = "".join(f"REF: {ref}\nHYP: {hyp}\n\n" for ref, hyp in self._samples)
        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger) and text:
                logger.experiment.log_text(logger.run_id, text, f"decodings/val-step-{self.global_step:07d}.txt")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_error_rates("test", self.test_ter, self.test_wer)

    @torch.no_grad()
    def transcribe(self, features: list[Tensor]) -> list[list[int]]:
        """Greedy token ids of each utterance.

        Args:
            features: utterances, each (T, F) normalized features.

        Returns:
            one list of token ids per utterance.
        """
        lengths = torch.tensor([f.shape[0] for f in features])
        frames = nn.utils.rnn.pad_sequence(features, batch_first=True).to(self.device)  # (B, T, F)
        return greedy_decode(self.sequence_outputs({"inputs": frames}), self.model.output_lengths(lengths))
