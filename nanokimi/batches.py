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
            raise UserError(
                f'{self.folder / "meta.json"}: "dtype" is {self.meta.get("dtype")!r}, expected '
                f'"uint16" or "uint32" (token ids): prepare the data again'
            )
        self.tokenizer = load_tokenizer(folder)
        self.splits = {}
        for split in ("train", "val"):
            path = self.folder / f"{split}.bin"
            if not path.is_file():
                raise UserError(f"{path} not found: run `nanokimi prepare` again for {folder}")
            size, itemsize = path.stat().st_size, np.dtype(self.meta["dtype"]).itemsize
            n, recorded = size // itemsize, self.meta.get(f"{split}_tokens")
            if size % itemsize or isinstance(recorded, int) and recorded != n:
                raise UserError(
                    f"{path} is {size:,} bytes, not the {recorded if recorded is not None else 'whole'} "
                    f"{self.meta['dtype']} token ids meta.json records: it is damaged or truncated, "
                    f"prepare the data again"
                )
            self.check_length(path, n, block_size)
            self.splits[split] = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        self.block_size = block_size

    def check_length(self, path, n, block_size):
        if n < block_size + 1:
            raise UserError(
                f"{path} holds {n} tokens, fewer than block_size+1 = {block_size + 1}: use more text or a "
                f"smaller --block_size"
            )

    @functools.cached_property
    def token_bytes(self):
        """UTF-8 bytes of each token id's text, as a tensor (for bits per byte)."""
        return torch.tensor(self.tokenizer.token_bytes(), dtype=torch.float64)

    def batch(self, split, batch_size, generator):
        """batch_size windows at random starts drawn from `generator`."""
        starts = torch.randint(len(self.splits[split]) - self.block_size, (batch_size,), generator=generator)
        return self.windows(split, starts.tolist())

    def eval_starts(self, split, count):
        """`count` window starts spread evenly over a split (a window reads block_size + 1 tokens): no sampling, so
        any two models evaluated with the same split, window length and count see exactly the same tokens."""
        return torch.linspace(0, len(self.splits[split]) - self.block_size - 1, count).round().long().tolist()

    def windows(self, split, starts):
        """(inputs, next-token targets), [len(starts), block_size] each, of the windows starting at `starts`."""
        data = self.splits[split]
        w = self.checked(split, np.stack([data[i : i + self.block_size + 1] for i in starts]))
        return w[:, :-1], w[:, 1:]

    def checked(self, split, rows):
        """Token rows as an int64 tensor, their ids checked against the vocabulary here, batch by batch: a damaged file
        fails in one line, and no start reads a whole (perhaps 10 GB) token file."""
        w = torch.from_numpy(rows.astype(np.int64))
        if w.numel() and (largest := int(w.max())) >= self.tokenizer.vocab_size:
            raise UserError(
                f"{self.folder / split}.bin holds token id {largest}, outside its "
                f"{self.tokenizer.vocab_size}-token vocabulary: the file is damaged (or not from this "
                f"tokenizer), prepare the data again"
            )
        return w


