import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from nanokimi import checkpoint
from nanokimi.cli import main
from nanokimi.data import load_tokenizer, read_meta
from nanokimi.train import TrainConfig, learning_rate
from tests.conftest import ROOT, TINY, run_cli


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir):
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def cli_error(capsys, *argv):
    """Run the CLI in-process, expect a one-line error and exit code 2; return the message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def train(data, out, *extra):
    main(["train", "shakespeare-char-cpu", f"--data={data}", f"--out_dir={out}", *TINY, *map(str, extra)])


def test_prepare_shakespeare_char(char_data, shakespeare_text):
    meta = read_meta(char_data)
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == 90_000 and meta["val_tokens"] == 10_000
    tok = load_tokenizer(char_data)
    ids = np.concatenate([np.fromfile(char_data / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert tok.decode(ids.tolist()) == shakespeare_text[:100_000]


def test_prepare_bpe(tmp_path, shakespeare_text):
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text[:30_000])
    main(["prepare", "text", f"--input={src}", "--tokenizer=bpe", "--vocab_size=400", f"--out={tmp_path / 'bpe'}"])
    tok = load_tokenizer(tmp_path / "bpe")
    assert (tmp_path / "bpe" / "tokenizer.json").is_file() and tok.vocab_size == 400
    ids = np.fromfile(tmp_path / "bpe" / "train.bin", dtype=np.uint16)
    assert len(ids) < 27_000 * 0.7  # merges compress the text
    assert tok.decode(tok.encode("Wherefore art thou, Romeo?")) == "Wherefore art thou, Romeo?"


def test_prepare_offline_without_input_says_how(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    assert "--input=PATH" in cli_error(capsys, "prepare", "shakespeare_char", f"--out={tmp_path / 'd'}")


def test_train_then_sample_end_to_end(char_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "shakespeare-char-cpu", f"--data={char_data}", f"--out_dir={out}", *TINY,
                     "--max_iters=30", "--eval_interval=15", "--lr=1e-2")
    assert result.returncode == 0, result.stderr
    losses = step_losses(out)
    assert losses[30] < losses[1] - 0.5
    records = metrics(out)
    assert any("val_loss" in r for r in records) and "max_logit" in records[0] and "dead_experts" in records[0]
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = out / "checkpoint"
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "meta.json"} <= {p.name for p in
                                                                                          ckpt.iterdir()}
    assert not any(k.startswith("_orig_mod") for k in safetensors.torch.load_file(ckpt / "model.safetensors"))
    cached = run_cli("sample", out, "--prompt=ROMEO:", "--max_new_tokens=20", "--temperature=0")
    uncached = run_cli("sample", out, "--prompt=ROMEO:", "--max_new_tokens=20", "--temperature=0", "--no_cache")
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.startswith("ROMEO:") and len(cached.stdout) == len("ROMEO:") + 20 + 1  # + final newline
    assert cached.stdout == uncached.stdout
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
    settings = dict(max_time_s=3.0, max_iters=100000, eval_interval=100000, warmup_iters=2, lr_schedule="cosine",
                    lr=1e-2, min_lr=1e-3)
    train(char_data, out, *[f"--{k}={v}" for k, v in settings.items()], "--log_interval=1")
    logs = [r for r in metrics(out) if "loss" in r]
    summary = metrics(out)[-1]["summary"]
    assert summary["status"] == "finished" and summary["step"] == len(logs)
    assert logs[-2]["time"] < 3.0 <= logs[-1]["time"]  # the first step to reach the budget is the last
    cfg = TrainConfig(**settings)  # each step's lr is the schedule's at the training time before it
    assert all(r["lr"] == learning_rate(cfg, r["step"] - 1, before["time"]) for before, r in zip(logs, logs[1:]))
    assert logs[-1]["lr"] < 0.5 * (1e-2 + 1e-3) < logs[2]["lr"]  # and it decayed


def test_sigterm_saves_a_checkpoint_and_exits_0(char_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nanokimi", "train", "shakespeare-char-cpu", f"--data={char_data}",
                             f"--out_dir={out}", *TINY, "--max_iters=100000", "--eval_interval=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(step_losses(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    saved = checkpoint.Checkpoint(out).trainer_state()["step"]
    assert saved >= 3 and "continue with --resume" in stdout


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


def test_finetune_from_checkpoint_on_new_text(char_data, tmp_path, shakespeare_text, capsys):
    pre = tmp_path / "pre"
    train(char_data, pre, "--max_iters=40", "--lr=1e-2", "--eval_interval=40")
    other = tmp_path / "other.txt"
    other.write_text(shakespeare_text[500_000:560_000])
    capsys.readouterr()
    assert "not in this model" in cli_error(capsys, "prepare", "text", f"--input={other}", f"--tokenizer_from={pre}",
                                            f"--out={tmp_path / 'ft_data'}")  # e.g. 'Z' never occurs in the pretraining text
    vocab = set(load_tokenizer(pre / "checkpoint").chars)
    other.write_text("".join(c for c in shakespeare_text[500_000:560_000] if c in vocab))
    main(["prepare", "text", f"--input={other}", f"--tokenizer_from={pre}", f"--out={tmp_path / 'ft_data'}"])
    train(tmp_path / "ft_data", tmp_path / "ft", f"--init_from={pre}", "--max_iters=5", "--lr=1e-3")
    train(tmp_path / "ft_data", tmp_path / "scratch", "--max_iters=1")
    # the finetune starts from the trained weights: far below a fresh model's loss on the same batch
    assert step_losses(tmp_path / "ft")[1] < step_losses(tmp_path / "scratch")[1] - 0.8
    # a dataset with its own tokenizer cannot be finetuned on
    main(["prepare", "text", f"--input={other}", f"--out={tmp_path / 'own_vocab'}"])
    err = cli_error(capsys, "train", "shakespeare-char-cpu", f"--data={tmp_path / 'own_vocab'}",
                    f"--out_dir={tmp_path / 'x'}", f"--init_from={pre}", *TINY[-6:])
    assert "tokenizer" in err


def run_ddp(cfg, model, port):
    """Train `cfg` under torchrun with 2 processes (tests/ddp_worker.py); returns its check of the ranks' weights."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", str(ROOT / "tests" / "ddp_worker.py"), json.dumps(cfg),
                             json.dumps(model)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(cfg["out_dir"]) / "ddp_check.json").read_text())


