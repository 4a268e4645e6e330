"""Data preparation: char-level and BPE datasets, and what happens with bad input."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import nanokimi.corpus
import nanokimi.output_folders
import nanokimi.prepare
import nanokimi.prepared
import nanokimi.tokenizer
from nanokimi.cli import main
from nanokimi.tokenizer import load_tokenizer, read_meta
from tests.conftest import cli_error, disk_full, metrics, readme_lines, run_as_user, train


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

    monkeypatch.setattr(nanokimi.prepared, "write_json", disk_full)
    assert "No space left" in cli_error(capsys, "prepare", "text", f"--input={src}", f"--out={tmp_path / 'd'}")
    assert (tmp_path / "d" / "train.bin").read_bytes() == before and not (tmp_path / "d" / ".prepare.tmp").exists()


# Corpora of many documents: folders, globs, JSON Lines (.gz), Parquet, separators; a boundary between documents.


def documents_of(shakespeare_text, n=300):
    """n documents: TinyShakespeare's speeches (blank-line separated), some with non-ASCII text."""
    speeches = [s for s in shakespeare_text.split("\n\n") if s.strip()][:n]
    return [s + (" — naïve café" if i % 7 == 0 else "") for i, s in enumerate(speeches)]


def write_corpus(folder, docs):
    """docs spread over a .jsonl, a .jsonl.gz in a subfolder, a .parquet and a .txt with separators."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "sub").mkdir(parents=True)
    q = len(docs) // 4
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs[:q])))
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n\n" for d in docs[q : 2 * q])  # blank lines are skipped
    pq.write_table(
        pa.table({"text": docs[2 * q : 3 * q], "n": list(range(q))}), folder / "c.parquet", row_group_size=17
    )
    (folder / "d.txt").write_text(SEP.join(docs[3 * q :]) + SEP)
    (folder / "notes.csv").write_text("not read")  # a folder keeps only the formats it knows
    return docs[:q] + docs[2 * q : 3 * q] + docs[3 * q :] + docs[q : 2 * q]  # the order they are read: sorted by path


SEP = "<|endoftext|>"


def split_documents(folder, tok, meta):
    """Each split's documents, decoded: its token stream cut at the boundary tokens."""
    result = {}
    for split in ("train", "val"):
        ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
        assert ids.max() < meta["vocab_size"]
        parts = np.split(ids, np.flatnonzero(ids == meta["boundary_token_id"]))
        result[split] = [tok.decode(parts[0].tolist())] + [tok.decode(p[1:].tolist()) for p in parts[1:]]
    return result


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_folder_of_formats_gives_every_document_once(tokenizer, tmp_path, shakespeare_text):
    docs = write_corpus(tmp_path / "corpus", documents_of(shakespeare_text))
    out = tmp_path / "d"
    main(
        [
            "prepare",
            "text",
            f"--input={tmp_path / 'corpus'}",
            f"--doc_separator={SEP}",
            f"--tokenizer={tokenizer}",
            *(["--vocab_size=600"] if tokenizer == "bpe" else []),
            f"--out={out}",
        ]
    )
    meta, tok = read_meta(out), load_tokenizer(out)
    assert meta["train_documents"] + meta["val_documents"] == len(docs) and meta["val_documents"] == len(docs) // 10
    found = split_documents(out, tok, meta)
    assert sorted(found["train"] + found["val"]) == sorted(docs)  # every document exactly once, none cut
    assert found["val"] == docs[9::10]  # val: every tenth document, whole, the same at every run
    assert meta["train_tokens"] == len(np.fromfile(out / "train.bin", dtype=meta["dtype"]))


