"""The TBPTT engine against independent references: full BPTT, a hand-written window loop,
Williams & Peng TBPTT(k1, k2) stepped one time step at a time, clipping, the non-finite guard,
mixed precision and schedulers. float64 throughout unless the test is about precision."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bptt.lightning_modules import LanguageModelTask, NonFiniteLossError
from bptt.metric_names import VAL_LOSS
from bptt.models import MinGRU, MinLSTM, RNNLanguageModel
from tests.engine_harness import run, sgd, stream_batches, tiny_model

LR = 0.5


def _tokens(batch: int = 3, length: int = 14, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 7, (batch, length), generator=torch.Generator().manual_seed(seed))


def _detach(state):
    return tuple(s.detach() for s in state)


def _window_loop(model, tokens, window, *, carry=True, resets=None, clip=None, skip=()):
    """Reference TBPTT(k, k): loop over windows, carry the detached state, one SGD step per window
    (none for the windows in ``skip``); ``resets[i]`` zeroes those rows before window i."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, state = tokens[:, :-1], tokens[:, 1:], None
    for i, start in enumerate(range(0, x.shape[1], window)):
        if resets and i in resets and state is not None:
            keep = ~resets[i]
            state = tuple(s * keep.view(-1, 1, 1) for s in state)
        logits, new = model(x[:, start : start + window], state if carry else None)
        state = _detach(new)
        if i in skip:
            continue
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, start : start + window].flatten())
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            clip(model.parameters())
        opt.step()
    return model


def _assert_same_parameters(a, b, atol=1e-10):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=0, msg=f"parameter {name} differs")


