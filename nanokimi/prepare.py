"""`nanokimi prepare`, as nanoGPT's prepare.py: the documents of a corpus (corpus.py) tokenized in batches
(tokenizer.py) and appended to uint16/uint32 token files as they come, in memory that does not grow with the corpus.
Imports no torch: a prepare starts in well under a second.

A prepared dataset is a folder: train.bin, val.bin (token ids, documents joined by the boundary token), meta.json
(tokenizer kind, vocab, dtype, boundary token id, token and document counts) and, for BPE or a given tokenizer,
tokenizer.json (HF `tokenizers`)."""

import os
import urllib.request
from pathlib import Path

import numpy as np

from .conversations import ConversationRecords
from .corpus import Corpus, HFDataset, describe, progress_bar
from .errors import UserError
from .output_folders import check_destination, finish_swap, kind
from .prepare_chat import prepare_chat
from .prepared import DATASET_FILES, new_dataset, save_dataset_meta, token_dtype
from .tokenizer import (
    BOUNDARY,
    TOKENIZER_FILES,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download_shakespeare(dest):
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=20) as response:
            Path(dest).write_bytes(response.read())
    except OSError as e:
        raise UserError(
            f"could not download TinyShakespeare ({e.__class__.__name__}): offline? pass a local copy "
            f"with --input=PATH/tinyshakespeare.txt"
        ) from None


BATCH_CHARS = 1 << 22  # text encoded per encode_batch call: large enough to keep every core busy
BATCH_DOCUMENTS = 4096


class SplitFile:
    """One split's token stream as it is written: its documents one after another, the boundary token between two."""

    def __init__(self, path, dtype, boundary_token_id):
        self.path, self.dtype, self.boundary = Path(path), dtype, boundary_token_id
        self.file = open(path, "wb")
        self.tokens = self.documents = self.last_start = 0  # last_start: where the last document's tokens begin

    def add(self, ids, new_document):
        if new_document:
            if self.documents and self.boundary is not None:
                self.file.write(np.array([self.boundary], dtype=self.dtype).tobytes())
                self.tokens += 1
            self.documents += 1
            self.last_start = self.tokens
        self.file.write(ids.astype(self.dtype).tobytes())
        self.tokens += len(ids)

    def move_tail(self, start, end, to, chunk=1 << 24):
        """Move this split's tokens [start:] to split `to` (as one document), keeping [:end] here; in chunks, so
        that a long tail is never held whole."""
        self.file.flush()
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        for i in range(start, len(tokens), chunk):
            to.add(np.asarray(tokens[i : i + chunk]), new_document=i == start)
        del tokens
        self.file.truncate(end * np.dtype(self.dtype).itemsize)
        self.file.seek(0, os.SEEK_END)
        self.tokens = end


def encoded(corpus, tokenizer, drop_unknown, bar):
    """(new_document, token ids) of each document or piece of `corpus`, encoded in batches of ~BATCH_CHARS."""
    batch, size = [], 0

    def flush():
        yield from zip((new for new, _ in batch), tokenizer.encode_batch([t for _, t in batch], drop_unknown))
        bar.update(corpus.bytes_read - bar.n)

    for new_document, text in corpus:
        if new_document and not text:
            continue  # an empty document (an empty line's record, two separators in a row) holds nothing
        batch.append((new_document, text))
        size += len(text)
        if size >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield from flush()
            batch, size = [], 0
    yield from flush()


def write_dataset(
    corpus, tokenizer, out, val_fraction=0.1, val_corpus=None, tokenizer_dir=None, drop_unknown=False, progress=False
):
    """Tokenize the documents of `corpus` into train.bin and val.bin, the boundary token between two documents,
    and write the tokenizer (copied from tokenizer_dir when it came from there, so its files stay byte-identical).

    val: the documents of `val_corpus`, else every (1/val_fraction)-th document (whole documents, the same ones at
    every run); a corpus of one document is split as nanoGPT does, its first 90% / last 10% of tokens.
    Only those files in `out` are replaced, as one set (new_dataset): whatever else `out` holds (the input text,
    notes) stays."""
    dtype = token_dtype(tokenizer)
    boundary = tokenizer.boundary_token_id
    with new_dataset(out) as tmp:
        train, val = SplitFile(tmp / "train.bin", dtype, boundary), SplitFile(tmp / "val.bin", dtype, boundary)
        with train.file, val.file:
            index = -1
            with progress_bar(corpus, "tokenize", progress) as bar:
                for new_document, ids in encoded(corpus, tokenizer, drop_unknown, bar):
                    if new_document:
                        index += 1
                        into = (
                            train
                            if val_corpus is not None or int((index + 1) * val_fraction) == int(index * val_fraction)
                            else val
                        )
                    into.add(ids, new_document)
                    bar.set_postfix(documents=f"{index + 1:,}", tokens=f"{train.tokens + val.tokens:,}", refresh=False)
            if val_corpus is not None:
                with progress_bar(val_corpus, "tokenize val", progress) as bar:
                    for new_document, ids in encoded(val_corpus, tokenizer, drop_unknown, bar):
                        val.add(ids, new_document)
            if train.tokens + val.tokens == 0:
                raise UserError(f"the corpus {describe(corpus)} is empty (no text): pass files with text in them")
            if val_corpus is None and train.documents + val.documents == 1:  # one document: split by tokens
                n_train = int(train.tokens * (1 - val_fraction))
                train.move_tail(n_train, n_train, val)
            elif val_corpus is None and val.documents == 0:  # too few documents for the stride: the last one
                train.move_tail(train.last_start, train.last_start - (boundary is not None), val)
                train.documents -= 1  # moved whole: counted in val now
            if val.tokens == 0:
                raise UserError(
                    "the validation split is empty (its documents hold no text): pass more text, "
                    "or --val_input with text in it"
                )
        meta = save_dataset_meta(
            tmp,
            tokenizer,
            tokenizer_dir,
            dtype,
            train_tokens=train.tokens,
            val_tokens=val.tokens,
            train_documents=train.documents,
            val_documents=val.documents,
        )
    return meta