def test_a_given_tokenizer_json_gives_its_own_ids(tmp_path, shakespeare_text):
    """Any HF tokenizers file, used as it is: here a WordPiece one (no byte-level), built like a user's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    docs = documents_of(shakespeare_text, 200)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=700, special_tokens=["[UNK]", "[SEP]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "d"
    main(
        [
            "prepare",
            "text",
            f"--input={tmp_path / 'in' / '*.jsonl'}",
            f"--tokenizer={tmp_path / 'tokenizer.json'}",
            "--text_field=body",
            f"--out={out}",
        ]
    )
    meta = read_meta(out)
    assert meta["boundary_token_id"] == tok.token_to_id("[SEP]")  # found among its special tokens
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    expected = []
    for i, d in enumerate(d for j, d in enumerate(docs) if j % 10 != 9):
        expected += ([meta["boundary_token_id"]] if i else []) + tok.encode(d, add_special_tokens=False).ids
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == expected
    # ... and travels byte for byte into the checkpoint trained on it and the Hugging Face export of that
    train(out, tmp_path / "run", "--max_iters=1")
    main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    for copy in (tmp_path / "run" / "checkpoint" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json"):
        assert copy.read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


def test_a_long_document_is_encoded_in_pieces_exactly(tmp_path, shakespeare_text, monkeypatch):
    src = tmp_path / "one.txt"
    src.write_text(shakespeare_text[:60_000])
    main(["prepare", "text", f"--input={src}", "--tokenizer=bpe", "--vocab_size=500", f"--out={tmp_path / 'whole'}"])
    monkeypatch.setattr(nanokimi.corpus, "PIECE_BYTES", 2000)  # ~30 pieces
    main(
        [
            "prepare",
            "text",
            f"--input={src}",
            f"--tokenizer={tmp_path / 'whole' / 'tokenizer.json'}",
            f"--out={tmp_path / 'pieces'}",
        ]
    )
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "whole" / split).read_bytes() == (tmp_path / "pieces" / split).read_bytes()
    assert read_meta(tmp_path / "pieces")["train_documents"] == 1 and "boundary_token_id" not in read_meta(
        tmp_path / "pieces"
    )


def test_bpe_learns_from_a_bounded_sample(tmp_path, shakespeare_text, monkeypatch):
    docs = documents_of(shakespeare_text, 400)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seen = []
    train = nanokimi.tokenizer.HFTokenizer.train
    monkeypatch.setattr(
        nanokimi.tokenizer.HFTokenizer,
        "train",
        classmethod(lambda cls, texts, *a: train((seen.append(t) or t for t in texts), *a)),
    )
    for out in ("d1", "d2"):
        main(
            [
                "prepare",
                "text",
                f"--input={tmp_path / 'docs.jsonl'}",
                "--tokenizer=bpe",
                "--vocab_size=300",
                "--tokenizer_chars=20000",
                f"--out={tmp_path / out}",
            ]
        )
    assert 5_000 < sum(map(len, seen)) / 2 <= 20_000 + 200  # about the budget, each document at most 1% of it
    assert max(map(len, seen)) <= 200 and set(seen) <= set(d[:200] for d in docs)
    assert {d[:200] for d in docs[-100:]} & set(seen)  # drawn from the whole corpus, not only its start
    assert (tmp_path / "d1" / "tokenizer.json").read_bytes() == (tmp_path / "d2" / "tokenizer.json").read_bytes()
    assert read_meta(tmp_path / "d1")["train_documents"] == 360  # the whole corpus is tokenized


def test_val_input_and_few_documents(tmp_path, shakespeare_text):
    docs = documents_of(shakespeare_text, 20)
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i:02}.txt").write_text(d)
    main(
        [
            "prepare",
            "text",
            f"--input={tmp_path}/doc0*.txt",
            f"--val_input={tmp_path}/doc1*.txt",
            f"--out={tmp_path / 'd'}",
        ]
    )
    meta = read_meta(tmp_path / "d")
    assert (meta["train_documents"], meta["val_documents"]) == (10, 10)
    assert split_documents(tmp_path / "d", load_tokenizer(tmp_path / "d"), meta)["val"] == docs[10:]
    main(["prepare", "text", f"--input={tmp_path}/doc0[0-2].txt", f"--out={tmp_path / 'three'}"])  # < 1/val_fraction
    meta = read_meta(tmp_path / "three")
    assert split_documents(tmp_path / "three", load_tokenizer(tmp_path / "three"), meta) == {
        "train": docs[:2],
        "val": docs[2:3],
    }


def test_hf_datasets_reader_on_local_files(tmp_path, shakespeare_text, capsys):
    pytest.importorskip("datasets")
    docs = documents_of(shakespeare_text, 50)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    main(["prepare", "hf", "--dataset=json", f"--input={tmp_path / 'docs.jsonl'}", f"--out={tmp_path / 'hf'}"])
    main(["prepare", "text", f"--input={tmp_path / 'docs.jsonl'}", f"--out={tmp_path / 'local'}"])
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{oops\n")  # datasets fails as it streams
    err = cli_error(
        capsys, "prepare", "hf", "--dataset=json", f"--input={tmp_path / 'bad.jsonl'}", f"--out={tmp_path / 'bad'}"
    )
    assert "dataset json cannot be read" in err and "JSON parse error" in err


def test_ctrl_c_while_preparing_leaves_the_old_dataset(tmp_path, shakespeare_text, capsys, monkeypatch):
    docs = documents_of(shakespeare_text, 100)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    main(["prepare", "text", f"--input={tmp_path / 'docs.jsonl'}", f"--out={tmp_path / 'd'}"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}

    def interrupted(self, texts, drop_unknown=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(nanokimi.tokenizer.CharTokenizer, "encode_batch", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "text", f"--input={tmp_path / 'docs.jsonl'}", f"--out={tmp_path / 'd'}"])
    assert exit_info.value.code == 130
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before


def bad(tmp_path, case):
    """A corpus with one problem; returns (prepare's extra arguments, words the one-line error must hold)."""
    good = json.dumps({"text": "fine"}) + "\n"
    f = tmp_path / "in.jsonl"
    if case == "missing field":
        f.write_text(good * 3 + json.dumps({"body": "x"}) + "\n")
        return [f"--input={f}"], [f"{f}:4", "'text'", "--text_field"]
    if case == "not json":
        f.write_text(good + "{oops\n")
        return [f"--input={f}"], [f"{f}:2", "JSON"]
    if case == "not utf-8 jsonl":
        f.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
        return [f"--input={f}"], [f"{f}:2", "UTF-8"]
    if case == "not utf-8 txt":
        (tmp_path / "in.txt").write_bytes(b"caf\xe9 au lait")
        return [f"--input={tmp_path / 'in.txt'}"], ["in.txt", "UTF-8"]
    if case == "not a string":
        f.write_text(good + json.dumps({"text": 5}) + "\n")
        return [f"--input={f}"], [f"{f}:2", "not a string"]
    if case == "empty corpus":
        f.write_text("\n\n")
        (tmp_path / "e.txt").write_text("")
        return [f"--input={f}", f"--input={tmp_path / 'e.txt'}"], ["empty"]
    if case == "parquet without the column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "p.parquet")
        return [f"--input={tmp_path / 'p.parquet'}"], ["p.parquet", "'text'", "content", "--text_field"]
    if case == "damaged parquet":
        (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
        return [f"--input={tmp_path / 'p.parquet'}"], ["p.parquet", "Parquet"]
    if case == "damaged gzip":
        (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(good.encode() * 100)[:40])
        return [f"--input={tmp_path / 'g.jsonl.gz'}"], ["g.jsonl.gz", "damaged"]
    if case == "unknown format":
        (tmp_path / "x.csv").write_text("a,b")
        return [f"--input={tmp_path / 'x.csv'}"], [".csv", ".jsonl"]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return [f"--input={tmp_path / 'empty'}"], ["holds no .txt"]
    if case == "glob of nothing":
        return [f"--input={tmp_path}/*.jsonl"], ["matches no"]
    if case == "fifo":
        os.mkfifo(tmp_path / "pipe.txt")
        return [f"--input={tmp_path / 'pipe.txt'}"], ["not a regular file"]
    if case == "tokenizer without a boundary":
        from tokenizers import Tokenizer, models

        Tokenizer(models.WordLevel({"[UNK]": 0, "fine": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
        f.write_text(good * 2)
        return [f"--input={f}", f"--tokenizer={tmp_path / 't.json'}"], ["--boundary_token"]
    if case == "empty gzip":
        (tmp_path / "g.jsonl.gz").write_bytes(b"")
        f.write_text(good * 3)
        return [f"--input={f}", f"--input={tmp_path / 'g.jsonl.gz'}"], ["g.jsonl.gz", "0 bytes"]
    if case == "lone surrogate":
        f.write_text(good + '{"text": "half \\ud800 a pair"}\n')
        return [f"--input={f}", "--tokenizer=bpe", "--vocab_size=300"], [f"{f}:2", "surrogate"]
    if case == "a folder twice":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.jsonl").write_text(good * 3)
        return [f"--input={tmp_path / 'docs'}", f"--input={tmp_path / 'docs' / '..' / 'docs'}"], ["a.jsonl", "twice"]
    if case == "a link to a file given":
        f.write_text(good * 3)
        (tmp_path / "link.jsonl").symlink_to(f)
        return [f"--input={f}", f"--input={tmp_path / 'link.jsonl'}"], ["link.jsonl", "twice"]
    if case == "val inside input":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.jsonl").write_text(good * 3)
        (tmp_path / "docs" / "v.jsonl").write_text(good * 3)
        return [f"--input={tmp_path / 'docs'}", f"--val_input={tmp_path / 'docs' / 'v.jsonl'}"], [
            "v.jsonl",
            "both --input and --val_input",
        ]
    if case == "damaged parquet page":  # the footer reads; a page in the middle does not
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"text": [f"document {i} " * 50 for i in range(5000)]}),
            tmp_path / "p.parquet",
            row_group_size=1000,
        )
        data = bytearray((tmp_path / "p.parquet").read_bytes())
        data[len(data) // 2 : len(data) // 2 + 2000] = bytes(
            b ^ 0x5A for b in data[len(data) // 2 : len(data) // 2 + 2000]
        )
        (tmp_path / "p.parquet").write_bytes(bytes(data))
        return [f"--input={tmp_path / 'p.parquet'}"], ["p.parquet", "after row", "damaged"]
    if case == "parquet strings not utf-8":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"text": pa.array([b"fine", b"caf\xe9"], type=pa.binary()).view(pa.string())}),
            tmp_path / "p.parquet",
        )
        return [f"--input={tmp_path / 'p.parquet'}"], ["p.parquet", "not UTF-8"]
    if case == "word-level tokenizer without [UNK]":
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({"fine": 0, "<|endoftext|>": 1}))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / "t.json"))
        f.write_text(good * 2 + json.dumps({"text": "fine words"}) + "\n")
        return [f"--input={f}", f"--tokenizer={tmp_path / 't.json'}"], ["t.json", "cannot encode", "unk_token"]
    if case == "missing val_input":
        f.write_text(good * 3)
        return [f"--input={f}", f"--val_input={tmp_path / 'v.jsonl'}"], ["--val_input", "v.jsonl", "not found"]
    if case == "bpe sample too small":
        f.write_text(good * 300)
        return [f"--input={f}", "--tokenizer=bpe", "--vocab_size=300", "--tokenizer_chars=1"], [
            "--tokenizer_chars=1",
            "lower --vocab_size",
        ]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "empty gzip",
        "lone surrogate",
        "a folder twice",
        "a link to a file given",
        "val inside input",
        "missing field",
        "not json",
        "not utf-8 jsonl",
        "not utf-8 txt",
        "not a string",
        "empty corpus",
        "parquet without the column",
        "damaged parquet",
        "damaged gzip",
        "unknown format",
        "empty folder",
        "glob of nothing",
        "fifo",
        "tokenizer without a boundary",
        "damaged parquet page",
        "parquet strings not utf-8",
        "word-level tokenizer without [UNK]",
        "missing val_input",
        "bpe sample too small",
    ],
)
def test_bad_corpus_is_one_line_naming_the_file(case, tmp_path, capsys):
    args, words = bad(tmp_path, case)
    err = cli_error(capsys, "prepare", "text", *args, f"--out={tmp_path / 'd'}")
    assert all(w in err for w in words), err
    assert not (tmp_path / "d" / "train.bin").exists() and not (tmp_path / "d" / ".prepare.tmp").exists()


