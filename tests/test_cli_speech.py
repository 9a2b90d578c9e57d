"""The `bptt` command on speech, end to end: `bptt fit` of conf/asr/fsdd_digits.yaml on a synthetic
FSDD-layout corpus (each digit a tone pair, so it is learnable in seconds) tracked in a real MLflow
server, then `bptt transcribe` on new audio; bad input ends in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from mlflow.tracking import MlflowClient

from bptt.cli import main
from tests.bptt_command import SMALL, bptt
from tests.conftest import PROJECT
from tests.speech_data import DIGIT_TONES, make_fsdd, tone

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
        "--data.spec_augment", "false", "--model.hidden_size", "128", "--model.dropout", "0", "--task.k1", "40",
        "--task.optimizer.init_args.lr", "0.003", "--trainer.max_steps", "1000", "--trainer.val_check_interval", "500",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root / "run"),
        "--tracking.tracking_uri", mlflow_server, "--tracking.experiment_name", "speech-cli", cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "metrics": json.loads(result.stdout.strip().splitlines()[-1]), "uri": mlflow_server}


@pytest.mark.slow
def test_fit_learns_the_digits_and_tracks_error_rates_and_decodings(speech_run):
    metrics = speech_run["metrics"]
    assert metrics["val/ter"] <= 0.05 and metrics["val/loss"] < 0.1  # 10 tone pairs: CTC leaves its blank plateau
    # after about 500 steps (measured: ter 1.0 at step 500, 0.0 at 1000; 30 s on 2 cores)
    client = MlflowClient(speech_run["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("speech-cli").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ter")] == [499, 999]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_report.json", "decodings", "checkpoints"} <= artifacts
    decodings = sorted(a.path for a in client.list_artifacts(run.info.run_id, "decodings"))
    assert decodings == ["decodings/val-step-0000500.txt", "decodings/val-step-0001000.txt"]
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
def test_transcribe_refuses_a_language_model_checkpoint(tmp_path, capsys):
    result = bptt("fit", *SMALL, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "lm"),
                  "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    wav = _say("1", tmp_path / "one.wav")
    assert main(["transcribe", str(tmp_path / "lm/checkpoints/last.ckpt"), str(wav)]) == 2
    assert "transcribe needs a speech model" in capsys.readouterr().err
