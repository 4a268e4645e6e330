import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanokimi import KimiConfig
from nanokimi.cli import main
from nanokimi.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
# TinyShakespeare (Karpathy's char-rnn copy, public domain) ships with the tests: a fresh clone runs them whole
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"
NANOKIMI = [sys.executable, "-m", "nanokimi"]  # the command, in a subprocess

# The one tiny model of the tests: trains in seconds. As a KimiConfig (tiny_config) and as CLI flags (TINY).
TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    intermediate_size=64,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=32,
)
TINY_TRAIN = dict(batch_size=4, block_size=32, eval_iters=2, log_interval=1, progress=False, warmup_iters=2)
TINY = [f"--{k}={v}" for k, v in (TINY_MODEL | TINY_TRAIN).items()]


def tiny_config(**kw):
    return KimiConfig(**(TINY_MODEL | dict(vocab_size=50, max_position_embeddings=64) | kw))


@pytest.fixture(scope="session")
def shakespeare_text():
    return SHAKESPEARE.read_text()  # missing: the clone is broken, and the tests that need it fail


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_text):
    """The first 100k characters of TinyShakespeare, prepared char-level."""
    folder = tmp_path_factory.mktemp("data")
    src = folder / "input.txt"
    src.write_text(shakespeare_text[:100_000])
    prepare("shakespeare_char", folder / "sc", inputs=src)
    return folder / "sc"


@pytest.fixture(scope="session")
def made(tmp_path_factory, char_data):
    """A folder holding a tiny training run (run/) and its Hugging Face export (hf/). Tests only read it: one that
    edits copies it first."""
    root = tmp_path_factory.mktemp("made")
    main([*train_args(char_data, root / "run"), "--max_iters=2"])
    assert run_cli("export", root / "run", root / "hf").returncode == 0
    return root


