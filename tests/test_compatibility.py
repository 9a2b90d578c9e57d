"""Checkpoints written before a change of the code still load and resume exactly.

``tests/fixtures/lm-step3.ckpt`` was written by ``bptt fit`` (bptt 0.1.0, 2 December 2026: the
quick start shrunk to a 16-unit LSTM on the stdlib's json package, batches of 4 x 16 characters,
a checkpoint every 3 steps), at step 3 of 6; its MLflow run id was cleared, since that run is
in no store here. ``lm-step6-state_dict.pt`` holds the same run's weights after step 6.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.bptt_command import bptt

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_an_old_checkpoint_resumes_to_the_same_weights(tmp_path):
    shutil.copy(FIXTURES / "lm-step3.ckpt", tmp_path / "step3.ckpt")
    result = bptt("resume", str(tmp_path / "step3.ckpt"), "--tracking.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 6
    expected = torch.load(FIXTURES / "lm-step6-state_dict.pt", weights_only=True)
    assert final["state_dict"].keys() == expected.keys()
    # equal on the machine that wrote the fixture; elsewhere float32 GEMMs may sum in another order (an AMD EPYC
    # against the Intel Xeon that wrote it: 3 steps apart by at most 3e-8), so: float32 rounding of 3 steps
    for name, value in expected.items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_an_old_checkpoint_validates(tmp_path):
    result = bptt("validate", str(FIXTURES / "lm-step3.ckpt"), "--trainer.default_root_dir", str(tmp_path / "v"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"val/loss"' in result.stdout.splitlines()[-1]
