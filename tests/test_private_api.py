"""Each private attribute that bptt.private_api reads still exists: an upgrade that removes one fails here, loudly."""


def test_datasets_still_has_the_dataset_fingerprint():
    import datasets

    from bptt.private_api import dataset_fingerprint

    a, b = datasets.Dataset.from_dict({"text": ["a"]}), datasets.Dataset.from_dict({"text": ["b"]})
    assert hasattr(a, "_fingerprint"), "datasets.Dataset._fingerprint is gone: see bptt.private_api.dataset_fingerprint"
    assert dataset_fingerprint(a) == dataset_fingerprint(datasets.Dataset.from_dict({"text": ["a"]}))
    assert dataset_fingerprint(a) != dataset_fingerprint(b)


def test_ray_still_names_the_head_node_resource():
    from bptt.private_api import head_node_resource

    try:
        (name,) = head_node_resource()
    except ImportError as err:
        raise AssertionError(f"ray._common.constants.HEAD_NODE_RESOURCE_NAME is gone ({err}): see "
                             "bptt.private_api.head_node_resource") from None
    assert name == "node:__internal_head__", f"Ray's head-node resource is now {name!r}: check Ray's docs"


def test_ray_train_still_calls_after_report_with_metrics_and_checkpoint():
    import inspect

    from ray.train import UserCallback

    from bptt.private_api import forward_train_reports

    hook = getattr(UserCallback, "after_report", None)
    assert hook is not None, "ray.train.UserCallback.after_report is gone: see bptt.private_api.forward_train_reports"
    assert list(inspect.signature(hook).parameters) == ["self", "run_context", "metrics", "checkpoint"], (
        "ray.train.UserCallback.after_report changed its arguments: see bptt.private_api.forward_train_reports")

    class Reports:
        def __init__(self) -> None:
            self.items: list = []

        def put(self, item) -> None:
            self.items.append(item)

    reports = Reports()
    callback = forward_train_reports(reports)
    assert isinstance(callback, UserCallback)
    callback.after_report(run_context=None, metrics=[{"loss": 1.5}, {"loss": 1.6}], checkpoint="ckpt")
    assert reports.items == [({"loss": 1.5}, "ckpt")]


def test_lightning_still_says_whether_a_training_step_is_logged():
    import pytorch_lightning as pl

    from bptt.private_api import logs_this_step

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1)
    connector = getattr(trainer, "_logger_connector", None)
    assert connector is not None and hasattr(type(connector), "should_update_logs"), (
        "pytorch_lightning Trainer._logger_connector.should_update_logs is gone: see bptt.private_api.logs_this_step")
    assert logs_this_step(trainer) is True  # no active loop: Lightning logs


def test_lightning_still_decides_validation_after_a_batch():
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop


    assert callable(getattr(_TrainingEpochLoop, "_should_check_val_fx", None)), (
        "Lightning's _TrainingEpochLoop._should_check_val_fx is gone: see bptt.private_api.validation_follows")
    trainer = _tiny_fit(val_check_interval=2)
    assert hasattr(trainer.fit_loop, "_data_fetcher"), (
        "Lightning's fit_loop._data_fetcher is gone: see bptt.private_api.validation_follows")
    assert trainer.callbacks[0].follows == [False, True, False, True], trainer.callbacks[0].follows


def test_lightning_model_checkpoint_still_writes_last_on_demand(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from bptt.private_api import write_last_checkpoint

    for name in ("_should_skip_saving_checkpoint", "_monitor_candidates", "_save_last_checkpoint"):
        assert callable(getattr(ModelCheckpoint, name, None)), (
            f"Lightning's ModelCheckpoint.{name} is gone: see bptt.private_api.write_last_checkpoint")
    trainer = _tiny_fit(val_check_interval=4, max_steps=3, dirpath=tmp_path)
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    (tmp_path / "last.ckpt").unlink(missing_ok=True)
    trainer.state.fn = "fit"
    write_last_checkpoint(checkpoint, trainer)  # already written at this step: skipped
    assert not (tmp_path / "last.ckpt").exists()
    checkpoint._last_global_step_saved = -1
    write_last_checkpoint(checkpoint, trainer)
    assert (tmp_path / "last.ckpt").is_file()


def _tiny_fit(*, val_check_interval: int, max_steps: int = 4, dirpath=None):
    """A 4-batch fit of a linear model on CPU, recording ``validation_follows`` after each batch."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from bptt.private_api import validation_follows

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.follows: list[bool] = []

        def on_train_batch_end(self, trainer, *args) -> None:
            self.follows.append(validation_follows(trainer))

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.layer(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    callbacks = [Record()]
    if dirpath is not None:
        callbacks.append(ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0))
    trainer = pl.Trainer(max_steps=max_steps, val_check_interval=val_check_interval, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=dirpath is not None, callbacks=callbacks, accelerator="cpu")
    trainer.fit(Linear(), data, data)
    return trainer


def test_torch_fused_optimizers_still_skip_a_step_on_gradscalers_flag():
    from functools import partial

    import torch

    from bptt.private_api import step_unless, supports_device_skip

    for kind in (torch.optim.Adam, torch.optim.SGD):
        make = partial(kind, lr=0.1, fused=True)
        skipped, taken, plain = (torch.nn.Parameter(torch.arange(4.0)) for _ in range(3))
        optimizers = [make([p]) for p in (skipped, taken, plain)]
        assert all(supports_device_skip(o) for o in optimizers), (
            "torch.optim's fused optimizers lost _step_supports_amp_scaling: see bptt.private_api.step_unless")
        for p in (skipped, taken, plain):
            p.grad = torch.ones(4)
        step_unless(optimizers[0], torch.tensor(True))
        step_unless(optimizers[1], torch.tensor(False))
        optimizers[2].step()
        assert torch.equal(skipped.detach(), torch.arange(4.0)), (
            "a fused optimizer ignored found_inf (GradScaler's flag): see bptt.private_api.step_unless")
        assert torch.equal(taken.detach(), plain.detach()) and not torch.equal(plain.detach(), torch.arange(4.0))
        assert not hasattr(optimizers[0], "found_inf")
    assert not supports_device_skip(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]))


def test_jsonargparse_still_keeps_its_import_path_policy_where_bptt_restores_it():
    from jsonargparse import ArgumentParser

    from bptt.private_api import jsonargparse_import_paths_allowed

    try:
        from jsonargparse._common import parsing_settings
    except ImportError as err:
        raise AssertionError(f"jsonargparse._common.parsing_settings is gone ({err}): see "
                             "bptt.private_api.jsonargparse_import_paths_allowed") from None
    keys = ("import_path_verdicts", "import_paths_enforced")
    assert all(k in parsing_settings for k in keys), "jsonargparse renamed its import-path settings"
    before = {k: parsing_settings[k] for k in keys}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--where", type=type)
    with jsonargparse_import_paths_allowed(("bptt",)):
        try:
            parser.parse_args(["--where", "pathlib.Path"])
            raise AssertionError("jsonargparse no longer enforces import_path_allowlist")
        except Exception as err:
            assert "not allowed" in str(err), err
    assert {k: parsing_settings[k] for k in keys} == before
