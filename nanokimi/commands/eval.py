"""a checkpoint's loss, perplexity and bits per token/byte on fixed windows

Evaluate a checkpoint (nanoKimi, baseline or imported HF) on BATCHES x BATCH_SIZE windows spread evenly over a split
of a prepared dataset: the same tokens for every model. Prints one JSON line."""

import json

from . import add_checkpoint_arguments

NAME = "eval"


def add_arguments(p):
    add_checkpoint_arguments(p)
    p.add_argument("--data", required=True, help="a folder from `nanokimi prepare`, with the model's tokenizer")
    p.add_argument("--block_size", type=int, help="window length (default: the training window, else the context)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--split", default="val", help="val or train")


def run(args):
    from ..evaluate import evaluate_checkpoint

    print(
        json.dumps(
            evaluate_checkpoint(
                args.checkpoint, args.data, args.block_size, args.batches, args.batch_size, args.split, args.device
            )
        )
    )