def free_port():
    """A TCP port the OS says is free now, for a torchrun rendezvous (fixed ports collide between tests and runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m nanokimi ARGS` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run(
        [*NANOKIMI, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env or os.environ.copy(),
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Logits of two code paths (cached / uncached decoding, nanoKimi / transformers) differ by float rounding, ~1e-6 here
LOGIT_TOLERANCE = 1e-4


def teacher_forced_logits(model, seq, start, max_context=None):
    """The logits [B, N, vocab] a model gives before each of seq[:, start:] (N tokens), fed the true tokens: one
    forward within the context; past it, each from the window of the max_context tokens before it (as uncached
    sampling crops). `model(idx)` returns logits first (nanoKimi's tuple) or an object with .logits (transformers)."""

    def logits_of(idx):
        out = model(idx)
        return out[0] if isinstance(out, tuple) else out.logits

    with torch.no_grad():
        if max_context is None or seq.shape[1] - 1 <= max_context:
            return logits_of(seq[:, :-1])[:, start - 1 :].float()
        return torch.stack(
            [logits_of(seq[:, max(0, t - max_context) : t])[:, -1] for t in range(start, seq.shape[1])], 1
        ).float()


def assert_greedy(tokens, logits, tol=LOGIT_TOLERANCE):
    """Each of tokens [B, N] is a greedy choice of logits [B, N, vocab] (another path's, teacher-forced on the same
    tokens): its logit within `tol` of its row's best. Two paths may break a near-tie differently, never more: a
    test of decoding never depends on how a CPU rounds a tie, and still fails on a token no path would pick."""
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    gap = logits.max(-1).values - chosen
    assert (gap <= tol).all(), f"token {gap.argmax().item()} not greedy: {gap.max().item():.2e} below the best"


def assert_sampled_greedily(out_dir, prompt, max_new_tokens):
    """`nanokimi sample --temperature=0` of a run, cached and --no_cache, as a user types it, within the model's
    context: each prints the prompt and max_new_tokens greedy tokens (checked against the checkpoint's
    teacher-forced logits) and a newline."""
    from nanokimi.checkpoint import load_model

    model, tokenizer, _ = load_model(out_dir)
    start = len(tokenizer.encode(prompt))
    assert start + max_new_tokens <= model.config.max_position_embeddings  # past it the paths part (test_model.py)
    for extra in ([], ["--no_cache"]):
        result = run_cli(
            "sample", out_dir, f"--prompt={prompt}", f"--max_new_tokens={max_new_tokens}", "--temperature=0", *extra
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(prompt) and result.stdout.endswith("\n"), result.stdout
        seq = torch.tensor([tokenizer.encode(result.stdout[:-1])])
        assert seq.shape[1] == start + max_new_tokens, result.stdout
        assert_greedy(seq[:, start:], teacher_forced_logits(model, seq, start))


def disk_full(*args, **kwargs):
    """Monkeypatched over a write function: the disk fills up during the write."""
    raise OSError(errno.ENOSPC, "No space left on device")


def metrics(out_dir):
    """The records of a run's metrics.jsonl; a last line still being written (no newline yet) is not one."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n")]


def step_losses(out_dir):
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def assert_same_training(out_dir, reference, rel=2e-3):
    """The run in out_dir (under a parallel layout) logged the reference run's losses at every step, to `rel`: the
    layouts part only by float summation order (a missing all-reduce parts them from the first update)."""
    ours, theirs = step_losses(out_dir), step_losses(reference)
    assert ours.keys() == theirs.keys() and len(ours) > 1, (sorted(ours), sorted(theirs))
    assert all(ours[s] == pytest.approx(theirs[s], rel=rel) for s in theirs), (ours, theirs)


def wait_for_steps(proc, out_dir, steps, timeout=120):
    """Wait until the training process `proc` has logged `steps` steps in out_dir (or ended, or timed out)."""
    deadline = time.time() + timeout
    while (
        time.time() < deadline
        and proc.poll() is None
        and not ((Path(out_dir) / "metrics.jsonl").exists() and len(step_losses(out_dir)) >= steps)
    ):
        time.sleep(0.2)


def cli_error(capsys, *argv):
    """Run the CLI in-process, expect a one-line error and exit code 2; return the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def train_args(data, out, preset="shakespeare-char-cpu"):
    """The command line (after `nanokimi`) that trains the tiny model on `data` into `out`; flags may follow."""
    return ["train", preset, f"--data={data}", f"--out_dir={out}", *TINY]


def train(data, out, *extra, preset="shakespeare-char-cpu"):
    """`nanokimi train` of the tiny model, in-process."""
    main([*train_args(data, out, preset), *map(str, extra)])


def readme_lines(marker, page="README.md"):
    """The lines of the first ```bash block after `marker` in `page` (README.md or docs/NAME.md): the commands a
    user copies."""
    readme = (ROOT / page).read_text()
    block = readme[readme.index("```bash\n", readme.index(marker)) + 8 :]
    block = block[: block.index("\n```")]
    assert "../shared" not in block
    return block.splitlines()


def run_as_user(lines, user, tmp_path):
    """Run each line with bash from folder `user`, as a user would (the `nanokimi` console script on PATH, with this
    interpreter, whether installed or not); each must succeed. Returns their outputs."""
    nanokimi = tmp_path / "bin" / "nanokimi"
    nanokimi.parent.mkdir(exist_ok=True)
    nanokimi.write_text(f'#!/bin/sh\nexec {sys.executable} -m nanokimi "$@"\n')
    nanokimi.chmod(0o755)
    env = os.environ | {"PATH": f"{nanokimi.parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    outputs = []
    for line in lines:
        result = subprocess.run(["bash", "-c", line], cwd=user, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (line, result.stderr[-2000:])
        outputs.append(result.stdout)
    return outputs


# A fresh clone on a CPU machine runs every test: a skip fails the session unless its reason is one of these
STATED_SKIPS = ("needs a GPU", "needs a browser")
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report)))


def pytest_sessionfinish(session, exitstatus):
    unstated = [(node, reason) for node, reason in _skipped if not any(s in reason for s in STATED_SKIPS)]
    if unstated and exitstatus == 0:
        session.exitstatus = 1
        print(
            f"\n{len(unstated)} tests skipped for a reason not in tests/conftest.py's STATED_SKIPS (a missing "
            f"install step or file?):\n" + "\n".join(f"  {node}: {reason}" for node, reason in unstated[:20])
        )
