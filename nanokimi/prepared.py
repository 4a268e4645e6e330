"""A prepared dataset's folder as `prepare` writes it: its files, replaced as one set (new_dataset), and the width
of its token ids. prepare.py writes text datasets into it, prepare_chat.py chat datasets."""

import contextlib
import shutil
from pathlib import Path

import numpy as np

from .errors import UserError, write_failure
from .output_folders import SWAP_DONE, SWAP_FOLDER, command_lock, commit_swap, finish_swap
from .tokenizer import TOKENIZER_FILES, copy_tokenizer, read_meta, write_json

# a chat dataset has these too: each token's loss mask and where each conversation starts (prepare_chat.py)
CHAT_FILES = ("train_mask.bin", "val_mask.bin", "train_starts.bin", "val_starts.bin")
DATASET_FILES = ("train.bin", "val.bin", *CHAT_FILES, *TOKENIZER_FILES)


@contextlib.contextmanager
def new_dataset(out):
    """The folder to write a dataset's files into (out/SWAP_FOLDER): when the block ends they replace the previous
    dataset of `out` as one set (output_folders.commit_swap); a failure or Ctrl-C before then leaves the previous one
    whole, a kill after it leaves the new one, finished by the next reader."""
    out = Path(out)
    tmp = out / SWAP_FOLDER
    with command_lock(out, "prepare"):  # a second prepare into `out` would delete this one's files
        try:
            finish_swap(out)  # a previous prepare killed after it completed
            shutil.rmtree(tmp, ignore_errors=True)  # ... or before: its partial files
            tmp.mkdir(parents=True)
            yield tmp
            commit_swap(out, DATASET_FILES)  # the new dataset is the one now: a kill is finished by the next reader
        except OSError as e:
            raise UserError(
                f"could not write the dataset to {out} ({write_failure(e)}): free some space or pick a writable --out"
            ) from None
        finally:
            if not (tmp / SWAP_DONE).exists():
                shutil.rmtree(tmp, ignore_errors=True)


def token_dtype(tokenizer):
    return np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32


def save_dataset_meta(folder, tokenizer, tokenizer_dir, dtype, **counts):
    """The tokenizer and meta.json of a dataset written into `folder`: the tokenizer copied from tokenizer_dir when
    it came from there unchanged (its files stay byte-identical), else saved; meta.json its meta, the token dtype and
    `counts`. Returns the meta."""
    copy_tokenizer(tokenizer_dir, folder) if tokenizer_dir is not None else tokenizer.save(folder)
    meta = read_meta(folder) | tokenizer.meta() | {"dtype": np.dtype(dtype).name} | counts
    write_json(Path(folder) / "meta.json", meta)
    return meta
