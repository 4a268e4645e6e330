"""Data preparation (char-level and BPE) and batches from uint16/uint32 memmaps, as nanoGPT's prepare.py/train.py.

A prepared dataset is a folder: train.bin, val.bin (token ids), meta.json (tokenizer kind, vocab, dtype) and, for
BPE, tokenizer.json (HF `tokenizers`). Checkpoints carry a copy of meta.json/tokenizer.json, so sampling needs no
data folder."""

import functools
import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, check_fields, write_failure
from .folders import check_destination

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TOKENIZER_FILES = ("meta.json", "tokenizer.json")


class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def train(cls, text):
        return cls(sorted(set(text)))

    def unknown(self, text):
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text):
        unknown = self.unknown(text)
        if unknown:
            raise UserError(f"characters {''.join(unknown)!r} are not in this model's {self.vocab_size}-character "
                            f"vocabulary: use only characters seen in its training data")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self):
        """UTF-8 bytes of each token id's text (for bits per byte)."""
        return [len(c.encode()) for c in self.chars]

    def meta(self):
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "chars": self.chars}

    def save(self, folder):
        write_json(Path(folder) / "meta.json", self.meta())


class BPETokenizer:
    """Byte-level BPE trained locally with Hugging Face `tokenizers`: every string is encodable."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text_files, vocab_size):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train([str(f) for f in text_files], trainer)
        return cls(tok)

    def unknown(self, text):
        return []  # byte-level: every string is encodable

    def encode(self, text):
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids))

    def token_bytes(self):
        """Bytes of each token id's text: byte-level BPE spells every byte as one character of the token."""
        return [len(self.tokenizer.id_to_token(i)) for i in range(self.vocab_size)]

    def meta(self):
        return {"tokenizer": "bpe", "vocab_size": self.vocab_size}

    def save(self, folder):
        self.tokenizer.save(str(Path(folder) / "tokenizer.json"))
        write_json(Path(folder) / "meta.json", self.meta())


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_meta(folder):
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `nanokimi prepare` to create the dataset in {folder}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}): prepare the data again") from None
    return check_fields(meta, path, {"tokenizer": str, "vocab_size": int, "dtype?": str},
                        fix="prepare the data again (or restore the file)")


def load_tokenizer(folder):
    meta = read_meta(folder)
    if meta.get("tokenizer") == "char":
        if not isinstance(meta.get("chars"), list) or not all(isinstance(c, str) for c in meta["chars"]):
            raise UserError(f"{Path(folder) / 'meta.json'} has no valid \"chars\" list: prepare the data again")
        if len(meta["chars"]) != meta["vocab_size"]:
            raise UserError(f"{Path(folder) / 'meta.json'}: \"chars\" holds {len(meta['chars'])} characters but "
                            f"\"vocab_size\" is {meta['vocab_size']}: prepare the data again (or restore the file)")
        return CharTokenizer(meta["chars"])
    if meta.get("tokenizer") == "bpe":
        from tokenizers import Tokenizer
        try:
            return BPETokenizer(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")))
        except Exception as e:  # tokenizers raises a bare Exception for missing or corrupt files
            raise UserError(f"cannot read {Path(folder) / 'tokenizer.json'} ({e}): prepare the data again") from None
    raise UserError(f"{Path(folder) / 'meta.json'} names an unknown tokenizer {meta.get('tokenizer')!r}")


def tokenizer_fingerprint(folder):
    """Identifies a tokenizer by its files, to check that a checkpoint and a dataset agree."""
    digest = hashlib.sha256()
    meta = read_meta(folder)
    digest.update(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "chars") if k in meta}).encode())
    if (Path(folder) / "tokenizer.json").is_file():
        digest.update((Path(folder) / "tokenizer.json").read_bytes())
    return digest.hexdigest()


def check_same_tokenizer(checkpoint_dir, data_folder):
    """A UserError unless a checkpoint and a dataset share one tokenizer (token ids mean the same text)."""
    if tokenizer_fingerprint(checkpoint_dir) != tokenizer_fingerprint(data_folder):
        raise UserError(f"the tokenizer of checkpoint {checkpoint_dir} differs from the one of data {data_folder}: "
                        f"prepare the data with the checkpoint's tokenizer (nanokimi prepare ... "
                        f"--tokenizer_from={checkpoint_dir})")


def copy_tokenizer(src, dst):
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def read_text(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} not found: pass --input=PATH to an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: convert it to UTF-8 first") from None
    if not text.strip():
        raise UserError(f"input file {path} is empty: pass a file with text in it")
    return text


def download_shakespeare(dest):
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=20) as response:
            Path(dest).write_bytes(response.read())
    except OSError as e:
        raise UserError(f"could not download TinyShakespeare ({e.__class__.__name__}): offline? pass a local copy "
                        f"with --input=PATH/tinyshakespeare.txt") from None


