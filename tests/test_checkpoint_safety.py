"""No lost checkpoints: a training process killed while it writes a checkpoint leaves the previous one intact.

The Hugging Face Trainer writes `checkpoint-N` in place (no temporary folder and rename), so a kill mid-save
leaves a partial `checkpoint-N` behind; `trainer_state.json` is the last file it writes. The test kills
train/sft.py inside that window, then loads the previous checkpoint and resumes training from it.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import SFT, args_for, workdir  # noqa: F401 - workdir is a fixture
from transformers import AutoModelForImageTextToText
from transformers.trainer_utils import get_last_checkpoint

from florence_vl.train import sft

STATE = "trainer_state.json"  # written last: a checkpoint folder without it was cut short
SAVE_EVERY, MAX_STEPS = 2, 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_command(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, SFT, *args_for(workdir, out, "pretrain", "--max_steps", str(MAX_STEPS),
                                           "--save_strategy", "steps", "--save_steps", str(SAVE_EVERY),
                                           "--dataloader_num_workers", "0", *extra)]


def complete_checkpoints(out: Path) -> list[Path]:
    folders = [path for path in out.glob("checkpoint-*") if (path / STATE).exists()]
    return sorted(folders, key=lambda path: int(path.name.split("-")[1]))


def kill_during_a_save(workdir: Path, out: Path, timeout_s: float = 240) -> Path | None:
    """Start training; SIGKILL it as soon as a checkpoint after the first is being written. The partial folder."""
    process = subprocess.Popen(train_command(workdir, out), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and process.poll() is None:
            for step in range(2 * SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY):
                folder = out / f"checkpoint-{step}"
                if folder.is_dir() and not (folder / STATE).exists():
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return folder if not (folder / STATE).exists() else None
            time.sleep(0.001)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return None


def test_kill_mid_save_keeps_the_previous_checkpoint_loadable_and_resumable(workdir, tmp_path):
    partial = None
    for attempt in range(3):  # the save window is short; a kill that lands just after it is retried
        out = tmp_path / f"run{attempt}"
        partial = kill_during_a_save(workdir, out)
        if partial is not None:
            break
    assert partial is not None, "could not kill the run while it was writing a checkpoint"
    previous = complete_checkpoints(out)[-1]
    assert int(previous.name.split("-")[1]) == int(partial.name.split("-")[1]) - SAVE_EVERY

    model = AutoModelForImageTextToText.from_pretrained(previous, trust_remote_code=True)
    saved = load_file(previous / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(saved[name], state[name]) for name in saved), "previous checkpoint loads differently"

    # transformers' auto-detection would pick the partial folder; `--resume_from_checkpoint true` skips it
    assert get_last_checkpoint(str(out)) == str(partial)
    resumed = subprocess.run(train_command(workdir, out, "--resume_from_checkpoint", "true"), env=ENV, check=True,
                             capture_output=True, text=True, timeout=300)
    assert f"Resuming from {previous}." in resumed.stdout
    assert (out / f"checkpoint-{MAX_STEPS}" / STATE).exists()

    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(train_command(workdir, uninterrupted), env=ENV, check=True, capture_output=True, timeout=300)
    final, reference = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert max((final[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()  # partial: no trainer_state.json
    with pytest.raises(ValueError, match=r"no complete checkpoint-N folder .* in '.*'"):
        sft.resume_checkpoint("true", str(tmp_path))
    assert sft.resume_checkpoint(None, str(tmp_path)) is None
    assert sft.resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path)) == str(tmp_path / "checkpoint-4")
