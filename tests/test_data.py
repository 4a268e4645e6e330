"""Data preparation: char-level and BPE datasets, and what happens with bad input."""

import numpy as np

from nanokimi.cli import main
from nanokimi.data import load_tokenizer, read_meta
from tests.conftest import cli_error


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
