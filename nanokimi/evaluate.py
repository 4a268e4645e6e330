"""Evaluation on fixed windows: the trainer's evals, `nanokimi eval CHECKPOINT` and the benchmarks' one evaluator.

The windows are spread evenly over a split (no sampling), so any two models evaluated with the same split, window
length and count see exactly the same tokens: that is what makes their losses comparable."""

import contextlib
import math

import torch

from .checkpoint import load_model
from .batches import open_data
from .errors import UserError
from .hardware import check_device
from .tokenizer import check_same_tokenizer


@torch.no_grad()
def evaluate(model, data, split, count, batch_size, device="cpu", autocast=contextlib.nullcontext):
    """Mean next-token loss of `model` over `count` fixed windows of data.block_size tokens of `split` (of a chat
    dataset: its rows, scored on the assistant's tokens alone), with perplexity, bits per token and bits per byte
    (the text's UTF-8 bytes: comparable across tokenizers)."""
    was_training = model.training
    model.eval()
    starts = data.eval_starts(split, count)
    nats, tokens, text_bytes = 0.0, 0, 0.0
    for i in range(0, count, batch_size):
        x, y = data.windows(split, starts[i : i + batch_size])
        with autocast():
            loss = model(x.to(device), y.to(device))[1]
        scored = y[y >= 0]  # -1: a target that does not train (a chat row's prompt and padding)
        nats += loss.item() * scored.numel()
        tokens += scored.numel()
        text_bytes += data.token_bytes[scored].sum().item()
    model.train(was_training)
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": nats / math.log(2) / text_bytes,
        "tokens": tokens,
    }


def evaluate_checkpoint(path, data_dir, block_size=None, batches=200, batch_size=12, split="val", device="cpu"):
    """`nanokimi eval`: a checkpoint's loss on `batches` x `batch_size` fixed windows of `split` of a prepared dataset,
    `block_size` tokens each (default: the window the model was trained on, else its context)."""
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}: use val or train")
    if batches <= 0 or batch_size <= 0:
        raise UserError(f"need --batches > 0 and --batch_size > 0, got {batches} and {batch_size}")
    check_device(device)
    model, tokenizer, ckpt = load_model(path, device)
    if block_size is None:
        block_size = min((ckpt.train_config or {}).get("block_size", model.context_length), model.context_length)
    if not 0 < block_size <= model.context_length:
        raise UserError(f"--block_size={block_size} is not within this model's context (1..{model.context_length})")
    data = open_data(data_dir, block_size)
    if tokenizer is not None:  # an imported HF model may come without one
        check_same_tokenizer(ckpt.path, data.folder)
    if data.tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"data {data.folder} has a {data.tokenizer.vocab_size}-token vocabulary, more than this "
            f"model's {model.config.vocab_size}: evaluate on data prepared with the model's tokenizer"
        )
    result = evaluate(model, data, split, batches * batch_size, batch_size, device)
    return {
        "checkpoint": str(ckpt.path),
        "data": str(data.folder),
        "split": split,
        "block_size": block_size,
        "windows": batches * batch_size,
    } | result
