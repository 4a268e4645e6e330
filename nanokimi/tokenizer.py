"""Tokenizers: a char-level vocabulary, and any Hugging Face `tokenizers` file (nanoKimi's own byte-level BPE, trained
here from a bounded sample of the corpus, or a given tokenizer.json: GPT-2's, a Llama one, ...).

A tokenizer lives in a folder as meta.json (kind, vocab size, the char list, the document boundary token's id) plus,
for the HF kind, tokenizer.json. Checkpoints and datasets carry a copy, so sampling needs no data folder."""

import contextlib
import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np

from .corpus import describe, file_format, progress_bar
from .errors import UserError, check_fields
from .output_folders import finish_swap

TOKENIZER_FILES = ("meta.json", "tokenizer.json")
BOUNDARY = "<|endoftext|>"  # the document boundary token nanoKimi's own vocabularies reserve
# a given tokenizer.json's boundary: the first of these it holds, unless --boundary_token names one
KNOWN_BOUNDARIES = (BOUNDARY, "<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>", "<eos>", "[SEP]", "<|im_end|>")
# BPE learns from words (runs between whitespace) no longer than this: the trainer's cost grows with the square of a
# word's length (a 200 KB document with no whitespace took 11 s, 2 MB did not end), and no merge is that long
LONGEST_WORD = 1000


class CharTokenizer:
    """One id per character, in sorted order; with `boundary`, one more id after them for the document boundary,
    and with `specials` (the chat tokens), one id each after that: each kept in `chars` as its own multi-character
    entry, which no text encodes to."""

    def __init__(self, chars, boundary_token_id=None):
        self.chars = list(chars)
        self.boundary_token_id = boundary_token_id
        self.stoi = {c: i for i, c in enumerate(self.chars) if len(c) == 1 and i != boundary_token_id}
        self.specials = {c: i for i, c in enumerate(self.chars) if len(c) != 1 or i == boundary_token_id}
        self.vocab_size = len(self.chars)
        codes = np.array([ord(c) for c in self.stoi], dtype=np.int64)
        # code point -> id, one array lookup per character (a dict lookup per character ran ~30x slower)
        self.lut = np.full(int(codes.max(initial=0)) + 1, -1, dtype=np.int64)
        self.lut[codes] = list(self.stoi.values())
        self.dropped = 0  # characters encode_batch dropped (drop_unknown) so far

    @classmethod
    def train(cls, chars, boundary, specials=()):
        chars = sorted(chars)
        return cls(chars + [BOUNDARY] * boundary + list(specials), len(chars) if boundary else None)

    def special_token_id(self, token):
        return self.specials.get(token)

    def unknown(self, text):
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text):
        unknown = self.unknown(text)
        if unknown:
            raise UserError(
                f"characters {''.join(unknown)!r} are not in this model's {self.vocab_size}-character "
                f"vocabulary: use only characters seen in its training data"
            )
        return [self.stoi[c] for c in text]

    def encode_batch(self, texts, drop_unknown=False):
        """Token ids of each text, as int64 arrays; characters outside the vocabulary dropped or an error."""
        out = []
        for text in texts:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
            ids = np.where(codes < len(self.lut), self.lut[np.minimum(codes, len(self.lut) - 1)], -1)
            if (ids < 0).any():
                if not drop_unknown:
                    self.encode(text)  # raises, naming the characters
                self.dropped += int((ids < 0).sum())
                ids = ids[ids >= 0]
            out.append(ids)
        return out

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def stream(self, prompt_ids=()):
        """One token id -> its text, for printing tokens as they are sampled (every id is whole characters)."""
        return self.chars.__getitem__

    def token_bytes(self):
        """UTF-8 bytes of each token id's text (for bits per byte); the boundary and chat tokens are no text."""
        return [0 if c in self.specials else len(c.encode()) for c in self.chars]

    def meta(self):
        boundary = {} if self.boundary_token_id is None else {"boundary_token_id": self.boundary_token_id}
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "chars": self.chars} | boundary

    def save(self, folder):
        write_json(Path(folder) / "meta.json", self.meta())


