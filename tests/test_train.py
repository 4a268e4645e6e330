"""The training loop end to end: train, sample, resume, time budget, stop signals, finetune, compile."""

import dataclasses
import signal
import subprocess

import numpy as np
import pytest
import safetensors.torch

from nanokimi import checkpoint
from nanokimi.cli import main
from nanokimi.config import TrainConfig
from nanokimi.tokenizer import load_tokenizer
from nanokimi.train import learning_rate
from tests.conftest import (
    NANOKIMI,
    TINY,
    assert_sampled_greedily,
    cli_error,
    metrics,
    readme_lines,
    run_as_user,
    run_cli,
    step_losses,
    train,
    train_args,
    wait_for_steps,
)


@pytest.mark.slow
def test_train_then_sample_end_to_end(char_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        *train_args(char_data, out),
        "--max_iters=30",
        "--eval_interval=15",
        "--lr=1e-2",
    )
    assert result.returncode == 0, result.stderr
    losses = step_losses(out)
    assert losses[30] < losses[1] - 0.5
    records = metrics(out)
    assert any("val_loss" in r for r in records) and "max_logit" in records[0] and "dead_experts" in records[0]
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = out / "checkpoint"
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "meta.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert not any(k.startswith("_orig_mod") for k in safetensors.torch.load_file(ckpt / "model.safetensors"))
    assert_sampled_greedily(out, "ROMEO:", 20)
    two = run_cli("sample", out, "--max_new_tokens=30", "--num_samples=2", "--seed=3", "--top_p=0.9")
    first, second = two.stdout.split("-" * 40)
    assert first.strip() != second.strip()


def test_resume_is_bitwise_identical(char_data, tmp_path):
    common = ["--eval_interval=4", "--dropout=0.1", "--grad_accum=2"]
    train(char_data, tmp_path / "full", "--max_iters=12", *common)
    train(char_data, tmp_path / "split", "--max_iters=6", "--lr_decay_iters=12", *common)
    assert checkpoint.Checkpoint(tmp_path / "split").trainer_state()["step"] == 6
    train(char_data, tmp_path / "split", "--resume", "--max_iters=12")
    full, split = step_losses(tmp_path / "full"), step_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    assert all(full[s] == split[s] for s in range(1, 13)), (full, split)  # bitwise: exact float equality


def test_bf16_autocast_on_cpu_tracks_fp32(char_data, tmp_path):
    train(char_data, tmp_path / "fp32", "--max_iters=30", "--dtype=float32")
    train(char_data, tmp_path / "bf16", "--max_iters=30", "--dtype=bfloat16")
    fp32, bf16 = step_losses(tmp_path / "fp32"), step_losses(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() and fp32 != bf16  # the same steps, computed in another precision
    assert max(abs(fp32[s] - bf16[s]) for s in fp32) < 0.05  # bf16 rounding, not another trajectory
    assert bf16[30] < bf16[1] - 0.3


def test_resume_after_overwrite_and_settings_are_not_saved(char_data, tmp_path):
    """What `make demo` does: a run started with --overwrite, then continued with --resume as it advises."""
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=2")
    train(char_data, out, "--max_iters=3", "--overwrite", "--eval_interval=2")
    saved = checkpoint.Checkpoint(out).train_config
    assert not {"resume", "overwrite", "init_from"} & saved.keys() and saved["eval_interval"] == 2
    train(char_data, out, "--resume", "--max_iters=5")
    assert checkpoint.Checkpoint(out).trainer_state()["step"] == 5
    assert checkpoint.Checkpoint(out).train_config["eval_interval"] == 2  # the saved run's settings carried on


def test_time_budget_schedule():
    cosine = TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=1000, max_time_s=10.0, lr_schedule="cosine")
    assert learning_rate(cosine, 5, elapsed=5.0) == pytest.approx(0.5)  # half the time used: half-way down
    assert learning_rate(cosine, 5, elapsed=10.0) == pytest.approx(0.0)
    assert learning_rate(cosine, 500, elapsed=1.0) == pytest.approx(0.5)  # the steps are further along: they count
    wsd = dataclasses.replace(cosine, lr_schedule="wsd", decay_frac=0.3)
    assert learning_rate(wsd, 5, elapsed=6.9) == 1.0  # stable until the last 30% of the time
    assert learning_rate(wsd, 5, elapsed=8.5) == pytest.approx(0.5)
    untimed = dataclasses.replace(cosine, max_time_s=0.0)
    assert learning_rate(untimed, 5, elapsed=5.0) == learning_rate(untimed, 5)  # no budget: time plays no part