@pytest.mark.slow
def test_readme_own_data_lines_run_as_written(tmp_path, shakespeare_text):
    """The README's own-text lines (docs/data.md's main example): a folder of .jsonl and .txt documents to samples
    and bits per byte."""
    lines = readme_lines("Your own text, from a folder")
    assert len(lines) == 4 and lines == readme_lines("Your own text, from a folder", "docs/data.md")  # one example
    user = tmp_path / "user"
    docs = documents_of(shakespeare_text, 2000)
    (user / "my_docs" / "stories").mkdir(parents=True)
    (user / "my_docs" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:1500]))
    for i, d in enumerate(docs[1500:]):
        (user / "my_docs" / "stories" / f"{i:03}.txt").write_text(d)
    outputs = run_as_user(lines, user, tmp_path)
    assert "(1,800 + 200 documents), bpe vocabulary of 2048" in outputs[0]
    assert outputs[2].startswith("Once upon a time") and len(outputs[2]) > 100
    result = json.loads(outputs[3])
    assert 0 < result["bits_per_byte"] < result["bits_per_token"] and result["loss"] < 6.0


def test_the_bpe_run_trains_on_a_folder_of_books(tmp_path, shakespeare_text):
    books = tmp_path / "books"
    books.mkdir()
    for i, d in enumerate(documents_of(shakespeare_text, 300)):
        (books / f"{i:03}.txt").write_text(d)
    main(["prepare", "text", f"--input={books}", "--tokenizer=bpe", "--vocab_size=1024", f"--out={tmp_path / 'data'}"])
    main(
        [
            "train",
            "gutenberg-bpe-cpu",
            f"--data={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'run'}",
            "--max_iters=3",
            "--eval_iters=1",
            "--progress=false",
        ]
    )
    summary = metrics(tmp_path / "run")[-1]["summary"]
    assert summary["status"] == "finished" and summary["step"] == 3


