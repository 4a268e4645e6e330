"""`nanokimi eval`: loss on fixed windows, equal to a cross-entropy computed by hand; bits per byte; bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanokimi.checkpoint import load_model
from nanokimi.cli import main
from nanokimi.tokenizer import load_tokenizer
from tests.conftest import TINY_TRAIN, cli_error, train


@pytest.fixture(scope="module")
def tiny_runs(char_data, tmp_path_factory):
    """A trained tiny nanoKimi and a tiny baseline, 20 steps each."""
    root = tmp_path_factory.mktemp("eval")
    train(char_data, root / "kimi", "--max_iters=20")
    main(
        [
            "train",
            "gpt-shakespeare-char-cpu",
            f"--data={char_data}",
            f"--out_dir={root / 'gpt'}",
            "--max_iters=20",
            "--n_layer=1",
            "--n_embd=32",
            "--n_head=2",
            *(f"--{k}={v}" for k, v in TINY_TRAIN.items()),
        ]
    )
    return root


def eval_json(capsys, *argv):
    capsys.readouterr()
    main(["eval", *map(str, argv)])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("run", ["kimi", "gpt"])
def test_eval_equals_a_direct_cross_entropy(run, tiny_runs, char_data, capsys):
    result = eval_json(
        capsys, tiny_runs / run, f"--data={char_data}", "--block_size=16", "--batches=3", "--batch_size=5"
    )
    # the same 15 windows, spread evenly over val.bin, read and scored here without nanokimi's evaluator
    val = np.fromfile(char_data / "val.bin", dtype=np.uint16).astype(np.int64)
    starts = np.linspace(0, len(val) - 17, 15).round().astype(int)
    x = torch.tensor(np.stack([val[s : s + 16] for s in starts]))
    y = torch.tensor(np.stack([val[s + 1 : s + 17] for s in starts]))
    model, _, _ = load_model(tiny_runs / run)
    with torch.no_grad():
        expected = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == 15 * 16 and result["windows"] == 15 and result["split"] == "val"
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["bits_per_token"] == pytest.approx(expected / math.log(2), rel=1e-5)
    # every TinyShakespeare character is one UTF-8 byte
    assert result["bits_per_byte"] == pytest.approx(result["bits_per_token"])


def test_eval_defaults_to_the_training_window_and_scores_train_split(tiny_runs, char_data, capsys):
    default = eval_json(capsys, tiny_runs / "kimi", f"--data={char_data}", "--batches=2")
    assert default["block_size"] == 32  # the tiny runs' --block_size
    train_split = eval_json(capsys, tiny_runs / "kimi", f"--data={char_data}", "--batches=2", "--split=train")
    assert train_split["loss"] != default["loss"]


def test_bpe_token_bytes_add_up_to_the_text(tmp_path, shakespeare_text):
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text[:20_000] + " naïve café ünïcode")
    main(["prepare", "text", f"--input={src}", "--tokenizer=bpe", "--vocab_size=300", f"--out={tmp_path / 'bpe'}"])
    tok = load_tokenizer(tmp_path / "bpe")
    ids = np.fromfile(tmp_path / "bpe" / "val.bin", dtype=np.uint16).tolist()
    sizes = tok.token_bytes()
    assert sum(sizes[i] for i in ids) == len(tok.decode(ids).encode())


@pytest.mark.parametrize("case", ["missing data", "block over context", "other tokenizer", "bad split", "no batches"])
def test_eval_bad_input_is_one_line(case, tiny_runs, char_data, tmp_path, capsys):
    ckpt = tiny_runs / "kimi"
    if case == "missing data":
        assert "nanokimi prepare" in cli_error(capsys, "eval", ckpt, f"--data={tmp_path / 'none'}")
    elif case == "block over context":
        assert "context" in cli_error(capsys, "eval", ckpt, f"--data={char_data}", "--block_size=33")
    elif case == "other tokenizer":
        src = tmp_path / "other.txt"
        src.write_text("abc " * 2000)
        main(["prepare", "text", f"--input={src}", f"--out={tmp_path / 'other'}"])
        assert "--tokenizer_from" in cli_error(capsys, "eval", ckpt, f"--data={tmp_path / 'other'}")
    elif case == "bad split":
        assert "use val or train" in cli_error(capsys, "eval", ckpt, f"--data={char_data}", "--split=test")
    else:
        assert "--batches" in cli_error(capsys, "eval", ckpt, f"--data={char_data}", "--batches=0")
