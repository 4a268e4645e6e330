"""Data preparation: char-level and BPE datasets, and what happens with bad input."""

import numpy as np

import nanokimi.data
from nanokimi.cli import main
from nanokimi.data import load_tokenizer, read_meta
from tests.conftest import cli_error, disk_full


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


def test_prepare_keeps_everything_else_in_its_folder(tmp_path, shakespeare_text):
    """nanoGPT's layout: the input text lives in the dataset folder; re-preparing keeps it and any other file."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "my.txt").write_text(shakespeare_text[:5000])
    (corpus / "notes.txt").write_text("x")
    (tmp_path / "sibling").mkdir()
    for _ in range(2):
        main(["prepare", "text", f"--input={corpus / 'my.txt'}", f"--out={corpus}"])
    assert (corpus / "my.txt").read_text() == shakespeare_text[:5000] and (corpus / "notes.txt").read_text() == "x"
    assert read_meta(corpus)["train_tokens"] == 4500 and not (corpus / ".prepare.tmp").exists()
    main(["prepare", "text", f"--input={corpus / 'my.txt'}", f"--out={tmp_path}"])  # a parent folder: siblings stay
    assert (tmp_path / "sibling").is_dir() and (corpus / "notes.txt").exists()
    # a BPE dataset replaced by a char one in the same folder: no stale tokenizer.json changes its fingerprint
    main(["prepare", "text", f"--input={corpus / 'my.txt'}", "--tokenizer=bpe", "--vocab_size=300", f"--out={corpus}"])
    main(["prepare", "text", f"--input={corpus / 'my.txt'}", f"--out={corpus}"])
    assert not (corpus / "tokenizer.json").exists() and read_meta(corpus)["tokenizer"] == "char"


def test_prepare_onto_a_full_disk_leaves_the_old_dataset(tmp_path, shakespeare_text, capsys, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text[:5000])
    main(["prepare", "text", f"--input={src}", f"--out={tmp_path / 'd'}"])
    before = (tmp_path / "d" / "train.bin").read_bytes()

    monkeypatch.setattr(nanokimi.data, "write_json", disk_full)
    assert "No space left" in cli_error(capsys, "prepare", "text", f"--input={src}", f"--out={tmp_path / 'd'}")
    assert (tmp_path / "d" / "train.bin").read_bytes() == before and not (tmp_path / "d" / ".prepare.tmp").exists()