DDP_MODEL = {k.lstrip("-").split("=")[0]: json.loads(k.split("=")[1]) for k in TINY[:13]}
DDP_TRAIN = {"grad_accum": 2, "batch_size": 4, "block_size": 32, "eval_interval": 100, "eval_iters": 2,
             "log_interval": 1, "progress": False, "lr": 1e-2, "warmup_iters": 2}


def test_ddp_two_processes_agree_and_learn(char_data, tmp_path):
    out = tmp_path / "ddp"
    cfg = {"data": str(char_data), "out_dir": str(out), "max_iters": 12, **DDP_TRAIN}
    check = run_ddp(cfg, DDP_MODEL, 29533)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    ddp = step_losses(out)
    assert ddp[12] < ddp[1] - 0.3
    # one process with the same global batch (grad_accum 2) sees the same batches: same loss scale
    train(char_data, tmp_path / "single", *[f"--{k}={v}" for k, v in cfg.items() if k not in ("data", "out_dir")])
    assert step_losses(tmp_path / "single")[1] == pytest.approx(ddp[1], abs=1e-5)


def test_ddp_time_budget_keeps_ranks_in_step(char_data, tmp_path):
    """Each rank's own clock would end the run (and set the lr) at a different step: they share the slowest one."""
    cfg = {"data": str(char_data), "out_dir": str(tmp_path / "ddp"), "max_iters": 100000, "max_time_s": 2.0,
           **DDP_TRAIN}
    check = run_ddp(cfg, DDP_MODEL, 29534)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    assert metrics(tmp_path / "ddp")[-1]["summary"]["status"] == "finished"


@pytest.mark.parametrize("case", ["missing_data", "empty_input", "short_data", "unknown_dataset", "bad_model_value",
                                  "bad_train_value", "unknown_setting", "unknown_preset", "missing_checkpoint"])
def test_bad_input_gives_one_line_error(case, char_data, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be" * 2)
    train_args = ["train", "shakespeare-char-cpu", f"--data={char_data}", f"--out_dir={tmp_path / 'o'}", *TINY]
    argv, expected = {
        "missing_data": (["train", "shakespeare-char-cpu", f"--data={tmp_path / 'nope'}",
                          f"--out_dir={tmp_path / 'o'}"], "nanokimi prepare"),
        "empty_input": (["prepare", "text", f"--input={empty}", f"--out={tmp_path / 'd'}"], "empty"),
        "unknown_dataset": (["prepare", "wikitext", f"--out={tmp_path / 'd'}"], "unknown dataset"),
        "short_data": (None, "block_size+1"),
        "bad_model_value": (train_args + ["--num_experts_per_tok=99"], "num_experts_per_tok"),
        "bad_train_value": (train_args + ["--lr=-1"], "lr"),
        "unknown_setting": (train_args + ["--n_experts=4"], "n_experts"),
        "unknown_preset": (["train", "gpt-5"], "unknown preset"),
        "missing_checkpoint": (["sample", tmp_path / "nothing"], "no checkpoint"),
    }[case]
    if case == "short_data":
        main(["prepare", "text", f"--input={short}", f"--out={tmp_path / 's'}"])
        argv = ["train", "shakespeare-char-cpu", f"--data={tmp_path / 's'}", f"--out_dir={tmp_path / 'o'}", *TINY]
    assert expected in cli_error(capsys, *argv)


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


def test_no_traceback_from_subprocess(tmp_path):
    result = run_cli("sample", tmp_path / "missing")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_compiled_run_checkpoint_loads_uncompiled(char_data, tmp_path):
    out = tmp_path / "compiled"
    train(char_data, out, "--max_iters=2", "--compile")
    keys = safetensors.torch.load_file(out / "checkpoint" / "model.safetensors")
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    result = run_cli("sample", out, "--prompt=KING", "--max_new_tokens=5")
    assert result.returncode == 0 and result.stdout.startswith("KING"), result.stderr