def write_dataset(text, tokenizer, out, tokenizer_dir=None, val_fraction=0.1):
    """Tokenize text, split the first 90% / last 10% as nanoGPT, and write train.bin, val.bin and the tokenizer
    (copied from tokenizer_dir when the tokenizer came from there, so its files stay byte-identical) into `out`.

    Only those files are replaced, each by an atomic rename once all are written: whatever else `out` holds (the
    input text, notes) stays, and a failed write leaves the previous dataset whole."""
    out = Path(out)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.uint32)
    n_train = int(len(ids) * (1 - val_fraction))
    tmp = out / ".prepare.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ids[:n_train].tofile(tmp / "train.bin")
        ids[n_train:].tofile(tmp / "val.bin")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        else:
            tokenizer.save(tmp)
        meta = read_meta(tmp) | {"dtype": ids.dtype.name, "train_tokens": n_train, "val_tokens": len(ids) - n_train}
        write_json(tmp / "meta.json", meta)
        for name in set(TOKENIZER_FILES) - {p.name for p in tmp.iterdir()}:  # a previous tokenizer's file
            (out / name).unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    except OSError as e:
        raise UserError(f"could not write the dataset to {out} ({write_failure(e)}): free some space or pick a "
                        f"writable --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def prepare(dataset, out, input=None, tokenizer="char", vocab_size=None, tokenizer_dir=None, drop_unknown=False):
    """`dataset` is "shakespeare_char" (TinyShakespeare, char-level) or "text" (any UTF-8 file, char or BPE).
    With tokenizer_dir (a dataset or checkpoint folder), reuse that tokenizer instead of training one: the way to
    finetune a model on new text; drop_unknown drops the characters a char vocabulary lacks (else they are an
    error)."""
    out = Path(out)
    if dataset not in ("shakespeare_char", "text"):
        raise UserError(f"unknown dataset {dataset!r}: use shakespeare_char or text")
    check_destination(out, "prepare", "a prepared dataset")
    if dataset == "shakespeare_char" and input is None:
        out.mkdir(parents=True, exist_ok=True)
        input = out / "input.txt"
        if not input.is_file():
            download_shakespeare(input)
    if input is None:
        raise UserError("prepare text needs --input=FILE (a UTF-8 text file)")
    text = read_text(input)
    if tokenizer_dir is not None:
        reused = load_tokenizer(tokenizer_dir)
        unknown = reused.unknown(text)
        if unknown and not drop_unknown:
            raise UserError(f"characters {''.join(unknown)!r} of {input} are not in the {reused.vocab_size}-character "
                            f"vocabulary of {tokenizer_dir}: pass --drop_unknown to drop them from the text")
        dropped = set(unknown)
        kept = "".join(c for c in text if c not in dropped)
        if not kept:
            raise UserError(f"no character of {input} is in the vocabulary of {tokenizer_dir}")
        return write_dataset(kept, reused, out, tokenizer_dir) | {"dropped": len(text) - len(kept)}
    if dataset == "shakespeare_char" or tokenizer == "char":
        return write_dataset(text, CharTokenizer.train(text), out)
    if tokenizer == "bpe":
        if not vocab_size or vocab_size < 257:
            raise UserError(f"--vocab_size must be at least 257 for byte-level BPE, got {vocab_size}")
        most = 256 + len(text.encode())  # every merge joins two tokens of the text: at most one per byte
        if vocab_size > most:
            raise UserError(f"--vocab_size={vocab_size} exceeds what {input} can teach a byte-level BPE ({most}: 256 "
                            f"bytes + one merge per byte of text): lower --vocab_size")
        return write_dataset(text, BPETokenizer.train([input], vocab_size), out)
    raise UserError(f"unknown tokenizer {tokenizer!r}: use char or bpe")


class TokenData:
    """Train/val token memmaps of a prepared folder, and [B, block_size] windows read from them."""

    def __init__(self, folder, block_size):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"data folder {folder} not found: run `nanokimi prepare ... --out={folder}` first")
        self.meta = read_meta(folder)
        if self.meta.get("dtype") not in ("uint16", "uint32"):
            raise UserError(f"{self.folder / 'meta.json'}: \"dtype\" is {self.meta.get('dtype')!r}, expected "
                            f"\"uint16\" or \"uint32\" (token ids): prepare the data again")
        self.tokenizer = load_tokenizer(folder)
        self.splits = {}
        for split in ("train", "val"):
            path = self.folder / f"{split}.bin"
            if not path.is_file():
                raise UserError(f"{path} not found: run `nanokimi prepare` again for {folder}")
            n = path.stat().st_size // np.dtype(self.meta["dtype"]).itemsize
            if n < block_size + 1:
                raise UserError(f"{path} holds {n} tokens, fewer than block_size+1 = {block_size + 1}: use more "
                                f"text or a smaller --block_size")
            self.splits[split] = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        self.block_size = block_size

    @functools.cached_property
    def token_bytes(self):
        """UTF-8 bytes of each token id's text, as a tensor (for bits per byte)."""
        return torch.tensor(self.tokenizer.token_bytes(), dtype=torch.float64)

    def batch(self, split, batch_size, generator):
        """batch_size windows at random starts drawn from `generator`."""
        starts = torch.randint(len(self.splits[split]) - self.block_size, (batch_size,), generator=generator)
        return self.windows(split, starts.tolist())

    def windows(self, split, starts):
        """(inputs, next-token targets), [len(starts), block_size] each, of the windows starting at `starts`."""
        data = self.splits[split]
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in starts])
        return x, y