class ChatData(TokenData):
    """A chat dataset (prepare_chat.py): rows that start where a conversation starts and hold it and the whole
    conversations after it that fit (packed in order), padded to block_size + 1 tokens; a target trains only where
    the assistant wrote it (elsewhere -1: the loss ignores it). A conversation longer than a row is cut at a turn
    boundary: the replies that end within the row train, none in part; one whose first reply does not end within the
    row is left out. `notes` says how many of each."""

    def __init__(self, folder, block_size):
        super().__init__(folder, block_size)
        self.pad_id = self.tokenizer.special_token_id("<|im_end|>")
        self.masks, self.starts, self.rows, self.notes = {}, {}, {}, []
        for split, tokens in self.splits.items():
            n = len(tokens)
            mask_path, starts_path = self.folder / f"{split}_mask.bin", self.folder / f"{split}_starts.bin"
            for path, size in ((mask_path, n), (starts_path, 8 * self.meta.get(f"{split}_documents", 0))):
                if not path.is_file() or path.stat().st_size != size:
                    raise UserError(
                        f"{path} is {'missing' if not path.is_file() else 'damaged or truncated'}: "
                        f"prepare the chat data again"
                    )
            self.masks[split] = np.memmap(mask_path, dtype=np.uint8, mode="r")
            starts = np.fromfile(starts_path, dtype=np.uint64).astype(np.int64)
            if len(starts) == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= n:
                raise UserError(
                    f"{starts_path} is damaged (conversation starts out of order): prepare the chat data again"
                )
            self.starts[split] = np.append(starts, n)  # conversation i is tokens [starts[i], starts[i + 1])
            first = first_reply_end(tokens, self.masks[split], self.starts[split], self.pad_id)
            usable = (first >= 1) & (first <= block_size)  # a row's targets are its tokens 1..block_size
            self.rows[split] = np.flatnonzero(usable)
            long = int((np.diff(self.starts[split]) > block_size + 1).sum())
            if long:
                self.notes.append(
                    f"{long} of {len(starts)} {split} conversations are longer than block_size + 1 = "
                    f"{block_size + 1} tokens: only their replies that end within them train (raise "
                    f"--block_size to keep them whole)"
                )
            if (~usable).sum():
                self.notes.append(
                    f"{int((~usable).sum())} {split} conversations have no reply that ends within their first "
                    f"{block_size + 1} tokens: left out"
                )
            if not len(self.rows[split]):
                raise UserError(
                    f"no {split} conversation of {folder} has an assistant reply that ends within its first "
                    f"{block_size + 1} tokens: raise --block_size"
                )

    def check_length(self, path, n, block_size):
        pass  # rows are padded: a split may be shorter than one

    def batch(self, split, batch_size, generator):
        """batch_size rows at random conversations drawn from `generator`."""
        picks = torch.randint(len(self.rows[split]), (batch_size,), generator=generator)
        return self.windows(split, self.rows[split][picks.numpy()].tolist())

    def eval_starts(self, split, count):
        """`count` conversations spread evenly over the split's (the same ones at every eval)."""
        rows = self.rows[split]
        return rows[torch.linspace(0, len(rows) - 1, count).round().long().numpy()].tolist()

    def windows(self, split, conversations):
        """(inputs, targets), [len(conversations), block_size] each, of the rows that start at these conversations;
        targets are -1 where nothing trains."""
        tokens, mask, bounds, width = self.splits[split], self.masks[split], self.starts[split], self.block_size + 1
        rows = np.full((len(conversations), width), self.pad_id, dtype=np.int64)
        trains = np.zeros((len(conversations), width), dtype=bool)
        for r, c in enumerate(conversations):
            start = bounds[c]
            # the end of the last whole conversation that fits, else (the first is longer) the row's width
            fits = np.searchsorted(bounds, start + width, side="right") - 1
            end = bounds[fits] if fits > c else start + width
            rows[r, : end - start], trains[r, : end - start] = tokens[start:end], mask[start:end]
            if fits == c:  # cut at the end of its last reply that fits: no reply trains in part
                ends = np.flatnonzero(trains[r] & (rows[r] == self.pad_id))
                trains[r, ends[-1] + 1 if len(ends) else 0 :] = False
        w = self.checked(split, rows)
        return w[:, :-1], w[:, 1:].masked_fill(torch.from_numpy(~trains[:, 1:]), -1)


def first_reply_end(tokens, mask, bounds, end_id, chunk=1 << 16):
    """Per conversation (tokens [bounds[i], bounds[i + 1])), the offset in it of its first reply's end (the first
    trained <|im_end|>, id `end_id`), or -1; read `chunk` conversations at a time."""
    first = np.full(len(bounds) - 1, -1, dtype=np.int64)
    for c in range(0, len(bounds) - 1, chunk):
        starts, ends = bounds[c : c + chunk + 1][:-1], bounds[c + 1 : c + chunk + 1]
        span = slice(starts[0], ends[-1])
        positions = np.flatnonzero((mask[span] == 1) & (tokens[span] == end_id)) + starts[0]
        if len(positions):
            at = positions[np.minimum(np.searchsorted(positions, starts), len(positions) - 1)]
            first[c : c + len(starts)] = np.where((at >= starts) & (at < ends), at - starts, -1)
    return first


def open_data(folder, block_size):
    """The prepared dataset in `folder`: a chat dataset (its meta.json says so) or text."""
    chat = Path(folder).is_dir() and "chat" in read_meta(folder)
    return (ChatData if chat else TokenData)(folder, block_size)