def check_tokenizer_options(dataset, tokenizer, vocab_size, tokenizer_dir, tokenizer_chars, boundary_token):
    """A UserError for a tokenizer option that the others make meaningless: an option is never silently ignored.
    `tokenizer` None: not given (char, unless --tokenizer_from reuses one)."""
    if tokenizer_dir is not None:
        given = [
            f
            for f, v in (
                ("--tokenizer", tokenizer),
                ("--vocab_size", vocab_size),
                ("--tokenizer_chars", tokenizer_chars),
                ("--boundary_token", boundary_token),
            )
            if v is not None
        ]
        if given:
            raise UserError(
                f"--tokenizer_from={tokenizer_dir} reuses that tokenizer, so {', '.join(given)} would "
                f"be ignored: drop {'it' if len(given) == 1 else 'them'}, or --tokenizer_from to make a "
                f"new tokenizer"
            )
        return
    kind = tokenizer or "char"
    if dataset == "shakespeare_char" and kind != "char":
        raise UserError(
            f"shakespeare_char is char-level: for --tokenizer={kind} use `nanokimi prepare text "
            f"--input=tinyshakespeare.txt --tokenizer={kind} ...`"
        )
    unused = {"char": ("--vocab_size", "--tokenizer_chars", "--boundary_token"), "bpe": ("--boundary_token",)}.get(
        kind, ("--vocab_size", "--tokenizer_chars")
    )  # a tokenizer.json has its vocabulary already
    given = [
        f
        for f, v in (
            ("--vocab_size", vocab_size),
            ("--tokenizer_chars", tokenizer_chars),
            ("--boundary_token", boundary_token),
        )
        if v is not None and f in unused
    ]
    if given:
        why = {
            "char": "a char vocabulary is every character of the text, and its boundary token is nanoKimi's own",
            "bpe": f"nanoKimi's BPE reserves its own boundary token {BOUNDARY}",
        }.get(kind, "a given tokenizer.json brings its own vocabulary")
        raise UserError(
            f"{', '.join(given)} would be ignored with --tokenizer={kind} ({why}): drop "
            f"{'it' if len(given) == 1 else 'them'}"
            + (", or pass --tokenizer=bpe" if kind == "char" and "--boundary_token" not in given else "")
        )