def test_time_budget_ends_the_run_with_its_schedule(char_data, tmp_path):
    out = tmp_path / "timed"
    settings = dict(
        max_time_s=3.0,
        max_iters=100000,
        eval_interval=100000,
        warmup_iters=2,
        lr_schedule="cosine",
        lr=1e-2,
        min_lr=1e-3,
    )
    train(char_data, out, *[f"--{k}={v}" for k, v in settings.items()], "--log_interval=1")
    logs = [r for r in metrics(out) if "loss" in r]
    summary = metrics(out)[-1]["summary"]
    assert summary["status"] == "finished" and summary["step"] == len(logs)
    assert logs[-2]["time"] < 3.0 <= logs[-1]["time"]  # the first step to reach the budget is the last
    cfg = TrainConfig(**settings)  # each step's lr is the schedule's at the training time before it
    assert all(r["lr"] == learning_rate(cfg, r["step"] - 1, before["time"]) for before, r in zip(logs, logs[1:]))
    assert logs[-1]["lr"] < 0.5 * (1e-2 + 1e-3) < logs[2]["lr"]  # and it decayed


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_finished_run_extended_follows_the_new_lengths_schedule(schedule, char_data, tmp_path):
    """docs/training.md: resumed with a larger --max_iters, the lr at step s is the new horizon's schedule at s."""
    settings = dict(lr=1e-2, min_lr=1e-3, warmup_iters=2, lr_schedule=schedule, eval_interval=100)
    flags = [f"--{k}={v}" for k, v in settings.items()]
    train(char_data, tmp_path / "run", *flags, "--max_iters=10")
    train(char_data, tmp_path / "run", *flags, "--max_iters=20", "--resume")
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "run") if "lr" in r}
    short, long = TrainConfig(**settings, max_iters=10), TrainConfig(**settings, max_iters=20)
    assert all(lrs[s] == pytest.approx(learning_rate(short, s - 1)) for s in range(1, 11))
    assert all(lrs[s] == pytest.approx(learning_rate(long, s - 1)) for s in range(11, 21))
    assert lrs[11] > lrs[10]  # back up: WSD to its peak, cosine to the longer curve


def test_sigterm_saves_a_checkpoint_and_exits_0(char_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *NANOKIMI,
            *train_args(char_data, out),
            "--max_iters=100000",
            "--eval_interval=100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    saved = checkpoint.Checkpoint(out).trainer_state()["step"]
    assert saved >= 3 and "continue with --resume" in stdout


def test_finetune_from_checkpoint_on_new_text(char_data, tmp_path, shakespeare_text, capsys):
    pre = tmp_path / "pre"
    train(char_data, pre, "--max_iters=40", "--lr=1e-2", "--eval_interval=40")
    other = tmp_path / "other.txt"
    other.write_text(shakespeare_text[500_000:560_000])
    capsys.readouterr()
    assert "--drop_unknown" in cli_error(
        capsys, "prepare", "text", f"--input={other}", f"--tokenizer_from={pre}", f"--out={tmp_path / 'ft_data'}"
    )  # e.g. 'Z' is not in the pretraining text
    main(
        [
            "prepare",
            "text",
            f"--input={other}",
            f"--tokenizer_from={pre}",
            f"--out={tmp_path / 'ft_data'}",
            "--drop_unknown",
        ]
    )
    vocab = set(load_tokenizer(pre / "checkpoint").chars)
    kept = "".join(c for c in other.read_text() if c in vocab)
    assert (
        load_tokenizer(tmp_path / "ft_data").decode(
            np.concatenate(
                [np.fromfile(tmp_path / "ft_data" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")]
            ).tolist()
        )
        == kept
    )  # the text minus the unknown characters, in the checkpoint's vocabulary
    train(tmp_path / "ft_data", tmp_path / "ft", f"--init_from={pre}", "--max_iters=5", "--lr=1e-3")
    train(tmp_path / "ft_data", tmp_path / "scratch", "--max_iters=1")
    # the finetune starts from the trained weights: far below a fresh model's loss on the same batch
    assert step_losses(tmp_path / "ft")[1] < step_losses(tmp_path / "scratch")[1] - 0.8
    # a dataset with its own tokenizer cannot be finetuned on
    main(["prepare", "text", f"--input={other}", f"--out={tmp_path / 'own_vocab'}"])
    err = cli_error(
        capsys,
        "train",
        "shakespeare-char-cpu",
        f"--data={tmp_path / 'own_vocab'}",
        f"--out_dir={tmp_path / 'x'}",
        f"--init_from={pre}",
        *TINY[-6:],
    )
    assert "tokenizer" in err


@pytest.mark.slow
def test_compiled_run_checkpoint_loads_uncompiled(char_data, tmp_path):
    out = tmp_path / "compiled"
    train(char_data, out, "--max_iters=2", "--compile")
    keys = safetensors.torch.load_file(out / "checkpoint" / "model.safetensors")
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    result = run_cli("sample", out, "--prompt=KING", "--max_new_tokens=5")
    assert result.returncode == 0 and result.stdout.startswith("KING"), result.stderr


@pytest.mark.slow
def test_readme_finetuning_recipe_runs_as_written(tmp_path, shakespeare_text):
    """docs/training.md's finetuning lines, run by bash as written from an empty folder outside the repository (named
    runs ship inside the package), TinyShakespeare placed where `prepare shakespeare_char` downloads it."""
    lines = readme_lines("Finetuning example", "docs/training.md")
    assert len(lines) == 6
    user = tmp_path / "user"
    (user / "data" / "shakespeare_char").mkdir(parents=True)
    (user / "data" / "shakespeare_char" / "input.txt").write_text(shakespeare_text)  # instead of the download
    outputs = run_as_user(lines, user, tmp_path)
    assert "dropped" in outputs[4]
    finetuned = metrics(user / "out" / "finetune")
    assert finetuned[-1]["summary"]["status"] == "finished" and finetuned[-1]["summary"]["val_loss"] < 3.0
