"""The `bptt` command on speech, end to end: `bptt fit` of conf/asr/fsdd_digits.yaml on a synthetic
FSDD-layout corpus (each digit a tone pair, so it is learnable in seconds) tracked in a real MLflow
server, then `bptt transcribe` on new audio; bad input ends in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from mlflow.tracking import MlflowClient

from bptt.cli import main
from tests.bptt_command import SMALL, bptt
from tests.conftest import PROJECT
from tests.speech_data import DIGIT_TONES, make_fsdd, make_librispeech, tone

ASR = str(PROJECT / "conf/asr/fsdd_digits.yaml")


def _say(digits: str, path: Path, sample_rate: int = 8000) -> Path:
    """Digits of the first synthetic speaker, 0.25 s each, with 0.1 s of silence around each."""
    gap = np.zeros(int(0.1 * sample_rate), dtype=np.float32)
    parts = [gap]
    for i, d in enumerate(digits):
        parts += [tone(DIGIT_TONES[d], 0.25, sample_rate, seed=99 + i), gap]
    soundfile.write(path, np.concatenate(parts), sample_rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory, mlflow_server) -> dict:
    root = tmp_path_factory.mktemp("speech")
    corpus = make_fsdd(root / "tones", indices=range(14))
    result = bptt(
        "fit", "--config", ASR, "--data.corpus", str(corpus), "--data.utterances", "[256, 32, 32]",
        "--data.digits_per_utterance", "[1, 3]", "--data.batch_size", "8", "--data.eval_batch_size", "32",
        "--data.spec_augment", "false", "--model.hidden_size", "128", "--model.num_layers", "1",
        "--model.subsample", "4",
        "--model.dropout", "0", "--task.k1", "40", "--task.optimizer.init_args.lr", "0.003",
        "--trainer.max_steps", "400",
        "--trainer.val_check_interval", "200",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root / "run"),
        "--tracking.tracking_uri", mlflow_server, "--tracking.experiment_name", "speech-cli", cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "metrics": json.loads(result.stdout.strip().splitlines()[-1]), "uri": mlflow_server}


@pytest.mark.slow
def test_fit_learns_the_digits_and_tracks_error_rates_and_decodings(speech_run):
    metrics = speech_run["metrics"]
    # 10 tone pairs, 6 output frames each (subsample 4: fewer frames per label leave CTC's all-blank plateau
    # sooner). Measured with seeds 0-6: ter 0.0 and loss <= 0.035 by step 300 with every seed, loss <= 0.019
    # at step 400; 400 steps take 18 s of CPU (1 thread)
    assert metrics["val/ter"] <= 0.05 and metrics["val/loss"] < 0.1
    client = MlflowClient(speech_run["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("speech-cli").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ter")] == [199, 399]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_report.json", "decodings", "checkpoints"} <= artifacts
    decodings = sorted(a.path for a in client.list_artifacts(run.info.run_id, "decodings"))
    assert decodings == ["decodings/val-step-0000200.txt", "decodings/val-step-0000400.txt"]
    text = Path(client.download_artifacts(run.info.run_id, decodings[-1], str(speech_run["root"]))).read_text()
    assert text.count("REF: ") == 10 and text.count("HYP: ") == 10


@pytest.mark.slow
def test_transcribe_prints_one_line_per_file(speech_run, capsys):
    root = speech_run["root"]
    files = [_say("31", root / "a.wav"), _say("7", root / "b.wav"), _say("905", root / "c.wav", 16000)]  # c: resampled
    assert main(["transcribe", str(root / "run/checkpoints/last.ckpt"), *map(str, files)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{files[0]}\t31", f"{files[1]}\t7", f"{files[2]}\t905"]


@pytest.mark.slow
def test_transcribe_bad_input_fails_in_one_line(speech_run, tmp_path, capsys):
    checkpoint = str(speech_run["root"] / "run/checkpoints/last.ckpt")
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wave file")
    cases = [
        ([checkpoint], "needs audio files after the checkpoint"),
        ([checkpoint, str(tmp_path / "missing.wav")], "missing.wav"),
        ([checkpoint, str(tmp_path / "noise.wav")], "noise.wav"),
    ]
    for args, message in cases:
        assert main(["transcribe", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bptt: error: ") and message in err[0], err


@pytest.mark.slow
def test_resume_under_other_mel_bins_fails_in_one_line_and_changes_nothing(speech_run, capsys):
    run = speech_run["root"] / "run"
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    client = MlflowClient(speech_run["uri"])
    (tracked,) = client.search_runs([client.get_experiment_by_name("speech-cli").experiment_id])
    more = ["--trainer.max_steps", "800"]  # past the run's 400, so that only n_mels is wrong
    assert main(["resume", str(run / "checkpoints/last.ckpt"), "--data.n_mels", "32", *more]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bptt: error: ") and "set data.n_mels to match the checkpoint" in err[-1], err[-1]
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    (again,) = client.search_runs([client.get_experiment_by_name("speech-cli").experiment_id])
    assert (again.info.run_id, again.info.status, again.info.end_time) == (
        tracked.info.run_id, "FINISHED", tracked.info.end_time)


@pytest.mark.slow
def test_transcribe_refuses_a_language_model_checkpoint(tmp_path, capsys):
    result = bptt("fit", *SMALL, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "lm"),
                  "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    wav = _say("1", tmp_path / "one.wav")
    assert main(["transcribe", str(tmp_path / "lm/checkpoints/last.ckpt"), str(wav)]) == 2
    assert "transcribe needs a speech model" in capsys.readouterr().err


@pytest.mark.slow
def test_librispeech_layout_with_characters_logs_word_error_rate(tmp_path):
    corpus = make_librispeech(tmp_path / "LibriSpeech")
    result = bptt(
        "fit", "--config", ASR, "--data.corpus", str(corpus), "--data.tokens", "chars", "--data.sample_rate", "16000",
        "--data.batch_size", "4", "--data.eval_batch_size", "4", "--model.hidden_size", "16",
        "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"val/loss", "val/ter", "val/wer"} <= set(metrics) and metrics["val/wer"] >= 0
    report = json.loads((tmp_path / "run/data_report.json").read_text())
    assert report["splits"]["train"]["utterances"] == 8 and report["tokens"] == "chars"


@pytest.mark.slow
def test_sigkilled_speech_run_resumes_bit_for_bit(tmp_path):
    """SpecAugment, dropout replayed per window, exact backprop, an epoch boundary at step 16."""
    corpus = make_fsdd(tmp_path / "tones", indices=range(12))
    common = ["--config", ASR, "--data.corpus", str(corpus), "--data.utterances", "[64, 8, 8]",
              "--data.batch_size", "4", "--data.eval_batch_size", "8", "--model.hidden_size", "16",
              "--model.dropout", "0.3", "--task.k1", "20", "--task.backprop", "exact", "--trainer.max_steps", "24",
              "--trainer.val_check_interval", "8", "--trainer.enable_progress_bar", "false",
              "--checkpoint.every_n_steps", "4", "--trainer.deterministic", "true"]
    runs = {}
    for name, armed in (("straight", False), ("killed", True)):
        marker = tmp_path / f"{name}.killed"
        if not armed:
            marker.write_text("disarmed")
        kill = [{"class_path": "tests.kill_switch.KillAt", "init_args": {"step": 13, "marker": str(marker)}}]
        run = tmp_path / name
        result = bptt("fit", *common, "--trust-config", "--trainer.default_root_dir", str(run / "run"),
                      "--trainer.callbacks", json.dumps(kill),
                      "--tracking.tracking_uri", f"sqlite:///{tmp_path}/{name}.db", cwd=tmp_path)
        if armed:
            assert result.returncode == -9, result.stderr[-2000:]
            result = bptt("resume", str(run / "run/checkpoints"), "--trust-config", cwd=tmp_path)  # its KillAt
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = torch.load(run / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in runs["straight"].items():
        assert torch.equal(runs["killed"][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("backprop", ["truncated", "exact"])
def test_two_ddp_processes_take_the_same_ctc_step_as_one(tmp_path, backprop):
    """Same global batch of 8 utterances, windows of 20 frames (gradients accumulated window by window
    without all-reduce, then one all-reduce), SpecAugment on: 1 process vs 2 gloo processes."""
    corpus = make_fsdd(tmp_path / "tones", indices=range(12))
    params = {}
    for devices in (1, 2):
        root = tmp_path / f"ddp{devices}"
        # plain SGD without clipping: its update is proportional to the gradient, so a wrong average shows
        result = bptt(
            "fit", "--config", ASR, "--data.corpus", str(corpus), "--data.utterances", "[32, 8, 8]",
            "--data.batch_size", "8", "--model.hidden_size", "16", "--model.dropout", "0", "--task.k1", "20",
            "--task.backprop", backprop, "--task.grad_clip", "null", "--task.optimizer.class_path", "torch.optim.SGD",
            "--task.optimizer.init_args.lr", "1.0", "--task.lr_scheduler", "null", "--trainer.max_steps", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--tracking.tracking_uri", f"sqlite:///{root}.db", cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert devices == 1 or "MEMBER: 2/2" in result.stderr
        params[devices] = torch.load(root / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for name, value in params[1].items():
        torch.testing.assert_close(params[2][name], value, atol=2e-6, rtol=1e-5, msg=name)