class HFTokenizer:
    """A Hugging Face `tokenizers` file: nanoKimi's byte-level BPE (every string encodable) or any tokenizer.json."""

    def __init__(self, tokenizer, boundary_token_id=None, source=None):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.boundary_token_id = boundary_token_id
        self.source = source  # the tokenizer.json it was read from, if it was given

    @classmethod
    def train(cls, texts, vocab_size, boundary, specials=()):
        """Byte-level BPE of `vocab_size` tokens learnt from the texts of an iterator (a bounded sample), with the
        special tokens `specials` (the chat tokens) after the boundary token."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[BOUNDARY] * boundary + list(specials),
            show_progress=False,
        )
        tok.train_from_iterator(short_words(texts), trainer)
        return cls(tok, tok.token_to_id(BOUNDARY) if boundary else None)

    @classmethod
    def from_file(cls, path, boundary_token=None):
        """A given tokenizer.json; its boundary token is `boundary_token` or the first of KNOWN_BOUNDARIES it has
        (None if neither: then only a one-document corpus can be prepared with it)."""
        tok = read_tokenizer_file(path)
        if boundary_token is not None and tok.token_to_id(boundary_token) is None:
            raise UserError(
                f"{path} has no token {boundary_token!r}: pass --boundary_token=TOKEN naming one of its "
                f"special tokens (e.g. its end-of-text token)"
            )
        found = next(
            (t for t in ([boundary_token] if boundary_token else KNOWN_BOUNDARIES) if tok.token_to_id(t) is not None),
            None,
        )
        return cls(tok, tok.token_to_id(found) if found else None, Path(path))

    def with_special_tokens(self, tokens):
        """This tokenizer with `tokens` added as special tokens where it lacks them (new ids after its vocabulary);
        no longer the given file. Returns the tokens added."""
        added = [t for t in tokens if self.tokenizer.token_to_id(t) is None]
        if added:
            self.tokenizer.add_special_tokens(added)
            self.vocab_size, self.source = self.tokenizer.get_vocab_size(), None
        return added

    def special_token_id(self, token):
        return self.tokenizer.token_to_id(token)

    def unknown(self, text):
        return []  # a tokenizer.json maps every string somewhere (bytes, or its unknown token)

    def encode(self, text):
        with self.encoding():
            return self.tokenizer.encode(text).ids

    def encode_batch(self, texts, drop_unknown=False):
        """Token ids of each text as arrays: the tokenizer's own ids, without its special-token template (nanoKimi
        marks documents with the boundary token itself), and a special token's text inside a document encoded as
        the text it is: a book that quotes "<|endoftext|>" holds no document boundary."""
        self.tokenizer.encode_special_tokens = True
        try:
            with self.encoding():
                return [
                    np.array(e.ids, dtype=np.int64)
                    for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
                ]
        finally:
            self.tokenizer.encode_special_tokens = False

    @contextlib.contextmanager
    def encoding(self):
        """The tokenizers library's failures to encode (a bare Exception, e.g. a word outside a WordLevel vocabulary
        that has no [UNK]) as one-line UserErrors."""
        try:
            yield
        except Exception as e:
            raise UserError(
                f"the tokenizer{f' {self.source}' if self.source else ''} cannot encode this text "
                f'({str(e)[:100]}): give it an unknown token (e.g. "unk_token": "[UNK]" in its '
                f"model) or use another tokenizer"
            ) from None

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def stream(self, prompt_ids=()):
        """One token id -> the text it completes ("" while a character is split across tokens), for printing tokens
        as they are sampled after `prompt_ids`: the library's incremental decoder, a constant cost per token where
        decoding the whole tail again for each one is quadratic. It reads the prompt first, so that the first token
        joins it as decoding them together would (a WordLevel vocabulary puts a space between words)."""
        from tokenizers.decoders import DecodeStream

        decoder = DecodeStream(skip_special_tokens=False)
        for token in prompt_ids:
            decoder.step(self.tokenizer, token)
        return lambda token: decoder.step(self.tokenizer, token) or ""

    def token_bytes(self):
        """Bytes of text each token id stands for (for bits per byte): special tokens none; a byte-level vocabulary
        spells each byte as one character of the token; otherwise the token decoded alone ("<0x0A>" byte fallback
        tokens are one byte)."""
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        byte_level = '"ByteLevel"' in json.dumps(json.loads(self.tokenizer.to_str()).get("decoder"))
        sizes = []
        for i in range(self.vocab_size):
            token = self.tokenizer.id_to_token(i)
            if token is None or token in special:
                sizes.append(0)
            elif byte_level:
                sizes.append(len(token))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                sizes.append(1)
            else:
                sizes.append(len(self.tokenizer.decode([i]).encode()))
        return sizes

    def meta(self):
        boundary = {} if self.boundary_token_id is None else {"boundary_token_id": self.boundary_token_id}
        return {"tokenizer": "bpe", "vocab_size": self.vocab_size} | boundary

    def save(self, folder):
        if self.source is not None:  # a given file as it is, byte for byte (tokenizers' own save may reorder it)
            shutil.copyfile(self.source, Path(folder) / "tokenizer.json")
        else:
            self.tokenizer.save(str(Path(folder) / "tokenizer.json"))
        write_json(Path(folder) / "meta.json", self.meta())


def read_tokenizer_file(path):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise UserError(f"tokenizer file {path} not found: pass --tokenizer=char, bpe or PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for missing or corrupt files
        raise UserError(
            f"cannot read {path} as a Hugging Face tokenizer ({str(e)[:100]}): pass a tokenizer.json "
            f"written by the tokenizers library"
        ) from None


def bpe_sample(corpus, budget, seed=0):
    """The texts BPE learns from: each document kept with probability budget / corpus size (seeded: the same
    corpus gives the same sample), each contributing at most 1% of the budget, until `budget` characters. A
    corpus within the budget is used whole. Yields texts; corpus.total_bytes None (a stream) takes the first
    documents."""
    rng = random.Random(seed)
    keep = 1.0 if not corpus.total_bytes else min(1.0, budget / corpus.total_bytes)
    cap, taken, kept, used = max(1, budget // 100), 0, False, 0
    for new_document, text in corpus:
        if new_document:
            kept, used = rng.random() < keep, 0
        if not kept or used >= cap:
            continue
        piece = text[: cap - used]
        used += len(piece)
        taken += len(piece)
        yield piece
        if taken >= budget:
            return


def short_words(texts, longest=LONGEST_WORD):
    """The texts, each cut after every `longest` characters of a run without whitespace (one text where there is
    none), for BPE to learn from: the pieces are separate texts to the trainer, so no word of more than `longest`
    characters reaches it, and no whitespace is added."""
    run = re.compile(rf"\S{{{longest}}}")
    for text in texts:
        start = 0
        for match in run.finditer(text):
            yield text[start : match.end()]
            start = match.end()
        yield text[start:]


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_meta(folder):
    finish_swap(folder)  # a prepare killed after its new dataset was complete: move it in before reading
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `nanokimi prepare` to create the dataset in {folder}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}): prepare the data again") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a dataset's meta.json: prepare the data again") from None
    return check_fields(
        meta,
        path,
        {"tokenizer": str, "vocab_size": int, "dtype?": str, "boundary_token_id?": int},
        fix="prepare the data again (or restore the file)",
    )


def load_tokenizer(folder):
    meta = read_meta(folder)
    boundary = meta.get("boundary_token_id")
    if boundary is not None and not 0 <= boundary < meta["vocab_size"]:
        raise UserError(
            f'{Path(folder) / "meta.json"}: "boundary_token_id" {boundary} is outside the '
            f"{meta['vocab_size']}-token vocabulary: prepare the data again"
        )
    if meta.get("tokenizer") == "char":
        if not isinstance(meta.get("chars"), list) or not all(isinstance(c, str) for c in meta["chars"]):
            raise UserError(f'{Path(folder) / "meta.json"} has no valid "chars" list: prepare the data again')
        if len(meta["chars"]) != meta["vocab_size"]:
            raise UserError(
                f'{Path(folder) / "meta.json"}: "chars" holds {len(meta["chars"])} characters but '
                f'"vocab_size" is {meta["vocab_size"]}: prepare the data again (or restore the file)'
            )
        return CharTokenizer(meta["chars"], boundary)
    if meta.get("tokenizer") == "bpe":
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} not found: prepare the data again")
        return HFTokenizer(read_tokenizer_file(path), boundary)
    raise UserError(f"{Path(folder) / 'meta.json'} names an unknown tokenizer {meta.get('tokenizer')!r}")


def tokenizer_fingerprint(folder):
    """Identifies a tokenizer by its files, to check that a checkpoint and a dataset agree."""
    digest = hashlib.sha256()
    meta = read_meta(folder)
    digest.update(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "chars") if k in meta}).encode())
    for path in tokenizer_files(folder)[1:]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tokenizer_files(folder):
    """The files that make up the tokenizer in `folder`: meta.json, and tokenizer.json where meta.json names one
    (a char vocabulary's tokenizer.json, written by `export` for transformers, is a copy, not part of it)."""
    names = TOKENIZER_FILES if read_meta(folder).get("tokenizer") != "char" else ("meta.json",)
    return [Path(folder) / name for name in names if (Path(folder) / name).is_file()]


def appended_tokens(base_folder, folder):
    """The special tokens the tokenizer of `folder` appends to the one of `base_folder` (the same ids for every token
    of the base, new ids after them: what `prepare chat --tokenizer_from=BASE` does), or None if it is no such
    extension. [] for the same tokenizer."""
    base, new = read_meta(base_folder), read_meta(folder)
    if base["tokenizer"] != new["tokenizer"] or base.get("boundary_token_id") != new.get("boundary_token_id"):
        return None
    if base["tokenizer"] == "char":
        old, chars = base.get("chars", []), new.get("chars", [])
        added = chars[len(old) :]
        return added if chars[: len(old)] == old and all(len(c) != 1 for c in added) else None
    try:
        old, files = (json.loads((Path(f) / "tokenizer.json").read_text()) for f in (base_folder, folder))
    except (OSError, ValueError):
        return None
    extra, added = old.pop("added_tokens", []), files.pop("added_tokens", [])
    return (
        [t["content"] for t in added[len(extra) :]]
        if old == files and added[: len(extra)] == extra and all(t.get("special") for t in added[len(extra) :])
        else None
    )


def check_same_tokenizer(checkpoint_dir, data_folder):
    """A UserError unless a checkpoint and a dataset share one tokenizer (token ids mean the same text)."""
    if tokenizer_fingerprint(checkpoint_dir) != tokenizer_fingerprint(data_folder):
        raise UserError(
            f"the tokenizer of checkpoint {checkpoint_dir} differs from the one of data {data_folder}: "
            f"prepare the data with the checkpoint's tokenizer (nanokimi prepare ... "
            f"--tokenizer_from={checkpoint_dir})"
        )


def copy_tokenizer(src, dst):
    for path in tokenizer_files(src):
        shutil.copy2(path, Path(dst) / path.name)


def build_tokenizer(kind, corpus, val_corpus, vocab_size, tokenizer_chars, boundary_token, progress, specials=()):
    """The tokenizer `kind` names (char, bpe or a tokenizer.json path), learnt from `corpus` where it is learnt, with
    the special tokens `specials` (the chat tokens) added. A boundary token exists unless the corpus (and val) are one
    document each."""
    boundary = not (corpus.single_document and (val_corpus is None or val_corpus.single_document))
    corpora = [corpus] + ([val_corpus] if val_corpus is not None else [])
    if kind == "char":
        chars = set()
        for c in corpora:
            with progress_bar(c, "characters", progress) as bar:
                for _, text in c:
                    chars.update(text)
                    bar.update(c.bytes_read - bar.n)
        if not chars:
            raise UserError(f"the corpus {describe(corpus)} is empty (no text): pass files with text in them")
        return CharTokenizer.train(chars, boundary, specials)
    if kind == "bpe":
        least = 257 + boundary + len(specials)
        if not vocab_size or vocab_size < least:
            raise UserError(
                f"--vocab_size must be at least {least} for byte-level BPE (256 bytes"
                f"{' + the boundary token' if boundary else ''}{' + the chat tokens' if specials else ''}"
                f" + merges), got {vocab_size}"
            )
        plain = corpus.total_bytes is not None and all(
            file_format(f) != "parquet" and f.suffix != ".gz" for f in corpus.files
        )
        most = least - 1 + (corpus.total_bytes if plain else 2**32)  # a merge joins two tokens: one per byte
        if vocab_size > min(most, 2**32):
            raise UserError(
                f"--vocab_size={vocab_size} exceeds what {describe(corpus)} can teach a byte-level BPE "
                f"({min(most, 2**32)}: 256 bytes + one merge per byte of text): lower --vocab_size"
            )
        with progress_bar(corpus, "BPE sample", progress) as bar:

            def sample():
                for text in bpe_sample(corpus, tokenizer_chars):
                    bar.update(corpus.bytes_read - bar.n)
                    yield text

            tokenizer = HFTokenizer.train(sample(), vocab_size, boundary, specials)
        if tokenizer.vocab_size < vocab_size:
            sampled = corpus.total_bytes is None or tokenizer_chars < corpus.total_bytes
            raise UserError(
                f"the text taught byte-level BPE only {tokenizer.vocab_size} tokens, fewer than "
                f"--vocab_size={vocab_size}: lower --vocab_size to {tokenizer.vocab_size} or "
                + (
                    f"let it learn from more than --tokenizer_chars={tokenizer_chars} characters"
                    if sampled
                    else "give it more text"
                )
            )
        return tokenizer
    if kind.endswith(".json") or Path(kind).is_file():
        tokenizer = HFTokenizer.from_file(kind, boundary_token)
        if boundary and tokenizer.boundary_token_id is None and not specials:
            raise UserError(
                f"{kind} has none of the end-of-text tokens {', '.join(KNOWN_BOUNDARIES[:4])}, ... to "
                f"separate documents: pass --boundary_token=TOKEN naming one of its special tokens"
            )
        tokenizer.with_special_tokens(specials)
        return tokenizer
    raise UserError(f"unknown tokenizer {kind!r}: use char, bpe or PATH/tokenizer.json")
