"""``bptt fit``: train a run from a config, as a new MLflow run."""

from __future__ import annotations

import json

from bptt.commands.command import Command

HELP = """usage: bptt fit --config FILE|NAME [--KEY VALUE ...] [--trust-config]

Train with truncated backpropagation through time, as a new MLflow run. Ends by printing the final
metrics as one JSON line.

A config has these keys; dotted options on the command line replace single values:
  seed_everything   seed of torch, numpy and random
  trainer           pytorch_lightning.Trainer arguments (max_steps, devices, precision: auto, ...)
  model             the network: bptt.models.RNNLanguageModel, RNNAcousticModel, RNNForecaster
                    (core: TorchRNNCore's LSTM/GRU, or bptt.models.MinGRU, MinLSTM, DiagonalGRU)
  task              the LightningModule on the TBPTT engine: bptt.lightning_modules.LanguageModelTask,
                    CTCSpeechTask, ForecastTask (k1, k2, grad_clip, optimizer, lr_scheduler)
  data              the DataModule: bptt.datamodules.TextStreamDataModule, SpeechDataModule,
                    TimeSeriesDataModule, CopyMemoryDataModule, AddingProblemDataModule
  tracking          MLflow: tracking_uri, experiment_name, run_name, log_model, enabled
  checkpoint        every_n_steps, keep_last

options:
  --config FILE|NAME     a YAML file, or a config shipped with bptt by name (bptt configs lists them)
  --trust-config         let the config name code outside bptt's allow-list (only configs you wrote)
  --help-all             every key, its type and default (long)
  --model.help CLASS     the arguments of one class, e.g. --model.help bptt.models.RNNLanguageModel
                         (also --task.help, --data.help)

examples:
  bptt fit --config quickstart
  bptt fit --config conf/lm/tinyshakespeare_char.yaml --trainer.max_steps 2000 --model.hidden_size 512
  bptt fit --config quickstart --trainer.precision auto --trainer.logger+=TensorBoardLogger"""


def run(args: list[str], trusted: bool) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        return 0
    from bptt.config.packaged import resolve_config_args

    args = resolve_config_args(args, "train")  # a bad name answers before torch and Lightning are imported
    from bptt.config.parser import build_parser, parse_config  # a resolved path passes its resolution unchanged

    if args[0] == "--help-all":
        build_parser().print_help()
        return 0
    cfg = parse_config(args, trusted=trusted)
    from bptt.training.run import fit

    print(json.dumps(fit(cfg)))
    return 0


COMMAND = Command("train a run from a config, as a new MLflow run", run)
