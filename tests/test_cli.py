"""The `bptt` command end to end: fit, validate, test and generate on real corpora, DDP on CPU,
and bad input that stops before any training with one line."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bptt.cli import main
from bptt.datamodules import TextStreamDataModule
from bptt.datamodules.streams import stream_layout
from bptt.datamodules.text_corpus import Vocabulary
from bptt.models import MinGRU, RNNLanguageModel
from tests.bptt_command import MIN_GRU, SMALL, bptt
from tests.conftest import PROJECT


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.hiden_size", "3"], "Option 'hiden_size' is not accepted"),
        (["--trainer.max_steps", "abc"], "Expected a <class 'int'>. Got value: abc"),
        (["--task.k1", "10", "--task.k2", "5"], "task.k1=10 > task.k2=5"),
        (["--data.bptt", "1000000"], "data.bptt=1000000 is longer than the train streams"),
        (["--data.corpus", "nowhere.txt"], "corpus 'nowhere.txt' not found"),
        (["--data.corpus", "latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--data.corpus", "empty.txt"], "split of .*empty.txt is empty"),
        (["--trainer.precision", "fp8"], "trainer.precision must be auto, or one of Lightning's: 32-true, bf16-mixed"),
        # checked before auto measures anything
        (["--trainer.precision", "auto", "--task.optimizer.init_args.lr", "-1"], "task.optimizer"),
    ],
)
def test_bad_input_fails_in_one_line_before_training(args, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50)
    (tmp_path / "empty.txt").write_text("")
    monkeypatch.setenv("BPTT_DATA_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    code = main(["fit", *SMALL, "--trainer.default_root_dir", str(run_dir), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("bptt: error: ") and re.search(message, err[-1])
    assert not run_dir.exists()  # nothing was started or written


def test_unknown_command_and_checkpoint_errors(tmp_path, capsys):
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert main(["runs", "--bogus", "1"]) == 2
    assert capsys.readouterr().err == "bptt: error: unrecognized arguments: --bogus 1; see bptt runs --help\n"
    assert main(["validate", str(tmp_path / "none.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["test", str(tmp_path / "junk.ckpt")]) == 2
    assert "cannot be read" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real `bptt fit` run of the shrunk quickstart."""
    root = tmp_path_factory.mktemp("fit")
    result = bptt("fit", *SMALL, "--trainer.default_root_dir", str(root / "run"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_fit_writes_config_vocab_logs_and_checkpoints(trained):
    for name in ("config.yaml", "vocab.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (trained / name).is_file(), name
    metrics = (next(trained.glob("logs/version_*/metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    for key in ("train/loss", "train/bpc", "train/tokens_per_sec", "train/grad_norm", "train/clip_fraction",
                "val/loss", "val/bpc"):
        assert key in header, key
    ckpt = torch.load(trained / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12


def _independent_val_loss(run: Path) -> float:
    """val/loss of a checkpoint computed without the engine: one pass over each stream, state carried."""
    ckpt = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    vocab = Vocabulary.load(run / "vocab.json")
    model = RNNLanguageModel(vocab_size=len(vocab), embedding_size=64, hidden_size=32, num_layers=1)
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    dm = TextStreamDataModule(stdlib_glob="json/*.py", vocab_file=str(run / "vocab.json"))
    dm.load()
    streams = stream_layout(dm.ids["validation"].long(), 4)  # (4, L)
    with torch.no_grad():
        logits, _ = model.eval()(streams[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), streams[:, 1:].flatten()).item()


@pytest.mark.slow
def test_validate_and_test_a_checkpoint(trained):
    result = bptt("validate", str(trained / "checkpoints/best.ckpt"), "--trainer.enable_progress_bar", "false",
                  cwd=trained)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads(result.stdout.splitlines()[-1])["val/loss"]
    assert reported == pytest.approx(_independent_val_loss(trained), abs=1e-4)
    result = bptt("test", str(trained / "checkpoints/best.ckpt"), "--trainer.enable_progress_bar", "false", cwd=trained)
    assert result.returncode == 0 and "test/bpc" in json.loads(result.stdout.splitlines()[-1])


def _greedy(model: RNNLanguageModel, ckpt: str, vocab: Vocabulary, prompt: str, tokens: int) -> str:
    """``prompt`` and the argmax continuation of ``model`` with a checkpoint's weights, one token at a time."""
    state_dict = torch.load(ckpt, weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()})
    ids, state, out = torch.tensor([vocab.encode(prompt)]), None, []
    with torch.no_grad():
        for _ in range(tokens):
            logits, state = model.eval()(ids, state)
            ids = logits[:, -1:].argmax(-1)
            out.append(ids.item())
    return prompt + vocab.decode(out)


@pytest.mark.slow
def test_generate_samples_reproducibly_and_greedy_matches_argmax(trained):
    ckpt = str(trained / "checkpoints/last.ckpt")
    a = bptt("generate", ckpt, "--prompt", "def ", "--num-tokens", "40", "--seed", "3", cwd=trained)
    b = bptt("generate", ckpt, "--prompt", "def ", "--num-tokens", "40", "--seed", "3", cwd=trained)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout == b.stdout and a.stdout.startswith("def ") and len(a.stdout) == len("def ") + 40 + 1

    greedy = bptt("generate", ckpt, "--prompt", "def ", "--num-tokens", "10", "--temperature", "0", cwd=trained)
    vocab = Vocabulary.load(trained / "vocab.json")
    model = RNNLanguageModel(vocab_size=len(vocab), embedding_size=64, hidden_size=32, num_layers=1)
    assert greedy.stdout == _greedy(model, ckpt, vocab, "def ", 10) + "\n"


def _logged(run: Path, key: str) -> list[tuple[int, float]]:
    rows = (line.split(",") for line in (run / "logs/version_0/metrics.csv").read_text().splitlines())
    header = next(rows)
    return [(int(r[header.index("step")]), float(r[header.index(key)])) for r in rows if r[header.index(key)]]


@pytest.mark.slow
def test_m_windows_per_batch_train_bit_for_bit_like_one(tmp_path):
    """data.windows_per_batch 4: a batch of 4 windows of data.bptt steps, 4 optimizer steps; the same run as
    one window per batch, with validation, step checkpoints and a step scheduler counted in optimizer steps."""
    args = [*SMALL, "--trainer.max_steps", "12", "--trainer.val_check_interval", "8", "--checkpoint.every_n_steps", "2",
            "--checkpoint.keep_last", "10", "--trainer.log_every_n_steps", "4", "--model.dropout", "0.2",
            "--trainer.deterministic", "true",
            "--task.lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR",
            "--task.lr_scheduler.init_args.step_size", "3", "--task.lr_scheduler.init_args.gamma", "0.5"]
    runs = {}
    for m in (1, 4):
        runs[m] = tmp_path / f"m{m}"
        result = bptt("fit", *args, "--data.windows_per_batch", str(m), "--trainer.default_root_dir", str(runs[m]),
                      cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    # every 2 steps, but a batch of 4 windows ends only at 4, 8, 12 (8: validation, so last.ckpt, not a step one)
    steps = {m: sorted(p.name for p in (runs[m] / "checkpoints").glob("step-*.ckpt")) for m in (1, 4)}
    assert steps[4] == ["step-0000004.ckpt", "step-0000012.ckpt"] and set(steps[4]) < set(steps[1]), steps
    for name in (*steps[4], "best.ckpt", "last.ckpt"):
        one, four = (torch.load(runs[m] / "checkpoints" / name, weights_only=True) for m in (1, 4))
        assert one["global_step"] == four["global_step"]
        assert one["lr_schedulers"] == four["lr_schedulers"]  # StepLR stepped per optimizer step in both
        for key, value in one["state_dict"].items():
            assert torch.equal(four["state_dict"][key], value), f"{name}: {key} differs"
    # the loggers' x-axis counts optimizer steps (the index of a batch's last one), as with one window per batch
    assert _logged(runs[4], "val/loss") == _logged(runs[1], "val/loss") and len(_logged(runs[1], "val/loss")) == 1
    assert [s for s, _ in _logged(runs[4], "train/loss")] == [3, 7, 11]
    lr_one, lr_four = dict(_logged(runs[1], "lr-Adam")), dict(_logged(runs[4], "lr-Adam"))
    assert lr_four == {s: lr_one[s] for s in (3, 7, 11)} and len(set(lr_four.values())) == 3  # StepLR halved it


@pytest.mark.slow
def test_a_scan_core_generates_what_its_sequential_evaluation_predicts(tmp_path):
    """A minGRU trained by its scan: greedy `bptt generate` equals the argmax of the same weights stepped token by
    token through the core's sequential evaluation."""
    run = tmp_path / "run"
    fit = bptt("fit", *SMALL, *MIN_GRU, "--trainer.default_root_dir", str(run), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = str(run / "checkpoints/last.ckpt")
    greedy = bptt("generate", ckpt, "--prompt", "def ", "--num-tokens", "10", "--temperature", "0", cwd=tmp_path)
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    vocab = Vocabulary.load(run / "vocab.json")
    model = RNNLanguageModel(vocab_size=len(vocab), embedding_size=64,
                             core=partial(MinGRU, hidden_size=32, num_layers=2, evaluation="sequential"))
    assert greedy.stdout == _greedy(model, ckpt, vocab, "def ", 10) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("core", [[], MIN_GRU], ids=["lstm", "min-gru-scan"])
def test_two_ddp_processes_take_the_same_step_as_one(tmp_path, core):
    """Same global batch (4 streams): 1 process with 4 streams vs 2 gloo processes with 2 each; for torch's
    LSTM and for a minGRU core trained by its parallel scan."""
    params = {}
    for devices in (1, 2):
        root = tmp_path / f"ddp{devices}"
        # plain SGD without clipping: its update is proportional to the gradient, so a wrong average shows
        args = [*SMALL, *core, "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--task.grad_clip", "null",
                "--task.optimizer.class_path", "torch.optim.SGD", "--task.optimizer.init_args.lr", "1.0",
                "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
                "--trainer.default_root_dir", str(root)]
        result = bptt("fit", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert devices == 1 or "MEMBER: 2/2" in result.stderr
        params[devices] = torch.load(root / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for name, value in params[1].items():
        torch.testing.assert_close(params[2][name], value, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_shakespeare_config_trains(shakespeare, tmp_path):
    result = bptt("fit", "--config", str(PROJECT / "conf/lm/tinyshakespeare_char.yaml"), "--trainer.max_steps", "3",
                  "--model.hidden_size", "32", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "3",
                  "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()


def test_configs_lists_the_shipped_configs(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "task", "description"]
    quickstart = next(line for line in lines if line.startswith("lm/quickstart "))
    assert quickstart.split()[1] == "LanguageModelTask" and "character-level LSTM" in quickstart


def test_help_configs_and_bad_command_lines_import_no_torch():
    """--help (bptt's and every command's), configs and a bad `runs` line answer without torch, Lightning, Ray or
    MLflow."""
    import subprocess
    import sys

    code = ("import sys\nfrom bptt.cli import COMMANDS, main\n"
            "assert main(['--help']) == 0 and main(['configs']) == 0 and main(['runs', '--bogus']) == 2\n"
            "assert all(main([name, '--help']) == 0 for name in COMMANDS)\n"
            "assert main(['fit', '--config', 'nope']) == 2\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'ray', 'mlflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=PROJECT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]"


def test_bptt_help_is_a_table_of_the_commands(capsys):
    from bptt.cli import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert f"  {name.ljust(10)}  {command.summary}\n" in out
    assert "--trust-config" in out and "--version" in out


@pytest.mark.parametrize("name", ["fit", "resume", "sweep", "runs", "configs", "validate", "test", "generate",
                                  "transcribe", "forecast", "diagnose"])
def test_every_command_has_help_with_examples(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bptt {name} ") and "\nexamples:\n" in out
    assert f"  bptt {name}" in out.split("examples:", 1)[1]


def test_fit_help_names_every_task_datamodule_and_network_the_configs_use(capsys):
    import re

    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    used = {m.rsplit(".", 1)[1] for f in (PROJECT / "conf").rglob("*.yaml")
            for m in re.findall(r"class_path: (bptt\.[\w.]+)", f.read_text())}
    from bptt import datamodules

    shipped = {*datamodules.__all__, "CTCSpeechTask", "ForecastTask", "LanguageModelTask"}
    assert used and {name for name in used | shipped if name not in out} == set()