def test_whole_sequence_window_equals_full_bptt_gradient():
    model = tiny_model()
    reference = copy.deepcopy(model).double()
    tokens = _tokens()
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    task = LanguageModelTask(model=model, optimizer=sgd(1.0))
    run(task, [batch])

    logits, _ = reference(batch["inputs"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p_after, p_before, grad in zip(task.model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p_before.detach() - p_after.detach(), grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH"])
def test_split_mode_windows_equal_reference_loop(rnn_type):
    model = tiny_model(rnn_type=rnn_type)
    reference = copy.deepcopy(model).double()
    tokens = _tokens(length=14)
    task = LanguageModelTask(model=model, optimizer=sgd(LR), k1=4)
    run(task, [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}])
    _assert_same_parameters(task.model, _window_loop(reference, tokens, 4))


def test_stream_mode_carries_state_across_batches():
    model = tiny_model()
    carried, fresh = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    tokens = _tokens(length=17)
    task = LanguageModelTask(model=model, optimizer=sgd(LR))
    trainer = run(task, stream_batches(tokens, 4))
    assert trainer.global_step == 4
    _assert_same_parameters(task.model, _window_loop(carried, tokens, 4))
    # the same windows without carried state end elsewhere: the carry is what made them equal
    with pytest.raises(AssertionError):
        _assert_same_parameters(task.model, _window_loop(fresh, tokens, 4, carry=False))


@pytest.mark.parametrize("core", ["LSTM", "MinGRU", "MinLSTM"])
def test_stream_mode_resets_exactly_the_marked_streams(core):
    """torch's LSTM, and the scan cores against their sequential evaluation."""
    model = tiny_model() if core == "LSTM" else _scan_model({"MinGRU": MinGRU, "MinLSTM": MinLSTM}[core])
    reference = copy.deepcopy(model).double()
    if core != "LSTM":
        reference.rnn.evaluation = "sequential"
    tokens = _tokens(length=13)
    batches = stream_batches(tokens, 4)
    batches[2]["reset"] = torch.tensor([False, True, False])
    task = LanguageModelTask(model=model, optimizer=sgd(LR))
    run(task, batches)
    _assert_same_parameters(task.model,
                            _window_loop(reference, tokens, 4, resets={2: torch.tensor([False, True, False])}))
    assert torch.all(task.carried.start[0][1] != 0)  # the reset row ran on afterwards


def _williams_peng(model, tokens, k1, k2, batch_window):
    """Reference TBPTT(k1, k2), one time step per call: every k1 new steps, backpropagate the loss of
    those steps through the last k2 - k1 earlier steps too, from the state last computed there."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = tokens[:, :-1], tokens[:, 1:]
    states = {0: None}  # detached state at time t, from the latest forward that passed t
    updates = [(a, min(a + k1, b)) for s in range(0, x.shape[1], batch_window)
               for b in [min(s + batch_window, x.shape[1])] for a in range(s, b, k1)]
    for a, e in updates:
        start = max(0, a - (k2 - k1))
        state, losses = states[start], []
        for t in range(start, e):
            logits, state = model(x[:, t : t + 1], state)
            if t >= a:
                losses.append(F.cross_entropy(logits[:, 0], y[:, t], reduction="none"))
            states[t + 1] = _detach(state)
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize(("k1", "k2", "batch_window"), [(2, 5, 4), (3, 4, 6), (2, 2, 5), (1, 3, 3)])
def test_k1_less_than_k2_equals_williams_peng_reference(k1, k2, batch_window):
    model = tiny_model()
    reference = copy.deepcopy(model).double()
    tokens = _tokens(length=19)
    task = LanguageModelTask(model=model, optimizer=sgd(LR), k1=k1, k2=k2)
    run(task, stream_batches(tokens, batch_window))
    _assert_same_parameters(task.model, _williams_peng(reference, tokens, k1, k2, batch_window))


def _scan_model(cls: type, seed: int = 0) -> RNNLanguageModel:
    """tiny_model's sizes with a 2-layer minGRU / minLSTM core, evaluated by its parallel scan."""
    torch.manual_seed(seed)
    return RNNLanguageModel(vocab_size=7, embedding_size=4, core=partial(cls, hidden_size=5, num_layers=2))


@pytest.mark.parametrize(("k1", "k2", "batch_window"), [(4, 4, 4), (3, 3, 6), (2, 5, 4), (3, 4, 6)])
@pytest.mark.parametrize("cls", [MinGRU, MinLSTM], ids=lambda c: c.__name__)
def test_a_scan_core_under_tbptt_equals_the_step_by_step_reference(cls, k1, k2, batch_window):
    """bptt fit with the core's parallel scan over each window against Williams & Peng stepped one time step
    at a time through the core's sequential evaluation, TBPTT(k1 = k2) and TBPTT(k1 < k2), state carried."""
    model = _scan_model(cls)
    assert model.rnn.evaluation == "scan"
    reference = copy.deepcopy(model).double()
    reference.rnn.evaluation = "sequential"
    tokens = _tokens(length=19)
    task = LanguageModelTask(model=model, optimizer=sgd(LR), k1=k1, k2=k2)
    run(task, stream_batches(tokens, batch_window))
    _assert_same_parameters(task.model, _williams_peng(reference, tokens, k1, k2, batch_window))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_equals_reference_and_logs_fraction(algorithm):
    model = tiny_model()
    reference = copy.deepcopy(model).double()
    tokens = _tokens(length=13)
    task = LanguageModelTask(model=model, optimizer=sgd(LR), grad_clip=1e-3, grad_clip_algorithm=algorithm)
    trainer = run(task, stream_batches(tokens, 4))
    if algorithm == "norm":
        clip = lambda ps: torch.nn.utils.clip_grad_norm_(list(ps), 1e-3)  # noqa: E731
    else:
        clip = lambda ps: torch.nn.utils.clip_grad_value_(list(ps), 1e-3)  # noqa: E731
    _assert_same_parameters(task.model, _window_loop(reference, tokens, 4, clip=clip))
    assert trainer.callback_metrics["train/clip_fraction"] == 1.0
    unclipped = LanguageModelTask(model=tiny_model(), optimizer=sgd(LR), grad_clip=1e6)
    assert run(unclipped, stream_batches(tokens, 4)).callback_metrics["train/clip_fraction"] == 0.0


class PoisonedTask(LanguageModelTask):
    """Makes the losses of the given (window, row) pairs NaN, as a diverging model would."""

    def __init__(self, poison: dict[int, list[int]], **kwargs):
        super().__init__(**kwargs)
        self.poison, self.calls = poison, 0

    def window_step(self, window, state):
        losses, state = super().window_step(window, state)
        rows = self.poison.get(self.calls, [])
        self.calls += 1
        if rows:
            bad = torch.zeros_like(losses)
            bad[rows] = float("nan")
            losses = losses + bad
        return losses, state


def test_nonfinite_step_is_skipped_and_its_streams_reset():
    model = tiny_model()
    reference = copy.deepcopy(model).double()
    tokens = _tokens(length=17)
    task = PoisonedTask({1: [0]}, model=model, optimizer=sgd(LR))
    trainer = run(task, stream_batches(tokens, 4))
    assert trainer.global_step == 3  # four windows, one skipped
    assert trainer.callback_metrics["train/skipped_steps"] == 1.0

    # reference: window 1 makes no update and stream 0 starts window 2 from zeros
    reset_stream_0 = {2: torch.tensor([True, False, False])}
    _assert_same_parameters(task.model, _window_loop(reference, tokens, 4, resets=reset_stream_0, skip={1}))


def test_nonfinite_gradient_with_finite_loss_is_skipped_and_state_kept():
    model = tiny_model()
    reference = copy.deepcopy(model).double()
    backward_calls = []

    def poison_second_backward(grad):
        backward_calls.append(1)
        return grad * float("inf") if len(backward_calls) == 2 else grad

    model.decoder.bias.register_hook(poison_second_backward)
    tokens = _tokens(length=13)
    task = LanguageModelTask(model=model, optimizer=sgd(LR))
    trainer = run(task, stream_batches(tokens, 4))
    assert trainer.global_step == 2 and trainer.callback_metrics["train/skipped_steps"] == 1.0

    # reference: window 1 makes no update; its state is finite, so every stream carries on
    _assert_same_parameters(task.model, _window_loop(reference, tokens, 4, skip={1}))


def test_consecutive_nonfinite_steps_stop_training_with_clear_error():
    task = PoisonedTask({i: [0, 1, 2] for i in range(10)}, model=tiny_model(), optimizer=sgd(LR),
                        max_consecutive_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps skipped.*lower the learning rate"):
        run(task, stream_batches(_tokens(length=30), 4))


class DtypeRecorder(LanguageModelTask):
    def window_step(self, window, state):
        logits, _ = self.model(window["inputs"], state)
        self.logits_dtype = logits.dtype
        return super().window_step(window, state)


def test_bf16_mixed_on_cpu_autocasts_and_tracks_fp32():
    tokens = _tokens(length=9)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        task = DtypeRecorder(model=tiny_model(), optimizer=sgd(LR))
        run(task, stream_batches(tokens, 4), precision=precision)
        results[precision] = task
    assert results["32-true"].logits_dtype == torch.float32
    assert results["bf16-mixed"].logits_dtype == torch.bfloat16
    assert next(results["bf16-mixed"].model.parameters()).dtype == torch.float32  # master weights stay fp32
    diffs = [(p - q).abs().max().item() for p, q in
             zip(results["32-true"].model.parameters(), results["bf16-mixed"].model.parameters())]
    assert 0 < max(diffs) < 5e-3  # bf16 rounding, not a different computation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("precision", "dtype"), [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_mixed_precision_on_gpu_autocasts_scales_and_tracks_fp32(precision, dtype):
    tokens = _tokens(length=9)
    reference = DtypeRecorder(model=tiny_model(), optimizer=sgd(LR), grad_clip=0.05)
    run(reference, stream_batches(tokens, 4), precision="32-true", accelerator="gpu")
    task = DtypeRecorder(model=tiny_model(), optimizer=sgd(LR), grad_clip=0.05)
    trainer = run(task, stream_batches(tokens, 4), precision=precision, accelerator="gpu")
    assert task.logits_dtype == dtype
    assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == (precision == "16-mixed")
    assert trainer.global_step == 2 and trainer.callback_metrics["train/clip_fraction"] == 1.0
    diffs = [(p - q).abs().max().item() for p, q in zip(reference.model.parameters(), task.model.parameters())]
    assert max(diffs) < 5e-3  # clipped on unscaled gradients: the fp16 scale (65536) would show here


def test_step_scheduler_steps_once_per_optimizer_step():
    task = LanguageModelTask(model=tiny_model(), optimizer=sgd(1.0),
                             lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    run(task, stream_batches(_tokens(length=13), 4))  # 3 optimizer steps
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(0.5**3)


def test_epoch_scheduler_steps_once_per_epoch():
    task = LanguageModelTask(model=tiny_model(), optimizer=sgd(1.0), lr_scheduler_interval="epoch",
                             lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    run(task, stream_batches(_tokens(length=13), 4), max_epochs=2)
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(0.25)


def test_plateau_scheduler_steps_on_validation_loss():
    tokens = _tokens(length=13)
    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, eps=0)  # noqa: E731
    # lr 1e-9: the validation loss cannot improve, so every validation after the first halves the lr
    task = LanguageModelTask(model=tiny_model(), optimizer=sgd(1e-9), lr_scheduler=plateau)
    trainer = run(task, stream_batches(tokens, 4), val_batches=stream_batches(tokens, 6), max_epochs=3)
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(1e-9 * 0.25)
    assert VAL_LOSS in trainer.callback_metrics


def test_validation_carries_state_and_weights_by_target_count():
    model = tiny_model()
    reference = copy.deepcopy(model).double().eval()
    tokens = _tokens(length=12)
    val = stream_batches(tokens, 5)  # windows of 5, 5 and 1 steps
    task = LanguageModelTask(model=model, optimizer=sgd(0.0))
    trainer = run(task, stream_batches(tokens, 4), val_batches=val)
    with torch.no_grad():
        logits, _ = reference(tokens[:, :-1])  # one pass over the whole split
        expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert trainer.callback_metrics[VAL_LOSS].item() == pytest.approx(expected.item(), abs=1e-6)
    assert trainer.callback_metrics["val/ppl"].item() == pytest.approx(expected.exp().item(), rel=1e-6)


def test_validation_counts_only_masked_steps_as_training_does():
    model = tiny_model()
    reference = copy.deepcopy(model).double().eval()
    tokens = _tokens(length=12)
    val = stream_batches(tokens, 5)
    for batch in val:
        batch["mask"] = torch.rand(batch["targets"].shape, generator=torch.Generator().manual_seed(7)) > 0.5
    task = LanguageModelTask(model=model, optimizer=sgd(0.0))
    trainer = run(task, stream_batches(tokens, 4), val_batches=val)
    mask = torch.cat([b["mask"] for b in val], dim=1)  # (B, 11)
    with torch.no_grad():
        logits, _ = reference(tokens[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view_as(mask)
    expected = losses[mask].mean()
    assert trainer.callback_metrics[VAL_LOSS].item() == pytest.approx(expected.item(), abs=1e-6)


def test_engine_rejects_k1_above_k2():
    with pytest.raises(ValueError, match=r"task.k1=8 > task.k2=4.*k1 <= k2"):
        LanguageModelTask(model=tiny_model(), k1=8, k2=4)


class HostWaits(LanguageModelTask):
    """Records, for each training step, the operations that made the host wait for the GPU
    (CUDA's sync debug mode warns on each)."""

    waits: list[list[str]]

    def on_train_start(self):
        super().on_train_start()
        self.waits = []

    def training_step(self, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                super().training_step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.waits.append([str(w.message) for w in caught if "synchroniz" in str(w.message)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("precision", "waits"), [("32-true", 1), ("bf16-mixed", 1), ("16-mixed", 2)])
def test_a_training_step_waits_for_the_gpu_once(precision, waits):
    """Decisions (skip a non-finite step, clip) need one read of the gradient norm; the rest of
    the engine's step stays on the device (fp16: GradScaler reads its overflow flag too), so the
    GPU does not idle while Python decides. Steps that log (every log_every_n_steps) read more."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    plugins = []
    if precision == "16-mixed":  # a scale that does not overflow at the first step
        plugins = [MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", init_scale=1024.0))]
    task = HostWaits(model=tiny_model(), optimizer=sgd(LR), grad_clip=0.05)  # clips every step
    trainer = run(task, stream_batches(_tokens(length=13), 4), precision=None if plugins else precision,
                  accelerator="gpu", plugins=plugins, log_every_n_steps=100)
    assert trainer.global_step == 3 and task.steps_clipped == 3
    assert [len(w) for w in task.waits] == [waits] * 3, task.waits


def test_carried_state_checkpoint_gives_each_rank_its_streams():
    from bptt.lightning_modules.tbptt import CarriedState

    rows = torch.arange(8.0).view(4, 1, 2)  # (B_global, L, H): streams 0-3
    carried = CarriedState(start=(rows,), history={"inputs": torch.arange(4).view(4, 1)}, end=(rows + 100,))
    saved = carried.to_checkpoint(lambda t: t.detach().cpu())
    assert set(saved) == {"train_state", "end_state", "history"}  # the keys checkpoints have always had
    second = CarriedState.from_checkpoint(saved, rank=1, world_size=2, device=torch.device("cpu"))
    torch.testing.assert_close(second.start[0], rows[2:])
    torch.testing.assert_close(second.end[0], rows[2:] + 100)
    assert second.history["inputs"].flatten().tolist() == [2, 3]
    empty = CarriedState().to_checkpoint(lambda t: t)
    assert CarriedState.from_checkpoint(empty, rank=0, world_size=1, device=torch.device("cpu")) == CarriedState()


def test_fit_with_a_datamodule_prints_no_warning_about_overridden_hooks():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(LanguageModelTask(model=tiny_model(), optimizer=sgd(LR)), stream_batches(_tokens(length=9), 4))
    assert not [str(w.message) for w in caught if "overridden" in str(w.message)]
