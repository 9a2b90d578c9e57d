"""CTC over whole utterances trained window by window: the engine's exact mode equals plain full-BPTT
autograd, its truncated mode equals an independent reference that detaches the state at window
boundaries, both on batches of utterances of different lengths. float64 throughout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bptt.datamodules.speech import SpeechData
from bptt.errors import ConfigError
from bptt.lightning_modules import CTCSpeechTask
from bptt.lightning_modules.speech_recognizer import ctc_feasible, greedy_decode
from bptt.models import RNNAcousticModel
from tests.engine_harness import ListDataModule, run, sgd

LR = 0.5
FEATURES, VOCAB = 6, 5


def _model(rnn_type: str = "LSTM", subsample: int = 2, dropout: float = 0.0) -> RNNAcousticModel:
    torch.manual_seed(0)
    return RNNAcousticModel(vocab_size=VOCAB, num_features=FEATURES, rnn_type=rnn_type, hidden_size=7, num_layers=2,
                            dropout=dropout, subsample=subsample).double()


def _batch(lengths=(23, 17, 9), labels=((1, 2, 2, 3), (4, 1), (2, 3, 1))) -> dict[str, torch.Tensor]:
    """Utterances of different lengths, zero-padded, with padded label sequences."""
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(len(lengths), max(lengths), FEATURES, generator=gen, dtype=torch.float64)
    for row, n in enumerate(lengths):
        inputs[row, n:] = 0.0
    targets = torch.zeros(len(labels), max(map(len, labels)), dtype=torch.long)
    for row, seq in enumerate(labels):
        targets[row, : len(seq)] = torch.tensor(seq)
    return {"inputs": inputs, "input_lengths": torch.tensor(lengths), "targets": targets,
            "target_lengths": torch.tensor([len(seq) for seq in labels])}


def _reference_step(model, batch, window: int | None, *, detach: bool, seeds: list[int] | None = None):
    """One SGD step by plain autograd over one graph of the whole batch: the windows run in a loop,
    the state detached between windows when ``detach``; the CTC loss over the concatenated
    log-probabilities, summed over utterances and divided by the total label count."""
    x, state, pieces = batch["inputs"], None, []
    size = window or x.shape[1]
    for i, start in enumerate(range(0, x.shape[1], size)):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        logits, state = model(x[:, start : start + size], state)
        pieces.append(F.log_softmax(logits, dim=-1))
        if detach:
            state = tuple(s.detach() for s in state)
    log_probs = torch.cat(pieces, dim=1)  # (B, T', V)
    lengths = model.output_lengths(batch["input_lengths"])
    losses = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"],
                        reduction="none")
    (losses.sum() / batch["target_lengths"].sum()).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return model


def _fit(model, batch, window: int | None, backprop: str, **task):
    task_ = CTCSpeechTask(model=model, optimizer=sgd(LR), k1=window, backprop=backprop, **task)
    run(task_, [batch], precision="64-true")
    return task_


def _assert_same_parameters(a, b, atol=1e-10):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU"])
@pytest.mark.parametrize("window", [6, 8, None])
def test_exact_mode_equals_full_bptt_autograd(rnn_type, window):
    model, batch = _model(rnn_type), _batch()
    reference = _reference_step(copy.deepcopy(model), batch, None, detach=False)
    task = _fit(model, batch, window, "exact")
    _assert_same_parameters(task.model, reference, atol=1e-5)
    _assert_same_parameters(task.model, reference)  # in float64 it is in fact exact to rounding


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU"])
def test_truncated_mode_equals_reference_that_detaches_at_window_boundaries(rnn_type):
    model, batch = _model(rnn_type), _batch()
    reference = _reference_step(copy.deepcopy(model), batch, 6, detach=True)
    full = _reference_step(copy.deepcopy(model), batch, None, detach=False)
    task = _fit(model, batch, 6, "truncated")
    _assert_same_parameters(task.model, reference)
    with pytest.raises(AssertionError):  # truncation is real: the full gradient differs
        _assert_same_parameters(task.model, full, atol=1e-6)


class _SeedRecordingTask(CTCSpeechTask):
    """Records the per-window seeds the engine uses, so a reference can replay its dropout masks."""

    seeds: list[int]

    def _window_rng(self, seed):
        self.seeds = [*getattr(self, "seeds", []), seed]
        return super()._window_rng(seed)


def test_exact_mode_with_dropout_recomputes_windows_with_the_same_masks():
    model, batch = _model(dropout=0.3), _batch()
    reference = copy.deepcopy(model)
    task = _SeedRecordingTask(model=model, optimizer=sgd(LR), k1=6, backprop="exact")
    run(task, [batch], precision="64-true")
    windows = 4  # 23 frames in windows of 6
    assert len(task.seeds) == 2 * windows and sorted(task.seeds[:windows]) == sorted(task.seeds[windows:])
    reference.train()
    _reference_step(reference, batch, 6, detach=False, seeds=task.seeds[:windows])
    _assert_same_parameters(task.model, reference)


def test_infeasible_utterance_is_left_out_and_counted_never_nan():
    # 5 frames -> 3 output frames cannot hold the labels 2 2 2: they need 3 frames plus 2 blanks between
    batch = _batch(lengths=(23, 17, 5), labels=((1, 2, 2, 3), (4, 1), (2, 2, 2)))
    assert ctc_feasible(torch.tensor([3]), torch.tensor([[2, 2, 2]]), torch.tensor([3])).tolist() == [False]
    model = _model()
    feasible = {k: v[:2] for k, v in batch.items()}
    reference = _reference_step(copy.deepcopy(model), feasible, None, detach=False)
    task = _fit(model, batch, 6, "exact")
    _assert_same_parameters(task.model, reference)
    assert task.skipped == 1
    assert torch.isfinite(task.trainer.callback_metrics["train/loss"])


def test_ctc_feasibility_counts_a_blank_between_repeated_labels():
    targets = torch.tensor([[1, 1, 2, 0], [1, 2, 3, 3]])
    lengths = torch.tensor([3, 3])  # the second utterance's repeated 3 lies in the padding
    assert ctc_feasible(torch.tensor([4, 3]), targets, lengths).tolist() == [True, True]
    assert ctc_feasible(torch.tensor([3, 2]), targets, lengths).tolist() == [False, False]


def test_greedy_decoding_merges_repeats_and_drops_blanks():
    path = torch.tensor([[0, 1, 1, 0, 1, 2, 2, 0, 3]])  # frames' best tokens; the last frame is padding
    log_probs = F.one_hot(path, VOCAB).double().log()  # (1, 9, V)
    assert greedy_decode(log_probs, torch.tensor([8])) == [[1, 1, 2]]


def test_task_rejects_windows_that_straddle_the_subsampling_stride():
    with pytest.raises(ConfigError, match="multiple of model.subsample=2"):
        CTCSpeechTask(model=_model(subsample=2), k1=7)
    with pytest.raises(ConfigError, match="has no k2"):
        CTCSpeechTask(model=_model(subsample=2), k1=6, k2=12)


class _Data(ListDataModule):
    """Hand-written batches plus what the task needs from a SpeechDataModule: tokens (V - 1) and features."""

    def speech_data(self) -> SpeechData:
        return SpeechData(tokens="abcd", num_features=FEATURES)


class _TaskOnListData(CTCSpeechTask):
    """The task's declared hook takes a SpeechDataModule's description; here ``_Data``'s."""

    def use_datamodule(self, datamodule) -> None:
        self.use_data(datamodule.speech_data())


