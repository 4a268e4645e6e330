"""Checkpoints: atomic writes that survive a crash, and damaged or refused checkpoints reported in one line."""

import os

import pytest
import safetensors.torch
import torch

from nanokimi import checkpoint
from nanokimi.processes import run_lock as train_lock
from tests.conftest import cli_error, disk_full, step_losses, train, train_args

# beside an absurd --lr, so that the run diverges: no warmup, no gradient clipping, min_lr 0
AT_ONCE = ("--min_lr=0", "--grad_clip=0", "--warmup_iters=0")


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
    err = cli_error(
        capsys,
        "train",
        "x",
        f"--out_dir={out}",
        "--resume",
        "--max_iters=50",
        "--lr=1e12",
        *AT_ONCE,
    )
    assert "loss became" in err and "at step" in err
    assert checkpoint.Checkpoint(out).trainer_state() == good
    # corrupt and truncated files
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert "corrupt or truncated" in cli_error(capsys, "sample", out)
    (out / "checkpoint" / "config.json").write_text("{not json")
    assert "corrupt" in cli_error(capsys, "sample", out)


def test_a_diverging_run_never_saves_non_finite_weights(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=10")
    err = cli_error(
        capsys,
        "train",
        "x",
        f"--out_dir={out}",
        "--resume",
        "--max_iters=200",
        "--lr=1e4",
        *AT_ONCE,
        "--eval_interval=1",
        "--ckpt_interval=1",
    )
    assert "last good checkpoint" in err
    assert checkpoint.Checkpoint(out).trainer_state()["step"] >= 10
    weights = safetensors.torch.load_file(out / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    from nanokimi.hf import from_pretrained

    with torch.no_grad():  # the kept checkpoint computes: finite logits of a real distribution
        probs = from_pretrained(out)(torch.randint(0, 50, (2, 16)))[0].softmax(-1)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2, 16))


def not_writable(*args, **kwargs):
    raise PermissionError(13, "Permission denied")  # what a folder made read-only gives (root writes anyway)


@pytest.mark.parametrize("failure, message", [(disk_full, "No space left"), (not_writable, "Permission denied")])
def test_a_full_disk_or_a_read_only_folder_during_a_save_is_one_line_and_resumable(
    failure, message, char_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=2")
    monkeypatch.setattr(safetensors.torch, "save_file", failure)
    assert message in cli_error(capsys, "train", "x", f"--out_dir={out}", "--resume", "--max_iters=4")
    assert not (out / ".checkpoint.tmp").exists() and checkpoint.Checkpoint(out).trainer_state()["step"] == 2
    monkeypatch.undo()
    train(char_data, out, "--resume", "--max_iters=4")
    assert checkpoint.Checkpoint(out).trainer_state()["step"] == 4


def test_resume_skips_a_metrics_line_cut_by_a_crash(char_data, tmp_path):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    train(char_data, out, "--resume", "--max_iters=4")
    assert sorted(step_losses(out)) == [1, 2, 3, 4]


def test_one_run_per_out_dir(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    with train_lock(out):  # as if another process were training there
        assert "another nanokimi run" in cli_error(capsys, *train_args(char_data, out), "--max_iters=2")
    train(char_data, out, "--max_iters=2")  # released with its holder


def test_export_refuses_to_write_over_a_checkpoint(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=2")
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    for target in (out, out / "checkpoint", out / "checkpoint" / "hf"):
        assert "apart from its source" in cli_error(capsys, "export", out, target)
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before


def test_export_onto_a_full_disk_is_one_line(char_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=2")
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert "No space left" in cli_error(capsys, "export", out, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before  # the source is untouched