def test_the_users_own_tokenizer_or_meta_json_in_out_is_refused_and_kept(tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("some text to prepare\n" * 50)
    for name in ("tokenizer.json", "meta.json"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text('{"mine": true}')
        err = cli_error(capsys, "prepare", "text", f"--input={tmp_path / 'docs.txt'}", f"--out={out}")
        assert name in err and "no prepare wrote" in err
        assert (out / name).read_text() == '{"mine": true}' and not (out / "train.bin").exists()


def test_an_out_that_walks_back_into_a_run_folder_is_refused(made, tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("some text to prepare\n" * 50)
    err = cli_error(capsys, "prepare", "text", f"--input={tmp_path / 'docs.txt'}", f"--out={made / 'run' / 'x' / '..'}")
    assert "holds a training run" in err and not (made / "run" / "train.bin").exists()


def test_a_kill_between_the_final_renames_leaves_the_new_dataset_whole(tmp_path, shakespeare_text, monkeypatch):
    """The four files are one set: killed after the first is moved in, the next reader finishes the move (never a new
    train.bin beside the old meta.json); killed before the set is complete, the old dataset stays (test above)."""
    docs = documents_of(shakespeare_text, 60)
    for name, part in (("old", docs[:30]), ("new", docs[30:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    main(
        [
            "prepare",
            "text",
            f"--input={tmp_path / 'new.jsonl'}",
            "--tokenizer=bpe",
            "--vocab_size=300",
            f"--out={tmp_path / 'straight'}",
        ]
    )
    main(["prepare", "text", f"--input={tmp_path / 'old.jsonl'}", f"--out={tmp_path / 'd'}"])  # char, no tokenizer.json
    real_replace = os.replace
    moved = []

    def killed_after_one(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt  # as kill -9 there: nothing after it runs
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(nanokimi.output_folders.os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        nanokimi.prepare.prepare("text", tmp_path / "d", tmp_path / "new.jsonl", tokenizer="bpe", vocab_size=300)
    monkeypatch.setattr(nanokimi.output_folders.os, "replace", real_replace)
    assert len(moved) == 2  # the mark and one file
    meta = read_meta(tmp_path / "d")  # any reader: the new set moved in whole first
    assert meta == read_meta(tmp_path / "straight") and not (tmp_path / "d" / ".prepare.tmp").exists()
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_two_prepares_into_one_folder_the_second_is_refused(tmp_path, capsys):
    (tmp_path / "docs.txt").write_text("some text to prepare\n" * 50)
    with nanokimi.output_folders.command_lock(tmp_path / "d", "prepare"):  # a prepare writing there now
        err = cli_error(capsys, "prepare", "text", f"--input={tmp_path / 'docs.txt'}", f"--out={tmp_path / 'd'}")
    assert "another `nanokimi prepare` is writing to" in err and not (tmp_path / "d" / "train.bin").exists()


def test_document_text_is_text_boundaries_and_counts_are_exact(tmp_path):
    """A document quoting "<|endoftext|>" holds no boundary; a byte-order mark is no character; the document moved to
    val for want of a stride is counted once."""
    docs = [f"document {i} quotes <|endoftext|> inside" for i in range(5)]
    for i, d in enumerate(docs):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_bytes(b"\xef\xbb\xbf" + d.encode())
    meta = nanokimi.prepare.prepare("text", tmp_path / "bpe", tmp_path / "docs", tokenizer="bpe", vocab_size=270)
    tok = load_tokenizer(tmp_path / "bpe")
    parts = split_documents(tmp_path / "bpe", tok, meta)
    assert parts["train"] + parts["val"] == docs  # 5 documents, 4 boundaries, no BOM
    assert meta["train_documents"] == 4 and meta["val_documents"] == 1  # 5: the stride of 10 takes none, the last
    char = nanokimi.prepare.prepare("text", tmp_path / "char", tmp_path / "docs")
    assert "\ufeff" not in char["chars"] and char["train_documents"] + char["val_documents"] == 5


@pytest.mark.parametrize(
    "args, words",
    [
        (["shakespeare_char", "--tokenizer=bpe"], ["shakespeare_char is char-level", "prepare text"]),
        (["text", "--vocab_size=300"], ["--vocab_size would be ignored with --tokenizer=char", "--tokenizer=bpe"]),
        (["text", "--boundary_token=</s>"], ["--boundary_token would be ignored with --tokenizer=char"]),
        (["text", "--tokenizer=char", "--tokenizer_chars=1000"], ["--tokenizer_chars would be ignored"]),
        (
            ["text", "--tokenizer=bpe", "--vocab_size=300", "--boundary_token=</s>"],
            ["--boundary_token would be ignored"],
        ),
        (
            ["text", "--tokenizer=TOKENIZER", "--vocab_size=300"],
            ["--vocab_size would be ignored", "its own vocabulary"],
        ),
        (["text", "--tokenizer_from=DATA", "--tokenizer=bpe"], ["reuses that tokenizer", "--tokenizer would be"]),
        (["text", "--tokenizer_from=DATA", "--vocab_size=300"], ["reuses that tokenizer", "--vocab_size would be"]),
    ],
)
def test_an_option_the_others_make_meaningless_is_refused_not_ignored(args, words, char_data, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    (tmp_path / "docs.txt").write_text("some text to prepare\n" * 50)
    args = [a.replace("=TOKENIZER", f"={tmp_path / 't.json'}").replace("=DATA", f"={char_data}") for a in args]
    err = cli_error(capsys, "prepare", *args, f"--input={tmp_path / 'docs.txt'}", f"--out={tmp_path / 'd'}")
    assert all(w in err for w in words), err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("change", ["grown", "deleted"])
def test_an_input_changed_during_prepare_is_said_so(change, tmp_path, capsys, monkeypatch):
    """The char vocabulary is learnt in a first pass: a file grown (or gone) before the second is named, not blamed
    on the vocabulary or the disk."""
    docs = tmp_path / "docs.txt"
    docs.write_text("some text to prepare\n" * 50)
    learn = nanokimi.prepare.CharTokenizer.train

    def then_changed(chars, boundary, specials=()):
        docs.unlink() if change == "deleted" else docs.write_text(docs.read_text() + "new words: xyz\n")
        return learn(chars, boundary, specials)

    monkeypatch.setattr(nanokimi.prepare.CharTokenizer, "train", then_changed)
    err = cli_error(capsys, "prepare", "text", f"--input={docs}", f"--out={tmp_path / 'd'}")
    assert "docs.txt" in err and ("changed while prepare read it" if change == "grown" else "moved or deleted") in err
    assert not (tmp_path / "d" / "train.bin").exists()


def test_a_dataset_prepared_into_its_input_folder_is_not_read_as_documents(tmp_path, shakespeare_text):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents_of(shakespeare_text, 30)))
    metas = [nanokimi.prepare.prepare("text", corpus, corpus, tokenizer="bpe", vocab_size=300) for _ in range(2)]
    assert metas[0] == metas[1] and metas[1]["train_documents"] + metas[1]["val_documents"] == 30


def test_bpe_learns_from_a_document_without_whitespace_in_linear_time(tmp_path, shakespeare_text):
    """The trainer's cost grows with the square of a word's length: 2 MB without whitespace never ended. Words are
    cut for learning (short_words), so this takes seconds; the encoding of the whole text stays exact."""
    import re

    letters = re.sub(r"[^A-Za-z]", "", shakespeare_text)
    (tmp_path / "blob.txt").write_text(letters * (2_000_000 // len(letters) + 1))
    nanokimi.prepare.prepare("text", tmp_path / "d", tmp_path / "blob.txt", tokenizer="bpe", vocab_size=1000)
    tok = load_tokenizer(tmp_path / "d")
    assert tok.decode(tok.encode(letters[:5000])) == letters[:5000] and tok.vocab_size == 1000
    pieces = list(nanokimi.tokenizer.short_words(["ab " + "x" * 2500 + " cd", "plain text"], longest=1000))
    assert "".join(pieces) == "ab " + "x" * 2500 + " cd" + "plain text" and pieces[-1] == "plain text"
    assert max(len(w) for piece in pieces for w in piece.split()) == 1000


def test_prepare_imports_no_torch(tmp_path):
    (tmp_path / "docs.txt").write_text("some text to prepare\n" * 50)
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['nanokimi', 'prepare', 'text', '--input={tmp_path / 'docs.txt'}', "
        f"'--out={tmp_path / 'd'}']\n"
        "try:\n    runpy.run_module('nanokimi', run_name='__main__')\n"
        "finally:\n    print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]" and read_meta(tmp_path / "d")["train_tokens"] > 0


def test_ids_past_65536_tokens_are_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", *words])}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "t.json"))
    docs = [" ".join(words[i::50]) for i in range(50)]  # every word once, the last ids among them
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = nanokimi.prepare.prepare("text", tmp_path / "d", tmp_path / "docs.jsonl", tokenizer=str(tmp_path / "t.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    parts = split_documents(tmp_path / "d", load_tokenizer(tmp_path / "d"), meta)
    assert sorted(parts["train"] + parts["val"]) == sorted(docs)
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=np.uint32) for s in ("train", "val")])
    assert ids.max() == 70_001


def test_val_fraction_holds_out_every_nth_document(tmp_path, shakespeare_text):
    docs = documents_of(shakespeare_text, 30)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    main(["prepare", "text", f"--input={tmp_path / 'docs.jsonl'}", "--val_fraction=0.2", f"--out={tmp_path / 'd'}"])
    meta = read_meta(tmp_path / "d")
    parts = split_documents(tmp_path / "d", load_tokenizer(tmp_path / "d"), meta)
    assert parts["val"] == docs[4::5] and parts["train"] == [d for i, d in enumerate(docs) if i % 5 != 4]


@pytest.mark.parametrize("flag", [[], ["--no_progress"]])
def test_the_progress_bar_shows_on_a_terminal_unless_no_progress(flag, tmp_path, capsys, monkeypatch):
    (tmp_path / "docs.txt").write_text("some text to prepare\n" * 50)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main(["prepare", "text", f"--input={tmp_path / 'docs.txt'}", f"--out={tmp_path / 'd'}", *flag])
    assert ("tokenize" in capsys.readouterr().err) == (not flag)


def test_prepare_runs_in_memory_that_does_not_grow_with_the_corpus(tmp_path, shakespeare_text):
    """docs/data.md: documents are streamed and encoded in batches, no file is read whole: three times the corpus
    (both past one encoding batch) peaks at the same resident memory, within 10 MB (a file read whole adds its 36 MB
    and more)."""
    from nanokimi.bench.corpora import timed_prepare

    docs = documents_of(shakespeare_text, 200)
    line_block = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    peaks = {}
    for mb in (12, 36):
        corpus = tmp_path / f"{mb}.jsonl"
        with open(corpus, "w") as f:
            for _ in range(mb * 10**6 // len(line_block) + 1):
                f.write(line_block)
        _, peaks[mb], _ = timed_prepare(["text", f"--input={corpus}", f"--out={tmp_path / f'd{mb}'}"])
        assert read_meta(tmp_path / f"d{mb}")["train_tokens"] > mb * 10**6 * 0.6
    assert peaks[36] < peaks[12] + 10, peaks
