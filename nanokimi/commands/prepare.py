"""tokenize a corpus into train.bin/val.bin + tokenizer

Prepare data, streamed in bounded memory. shakespeare_char: TinyShakespeare, char-level (downloads when online unless
--input is given). text: local files, folders and globs of .txt (one document per file, or per --doc_separator),
.jsonl/.json (a document per line) and .parquet (a document per row), also .gz. hf: a Hugging Face dataset, streamed
(pip install datasets). Documents are joined by a boundary token; val is whole documents. chat: conversations (OpenAI
messages or ShareGPT conversations; .jsonl, .json, .parquet, or --dataset) in Kimi-K2's chat template, with the
assistant's tokens marked for the loss (docs/chat.md)."""

import math
import sys
from pathlib import Path

from ..errors import UserError


NAME = "prepare"
# the options passed to prepare() as they are (each flag's dest is prepare's parameter): the documents', the tokenizer's
DOCUMENT_OPTIONS = ("text_field", "doc_separator", "val_inputs", "val_fraction", "hf_name", "hf_config", "hf_split")
TOKENIZER_OPTIONS = ("tokenizer", "vocab_size", "tokenizer_chars", "boundary_token", "drop_unknown")


def add_arguments(p):
    p.add_argument("dataset", help="shakespeare_char, text, hf or chat")
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        help="files, folders or globs (repeatable); for hf, local data_files for a builder such as json",
    )
    p.add_argument("--out", help="output folder (default data/DATASET)")
    p.add_argument(
        "--tokenizer", help="char, bpe (byte-level, trained on a sample) or PATH/tokenizer.json (default char)"
    )
    p.add_argument("--vocab_size", type=int, help="BPE vocabulary size (e.g. 4096)")
    p.add_argument(
        "--tokenizer_chars",
        type=float,
        help="characters of the corpus BPE learns from: a seeded sample, each document at most 1%% of it (default 1e9)",
    )
    p.add_argument(
        "--boundary_token",
        help="the document boundary token of a given tokenizer.json (default: its <|endoftext|>, </s>, ...)",
    )
    p.add_argument("--tokenizer_from", help="reuse the tokenizer of a dataset folder or checkpoint (to finetune)")
    p.add_argument(
        "--drop_unknown",
        action="store_true",
        help="with --tokenizer_from: drop characters the reused char vocabulary lacks (else an error)",
    )
    p.add_argument("--text_field", help="the JSON field / Parquet column of the text (default text)")
    p.add_argument("--doc_separator", help="a string that separates documents inside .txt files, e.g. '<|endoftext|>'")
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="share of documents held out for val, every 1/F-th (default 0.1); one document: its tokens",
    )
    p.add_argument(
        "--val_input",
        dest="val_inputs",
        nargs="+",
        action="extend",
        help="the val documents instead (files, folders, globs)",
    )
    p.add_argument("--dataset", dest="hf_name", help="hf: the dataset's name, e.g. roneneldan/TinyStories")
    p.add_argument("--name", dest="hf_config", help="hf: its configuration, e.g. sample-10BT")
    p.add_argument("--split", dest="hf_split", default="train", help="hf: its split (default train)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args):
    from ..prepare import prepare

    out = args.out or f"data/{args.dataset}"
    source = args.tokenizer_from
    if source and not (Path(source) / "meta.json").is_file():
        from ..checkpoint import resolve  # imports torch: only for a run's out_dir

        source = resolve(source)
    if not math.isfinite(args.val_fraction) or not math.isfinite(args.tokenizer_chars or 0):
        raise UserError("--val_fraction and --tokenizer_chars must be finite numbers")
    meta = prepare(
        args.dataset,
        out,
        args.input,
        tokenizer_dir=source,
        progress=not args.no_progress and sys.stderr.isatty(),
        **{name: getattr(args, name) for name in DOCUMENT_OPTIONS + TOKENIZER_OPTIONS},
    )
    print(
        f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['train_documents']:,} + {meta['val_documents']:,} documents), {meta['tokenizer']} "
        f"vocabulary of {meta['vocab_size']}"
        + (f" ({meta['dropped']} unknown characters dropped)" if meta.get("dropped") else "")
    )
    if meta.get("added_chat_tokens"):
        print(
            f"note: the {meta['added_chat_tokens']} chat tokens were added to the tokenizer of {source}: "
            f"`nanokimi train ... --init_from={source}` grows the model's embeddings to match"
        )
    if meta.get("chat", {}).get("skipped_without_reply"):
        print(
            f"note: {meta['chat']['skipped_without_reply']} conversations without an assistant message were "
            f"skipped (nothing in them trains)"
        )
