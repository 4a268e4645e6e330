"""Checkpoints: atomic writes that survive a crash, and damaged or refused checkpoints reported in one line."""

import os

import pytest
import safetensors.torch

from nanokimi import checkpoint
from tests.conftest import cli_error, train


def test_checkpoint_survives_crash_mid_save(char_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=2")
    good = (out / "checkpoint" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)  # dies halfway through writing the new one
    with pytest.raises(SystemExit):
        train(char_data, out, "--resume", "--max_iters=4")
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == good
    monkeypatch.undo()

    real_replace, calls = os.replace, []

    def die_between_renames(src, dst):  # killed after checkpoint -> .checkpoint.old, before tmp -> checkpoint
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between renames")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", die_between_renames)
    with pytest.raises(SystemExit):
        train(char_data, out, "--resume", "--max_iters=4")
    monkeypatch.undo()
    assert not (out / "checkpoint").exists()
    recovered = checkpoint.Checkpoint(out)
    assert recovered.path.name == ".checkpoint.old" and recovered.trainer_state()["step"] == 2
    train(char_data, out, "--resume", "--max_iters=4")  # and training goes on from it
    assert checkpoint.Checkpoint(out).trainer_state()["step"] == 4


def test_checkpoint_problems_are_reported_and_nothing_lost(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=3")
    capsys.readouterr()
    assert "not in this model" in cli_error(capsys, "sample", out, "--prompt=日本")
    good = checkpoint.Checkpoint(out).trainer_state()
    # a fresh run into an out_dir that holds a checkpoint: refused, unless --overwrite
    assert "--overwrite replaces it" in cli_error(capsys, "train", "x", f"--out_dir={out}")
    assert checkpoint.Checkpoint(out).trainer_state() == good
    # diverging run (absurd lr): stops with the step, keeps the last good checkpoint
    assert "same optimizer" in cli_error(capsys, "train", "x", f"--out_dir={out}", "--resume", "--optimizer=adamw")
    err = cli_error(capsys, "train", "x", f"--out_dir={out}", "--resume", "--max_iters=50", "--lr=1e12",
                    "--min_lr=0", "--grad_clip=0", "--warmup_iters=0")
    assert "loss became" in err and "at step" in err
    assert checkpoint.Checkpoint(out).trainer_state() == good
    # corrupt and truncated files
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert "corrupt or truncated" in cli_error(capsys, "sample", out)
    (out / "checkpoint" / "config.json").write_text("{not json")
    assert "corrupt" in cli_error(capsys, "sample", out)
