import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokimi import KimiConfig
from nanokimi.data import prepare

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# A model small enough for CLI tests to train in seconds (model and training fields, as CLI overrides).
TINY = ["--hidden_size=32", "--num_hidden_layers=2", "--num_attention_heads=2", "--q_lora_rank=24",
        "--kv_lora_rank=16", "--qk_nope_head_dim=8", "--qk_rope_head_dim=8", "--v_head_dim=8",
        "--intermediate_size=64", "--moe_intermediate_size=32", "--n_routed_experts=4", "--num_experts_per_tok=2",
        "--max_position_embeddings=32", "--batch_size=4", "--block_size=32", "--eval_iters=2", "--log_interval=1",
        "--progress=false", "--warmup_iters=2"]


def tiny_config(**kw):
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                first_k_dense_replace=1, max_position_embeddings=64)
    return KimiConfig(**(base | kw))


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
    prepare("shakespeare_char", folder / "sc", input=src)
    return folder / "sc"


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m nanokimi ARGS` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "nanokimi", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env or os.environ.copy())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
