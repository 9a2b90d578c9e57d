"""``task.host_reads``: where the engine decides skip and clip. Deciding on the device
(``logging_steps``) trains exactly as deciding on the host (``every_step``), and reads nothing from
the device between logging steps. float64 unless the test is about precision."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bptt.errors import ConfigError
from bptt.lightning_modules import LanguageModelTask, NonFiniteLossError
from tests.engine_harness import run, sgd, stream_batches, tiny_model
from tests.lightning_modules.test_tbptt import PoisonedTask, _tokens

FUSED = {
    "sgd": partial(torch.optim.SGD, lr=0.5, fused=True),
    "adam": partial(torch.optim.Adam, lr=0.01, fused=True),
}


def _fit(mode: str, optimizer, poison=None, **task):
    model = PoisonedTask(poison or {}, model=tiny_model(), optimizer=optimizer, host_reads=mode, **task)
    trainer = run(model, stream_batches(_tokens(length=25), 4), log_every_n_steps=2)
    return model, trainer


@pytest.mark.parametrize("optimizer", list(FUSED))
@pytest.mark.parametrize("clip", [{"grad_clip": 0.3}, {"grad_clip": 0.02, "grad_clip_algorithm": "value"}])
def test_steps_decided_on_the_device_equal_steps_decided_on_the_host(optimizer, clip):
    """A NaN loss in window 1 (row 0), clipping in most steps: the same parameters bit for bit, the
    same counters and logged diagnostics; the skipped step counts as an optimizer step on the device."""
    host, host_trainer = _fit("every_step", FUSED[optimizer], {1: [0]}, **clip)
    device, device_trainer = _fit("logging_steps", FUSED[optimizer], {1: [0]}, **clip)
    for (name, p), q in zip(host.named_parameters(), device.parameters()):
        assert torch.equal(p, q), name
    assert (host.steps_taken, host.steps_skipped) == (device.steps_taken, device.steps_skipped) == (5, 1)
    assert host.steps_clipped == device.steps_clipped and 0 < host.steps_clipped
    assert (host_trainer.global_step, device_trainer.global_step) == (5, 6)
    for key in ("train/grad_norm", "train/clip_fraction", "train/skipped_steps", "train/loss"):
        assert host_trainer.callback_metrics[key].item() == device_trainer.callback_metrics[key].item(), key


def test_a_gradient_that_overflows_is_skipped_on_the_device_too():
    calls = []

    def poison_second_backward(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 2 else grad

    tasks = {}
    for mode in ("every_step", "logging_steps"):
        calls.clear()
        model = tiny_model()
        model.decoder.bias.register_hook(poison_second_backward)
        tasks[mode] = LanguageModelTask(model=model, optimizer=FUSED["adam"], host_reads=mode)
        run(tasks[mode], stream_batches(_tokens(length=13), 4))
    for p, q in zip(tasks["every_step"].parameters(), tasks["logging_steps"].parameters()):
        assert torch.equal(p, q)
    assert tasks["logging_steps"].steps_skipped == 1 and tasks["logging_steps"].steps_taken == 2


def test_the_consecutive_skip_limit_stops_training_at_the_next_logging_step():
    """Three bad steps in a row, then good ones: the host reads after four steps and still stops."""
    task = PoisonedTask({0: [0], 1: [1], 2: [2]}, model=tiny_model(), optimizer=FUSED["sgd"],
                        host_reads="logging_steps", max_consecutive_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps skipped.*the device decided"):
        run(task, stream_batches(_tokens(length=25), 4), log_every_n_steps=4)


class HostReads(TorchDispatchMode):
    """Counts the operations that hand a tensor's value to Python (item, bool, float, int: one
    ``_local_scalar_dense`` each; a boolean mask's ``nonzero``); on a GPU each is a wait for the device."""

    READS = ("aten._local_scalar_dense", "aten.nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(self.READS)
        return func(*args, **(kwargs or {}))


class ReadsPerBatch(pl.Callback):
    """The host reads of each training batch, from on_train_batch_start to on_train_batch_end
    (the forward, backward, optimizer step and the engine's logging in between)."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.mode: HostReads | None = None

    def on_train_batch_start(self, *args) -> None:
        self.mode = HostReads()
        self.mode.__enter__()

    def on_train_batch_end(self, *args) -> None:
        self.mode.__exit__(None, None, None)
        self.reads.append(self.mode.count)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_steps_decided_on_the_device_read_nothing_between_logging_steps(monkeypatch, precision):
    """The CPU's stand-in for CUDA's sync debug mode (tests below, on a GPU): every read of a device
    value by the host, tolist() included, counted per batch. Deciding on the host reads every step;
    on the device, only the logging steps (every third) read."""
    tolist = torch.Tensor.tolist
    counters: list[ReadsPerBatch] = []

    def counted_tolist(self):
        if counters and counters[-1].mode is not None:
            counters[-1].mode.count += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    reads = {}
    for mode in ("every_step", "logging_steps"):
        counters.append(ReadsPerBatch())
        task = LanguageModelTask(model=tiny_model(), optimizer=FUSED["adam"], grad_clip=0.3, host_reads=mode)
        run(task, stream_batches(_tokens(length=37), 4), precision=precision, log_every_n_steps=3,
            callbacks=[counters[-1]])
        reads[mode] = counters[-1].reads
    assert len(reads["logging_steps"]) == 9 and all(n >= 1 for n in reads["every_step"])
    logging = [i % 3 == 2 for i in range(9)]
    assert [n > 0 for n in reads["logging_steps"]] == logging, reads


def test_logging_steps_needs_an_optimizer_that_skips_on_the_device():
    with pytest.raises(ConfigError, match="host_reads=logging_steps.*fused: true"):
        LanguageModelTask(model=tiny_model(), optimizer=sgd(0.5), host_reads="logging_steps")
    with pytest.raises(ConfigError, match="task.host_reads must be auto, every_step or logging_steps"):
        LanguageModelTask(model=tiny_model(), host_reads="sometimes")


def test_auto_decides_on_the_host_on_a_cpu():
    task = LanguageModelTask(model=tiny_model(), optimizer=FUSED["adam"])
    run(task, stream_batches(_tokens(length=9), 4))
    assert task.host_reads == "auto" and task._device_counts is None


class DeviceWaits(pl.Callback):
    """CUDA's sync debug mode over each training batch: the warnings it raised, per batch."""

    def __init__(self) -> None:
        self.waits: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.caught.__exit__(None, None, None)
        self.waits.append(sum("synchroniz" in str(w.message) for w in self.records))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_on_a_gpu_the_host_waits_only_on_logging_steps(precision):
    """The issue's target: 0 host waits per optimizer step between logging steps (auto picks the device)."""
    callback = DeviceWaits()
    task = LanguageModelTask(model=tiny_model(), optimizer=partial(torch.optim.Adam, lr=0.01, fused=True),
                             grad_clip=0.3)
    run(task, stream_batches(_tokens(length=37), 4), precision=precision, accelerator="gpu", log_every_n_steps=3,
        callbacks=[callback])
    assert task._device_counts is not None  # auto: decided on the device
    assert [n > 0 for n in callback.waits] == [i % 3 == 2 for i in range(9)], callback.waits


class GradientRecorder(pl.Callback):
    """Copies every gradient a callback sees in ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("mode", ["every_step", "logging_steps"])
@pytest.mark.parametrize("clip", [{"grad_clip": 1e-3}, {"grad_clip": 1e-4, "grad_clip_algorithm": "value"}])
def test_a_callback_sees_the_gradients_before_clipping(mode, clip):
    """Lightning's contract: ``on_before_optimizer_step`` of a callback sees the gradients the backward pass
    left. The first step's are those of an unclipped run, bit for bit, on both host_reads paths, and the
    clipped run still clips (its parameters differ from the unclipped run's after the first step)."""
    seen = {}
    for name, settings in (("clipped", clip), ("unclipped", {})):
        recorder = GradientRecorder()
        task = LanguageModelTask(model=tiny_model(), optimizer=FUSED["sgd"], host_reads=mode, **settings)
        run(task, stream_batches(_tokens(length=13), 4), max_steps=1, callbacks=[recorder])
        seen[name] = (recorder.steps[0], [p.detach().clone() for p in task.parameters()])
        recorded = torch.linalg.vector_norm(torch.stack([g.norm() for g in recorder.steps[0].values()]))
        logged = torch.as_tensor(task.last_grad_norm, dtype=recorded.dtype)  # train/grad_norm: the pre-clip norm
        assert torch.allclose(logged, recorded, rtol=1e-12), (logged, recorded)
    (clipped_grads, clipped_params), (unclipped_grads, unclipped_params) = seen["clipped"], seen["unclipped"]
    assert clipped_grads.keys() == unclipped_grads.keys()
    for key in clipped_grads:
        assert torch.equal(clipped_grads[key], unclipped_grads[key]), key
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped_grads.values()]))
    assert norm > 1e-3 and max(g.abs().max() for g in clipped_grads.values()) > 1e-4  # clipping has work to do
    assert any(not torch.equal(p, q) for p, q in zip(clipped_params, unclipped_params))
