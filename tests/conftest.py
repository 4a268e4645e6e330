import errno
import json
import os
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
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# The one tiny model of the tests: trains in seconds. As a KimiConfig (tiny_config) and as CLI flags (TINY).
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=32,
                  n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
TINY_TRAIN = dict(batch_size=4, block_size=32, eval_iters=2, log_interval=1, progress=False, warmup_iters=2)
TINY = [f"--{k}={v}" for k, v in (TINY_MODEL | TINY_TRAIN).items()]


def tiny_config(**kw):
    return KimiConfig(**(TINY_MODEL | dict(vocab_size=50, max_position_embeddings=64) | kw))


@pytest.fixture(scope="session")
def shakespeare_text():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE.read_text()


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
    main(["train", "shakespeare-char-cpu", f"--data={char_data}", f"--out_dir={root / 'run'}", *TINY,
          "--max_iters=2"])
    assert run_cli("export", root / "run", root / "hf").returncode == 0
    return root


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m nanokimi ARGS` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "nanokimi", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env or os.environ.copy())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def disk_full(*args, **kwargs):
    """Monkeypatched over a write function: the disk fills up during the write."""
    raise OSError(errno.ENOSPC, "No space left on device")


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir):
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def wait_for_steps(proc, out_dir, steps, timeout=120):
    """Wait until the training process `proc` has logged `steps` steps in out_dir (or ended, or timed out)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (
            (Path(out_dir) / "metrics.jsonl").exists() and len(step_losses(out_dir)) >= steps):
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


def train(data, out, *extra, preset="shakespeare-char-cpu"):
    """`nanokimi train` of the tiny model, in-process."""
    main(["train", preset, f"--data={data}", f"--out_dir={out}", *TINY, *map(str, extra)])


def readme_lines(marker, page="README.md"):
    """The lines of the first ```bash block after `marker` in `page` (README.md or docs/NAME.md): the commands a
    user copies."""
    readme = (ROOT / page).read_text()
    block = readme[readme.index("```bash\n", readme.index(marker)) + 8:]
    block = block[:block.index("\n```")]
    assert "../shared" not in block
    return block.splitlines()


def run_as_user(lines, user, tmp_path):
    """Run each line with bash from folder `user`, as a user would (the `nanokimi` console script on PATH, with this
    interpreter, whether installed or not); each must succeed. Returns their outputs."""
    nanokimi = tmp_path / "bin" / "nanokimi"
    nanokimi.parent.mkdir(exist_ok=True)
    nanokimi.write_text(f"#!/bin/sh\nexec {sys.executable} -m nanokimi \"$@\"\n")
    nanokimi.chmod(0o755)
    env = os.environ | {"PATH": f"{nanokimi.parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    outputs = []
    for line in lines:
        result = subprocess.run(["bash", "-c", line], cwd=user, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (line, result.stderr[-2000:])
        outputs.append(result.stdout)
    return outputs