def test_validation_decodes_with_the_tokens_handed_over_by_the_data():
    task = _TaskOnListData(model=_model(), optimizer=sgd(LR), k1=6, backprop="exact", num_decodings=1)
    trainer = run(task, [_batch()], val_batches=[_batch()], data=_Data)
    assert task.speech_data == SpeechData(tokens="abcd", num_features=FEATURES)
    assert task._samples[0][0] == "abbc"  # the reference of labels 1 2 2 3
    assert "val/ter" in trainer.callback_metrics and "val/wer" not in trainer.callback_metrics  # no space token
    with pytest.raises(ConfigError, match="model.num_features=6 but the data has 7"):
        task.use_data(SpeechData(tokens="abcd", num_features=FEATURES + 1))


def _fit_float(batch, backprop: str, precision: str | None, accelerator: str = "cpu", **trainer):
    model = _model().float()
    task = CTCSpeechTask(model=model, optimizer=sgd(LR), k1=6, backprop=backprop)
    run(task, [{k: v.float() if v.is_floating_point() else v for k, v in batch.items()}], precision=precision,
        accelerator=accelerator, **trainer)
    return task


@pytest.mark.parametrize("backprop", ["exact", "truncated"])
def test_bf16_mixed_sequence_training_on_cpu_is_fp32_up_to_rounding(backprop):
    batch = _batch()
    reference = _fit_float(batch, backprop, "32-true")
    task = _fit_float(batch, backprop, "bf16-mixed")
    diffs = [(p - q).abs().max().item() for p, q in zip(reference.model.parameters(), task.model.parameters())]
    assert 0 < max(diffs) < 5e-3  # bf16 rounding, not a different computation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backprop", ["exact", "truncated"])
def test_cudnn_sequence_training_equals_float64_reference(backprop):
    model, batch = _model(), _batch()
    reference = _reference_step(copy.deepcopy(model), batch, None if backprop == "exact" else 6,
                                detach=backprop == "truncated")
    task = _fit_float(batch, backprop, "32-true", accelerator="gpu")
    for p, q in zip(task.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.double().cpu(), q, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_sequence_training_on_gpu_unscales_the_carried_gradient(precision):
    from pytorch_lightning.plugins import MixedPrecision

    batch = _batch()
    reference = _fit_float(batch, "exact", "32-true", accelerator="gpu")
    # fp16: a loss scale of 1024 instead of 65536, whose first step would overflow and be skipped
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0) if precision == "16-mixed" else None
    task = _fit_float(batch, "exact", None, accelerator="gpu",
                      plugins=[MixedPrecision(precision, "cuda", scaler=scaler)])
    assert task.steps_taken == 1 and task.steps_skipped == 0
    diffs = [(p - q).abs().max().item() for p, q in zip(reference.model.parameters(), task.model.parameters())]
    assert max(diffs) < 5e-3  # a carried state gradient still holding the loss scale would be 1024x off


def test_long_utterance_lattice_goes_through_checkpointed_ctc_with_the_same_result():
    model, batch = _model(), _batch()
    reference = _reference_step(copy.deepcopy(model), batch, None, detach=False)
    task = _fit(model, batch, 6, "exact", ctc_lattice_limit_mb=0.0)  # every lattice counts as long
    _assert_same_parameters(task.model, reference)