def prepare(
    dataset,
    out,
    inputs=None,
    *,
    text_field=None,
    doc_separator=None,
    val_inputs=None,
    val_fraction=0.1,
    hf_name=None,
    hf_config=None,
    hf_split="train",
    tokenizer=None,
    vocab_size=None,
    tokenizer_chars=None,
    boundary_token=None,
    tokenizer_dir=None,
    drop_unknown=False,
    progress=False,
):
    """`dataset` is "shakespeare_char" (TinyShakespeare, char-level), "text" (local files, folders, globs), "hf"
    (a Hugging Face dataset, streamed) or "chat" (conversations from files or, with hf_name, a Hugging Face dataset:
    prepare_chat.py). The documents: `inputs` (or hf_name, hf_config, hf_split), read by text_field and
    doc_separator, val_inputs or every 1/val_fraction-th document held out. The tokenizer: `tokenizer` char (the
    default), bpe or a tokenizer.json path; vocab_size and tokenizer_chars (how many characters BPE learns from,
    default 1e9) for bpe. With tokenizer_dir (a dataset or checkpoint folder), reuse that tokenizer instead of making
    one: the way to finetune a model on new text; drop_unknown drops the characters a char vocabulary lacks (else
    they are an error)."""
    out = Path(out)
    if dataset not in ("shakespeare_char", "text", "hf", "chat"):
        raise UserError(f"unknown dataset {dataset!r}: use shakespeare_char, text, hf or chat")
    if dataset == "chat" and (
        given := [
            flag
            for flag, v in (
                ("--text_field", text_field),
                ("--doc_separator", doc_separator),
                ("--boundary_token", boundary_token),
            )
            if v is not None
        ]
    ):
        raise UserError(
            f'{", ".join(given)} would be ignored by prepare chat (a record holds "messages" or '
            f'"conversations", and conversations need no boundary token): drop '
            f"{'it' if len(given) == 1 else 'them'}"
        )
    text_field = text_field or "text"
    records = ConversationRecords() if dataset == "chat" else None
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction={val_fraction}: give a fraction between 0 and 1, e.g. 0.1")
    if tokenizer_chars is not None and not tokenizer_chars >= 1:
        raise UserError(f"--tokenizer_chars={tokenizer_chars}: give how many characters BPE learns from, e.g. 1e9")
    check_tokenizer_options(dataset, tokenizer, vocab_size, tokenizer_dir, tokenizer_chars, boundary_token)
    tokenizer = tokenizer or "char"
    out = out.resolve()  # RUN/x/.. is RUN, and checked as such
    finish_swap(out)  # a prepare killed after its new dataset was complete: that one is the dataset now
    check_destination(out, "prepare", "a prepared dataset")
    if out.is_dir() and kind(out) is None:
        users = [name for name in DATASET_FILES if (out / name).exists()]
        if users:  # a folder that is no dataset: a meta.json or tokenizer.json there is the user's own
            raise UserError(
                f"{out} holds {', '.join(users)} that no prepare wrote (it is no prepared dataset): "
                f"`nanokimi prepare` would replace them, pick another --out"
            )
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    own_files = [out / name for name in TOKENIZER_FILES]  # a dataset in an input folder is not read as documents
    if dataset == "shakespeare_char":
        if not inputs:
            out.mkdir(parents=True, exist_ok=True)
            inputs = [out / "input.txt"]
            if not inputs[0].is_file():
                download_shakespeare(inputs[0])
    if dataset == "hf" or dataset == "chat" and hf_name:
        if not hf_name:
            raise UserError("prepare hf needs --dataset=NAME (a Hugging Face dataset, e.g. roneneldan/TinyStories)")
        corpus = HFDataset(hf_name, hf_config, hf_split, text_field, data_files=inputs, records=records)
    elif not inputs:
        raise UserError(
            f"prepare {dataset} needs --input=PATH (files, folders or globs of "
            + (".jsonl, .json, .parquet), or --dataset=NAME" if dataset == "chat" else ".txt, .jsonl, .parquet)")
        )
    else:
        corpus = Corpus(inputs, text_field, doc_separator, skip=own_files, records=records)
    val_corpus = (
        Corpus(val_inputs, text_field, doc_separator, "--val_input", own_files, records) if val_inputs else None
    )
    if val_corpus is not None and isinstance(corpus, Corpus):
        shared = {f.resolve() for f in corpus.files} & {f.resolve() for f in val_corpus.files}
        if shared:
            raise UserError(
                f"{sorted(shared)[0]} is in both --input and --val_input: validation would score text the "
                f"model trains on, give --val_input files apart from --input"
            )
    if dataset == "chat":
        return prepare_chat(
            out, corpus, val_corpus, tokenizer, vocab_size, tokenizer_dir, tokenizer_chars, val_fraction, progress
        )
    if tokenizer_dir is not None:
        reused = load_tokenizer(tokenizer_dir)
        if not (corpus.single_document and val_corpus is None) and reused.boundary_token_id is None:
            raise UserError(
                f"the vocabulary of {tokenizer_dir} has no document boundary token, and this corpus has "
                f"several documents: pass one .txt file, or prepare with a new tokenizer"
            )
        if drop_unknown or not isinstance(reused, CharTokenizer):
            meta = write_dataset(corpus, reused, out, val_fraction, val_corpus, tokenizer_dir, drop_unknown, progress)
            return meta | {"dropped": getattr(reused, "dropped", 0)}
        unknown = set()
        for c in [corpus] + ([val_corpus] if val_corpus else []):
            for _, text in c:
                unknown.update(reused.unknown(text))
        if unknown:
            raise UserError(
                f"characters {''.join(sorted(unknown))!r} of {describe(corpus)} are not in the "
                f"{reused.vocab_size}-character vocabulary of {tokenizer_dir}: pass --drop_unknown to "
                f"drop them from the text"
            )
        return write_dataset(corpus, reused, out, val_fraction, val_corpus, tokenizer_dir, False, progress)
    made = build_tokenizer(
        tokenizer, corpus, val_corpus, vocab_size, int(tokenizer_chars or 1e9), boundary_token, progress
    )
    return write_dataset(corpus, made, out, val_fraction, val_corpus, None, drop_unknown, progress)
