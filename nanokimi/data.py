"""Batches for training and evaluation: [B, block_size] windows read from the token files of a prepared dataset
(prepare.py writes them), as nanoGPT's train.py reads its memmaps."""

import functools
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .tokenizer import load_tokenizer, read_meta


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
            size, itemsize = path.stat().st_size, np.dtype(self.meta["dtype"]).itemsize
            n, recorded = size // itemsize, self.meta.get(f"{split}_tokens")
            if size % itemsize or isinstance(recorded, int) and recorded != n:
                raise UserError(f"{path} is {size:,} bytes, not the {recorded if recorded is not None else 'whole'} "
                                f"{self.meta['dtype']} token ids meta.json records: it is damaged or truncated, "
                                f"prepare the data again")
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
        """(inputs, next-token targets), [len(starts), block_size] each, of the windows starting at `starts`. Their
        ids are checked against the vocabulary here, batch by batch: a damaged file fails in one line, and no start
        reads a whole (perhaps 10 GB) token file."""
        data = self.splits[split]
        w = torch.from_numpy(np.stack([data[i:i + self.block_size + 1] for i in starts]).astype(np.int64))
        if w.numel() and (largest := int(w.max())) >= self.tokenizer.vocab_size:
            raise UserError(f"{self.folder / split}.bin holds token id {largest}, outside its "
                            f"{self.tokenizer.vocab_size}-token vocabulary: the file is damaged (or not from this "
                            f"tokenizer), prepare the data again")
        return w[:, :-1], w[:, 1:]
