"""`nanokimi` command line: prepare, train, torchrun, sample, eval, plot, export, import, bench. Train settings come from
a named run, a TOML file or a model preset, and any `--field=value` on the command line, nanoGPT-style."""

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from .errors import OneLineParser, UserError


def train_command(target, extra):
    from .config import load_train_config
    from .train import lost_peer, train
    cfg, model_overrides = load_train_config(target, extra)
    try:
        summary = train(cfg, model_overrides)
    except (RuntimeError, ConnectionError) as e:
        if not lost_peer(e):
            raise
        raise UserError(f"this worker lost its connection to another one ({str(e).strip().splitlines()[0][:120]}); "
                        f"the run's last checkpoint is kept: continue with --resume") from None
    if summary:
        print(json.dumps(summary))


def torchrun_command(argv):
    """`nanokimi torchrun [torchrun options] train ...` = `torchrun [options] -m nanokimi train ...`, run through
    torchrun's own entry point, with its two ways of ending as one line instead of a traceback: a Ctrl-C/SIGTERM
    (the workers save a checkpoint first) and a failed worker (whose own one-line error is printed above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    if "train" not in argv:
        raise UserError("usage: nanokimi torchrun [torchrun's options, e.g. --nproc_per_node=2] train CONFIG "
                        "[--settings]")
    split = argv.index("train")
    nproc = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < split else "")
                  for i, a in enumerate(argv[:split]) if a.split("=")[0] in ("--nproc_per_node", "--nproc-per-node")),
                 None)
    if nproc is not None and not (nproc.isdigit() and int(nproc) > 0 or nproc in ("auto", "cpu", "gpu", "xpu")):
        raise UserError(f"--nproc_per_node={nproc}: give the number of processes per machine (e.g. 2), or auto, cpu, "
                        f"gpu")
    try:
        torchrun_main([*argv[:split], "-m", "nanokimi", *argv[split:]])
    except SignalException as e:
        print(f"interrupted ({e.sigval.name}): the workers saved the run's checkpoint; continue with --resume",
              file=sys.stderr)
        sys.exit(128 + e.sigval)
    except ChildFailedError as e:
        # a worker killed by a signal (the OOM killer, kill -9) is the cause, whatever the others then printed;
        # SIGTERM is torchrun's own way of ending the rest (a worker given SIGTERM by the user saves and exits 0)
        killed = sorted(rank for rank, failure in e.failures.items()
                        if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM)
        if killed:
            failure = e.failures[killed[0]]
            print(f"error: worker rank {killed[0]} was killed by {failure.signal_name()} and the others stopped "
                  f"with it; the run's last checkpoint is kept: continue with --resume", file=sys.stderr)
            sys.exit(128 - failure.exitcode)
        rank, failure = e.get_first_failure()
        print(f"error: worker rank {rank} failed with exit code {failure.exitcode} (its message is above)",
              file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


def bench_command(args):
    from .bench.cli import main as bench_main
    bench_main(args)


START = """start here:
  nanokimi prepare shakespeare_char              # TinyShakespeare (or --input=FILE), char-level, into data/
  nanokimi train shakespeare-char-cpu            # the CPU run, ~3 min on 2 cores (what `make demo` runs)
  nanokimi sample out/shakespeare-char-cpu       # its samples
your own documents: nanokimi prepare text --input=FOLDER --tokenizer=bpe --vocab_size=8192
`nanokimi COMMAND --help` for a command's options; README.md and docs/ for each topic."""


def build_parser(train_help=True):
    """The command line; train_help=False leaves out train's generated lists, whose imports (torch, the model) a
    `prepare` does not need (they were most of its start-up time)."""
    parser = OneLineParser(prog="nanokimi", description="Train, finetune and sample Kimi-K2-style models.",
                           epilog=START, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                               prog, max_help_position=14, width=120))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin/val.bin + tokenizer",
                       description="Prepare data, streamed in bounded memory. shakespeare_char: TinyShakespeare, "
                                   "char-level (downloads when online unless --input is given). text: local files, "
                                   "folders and globs of .txt (one document per file, or per --doc_separator), "
                                   ".jsonl/.json (a document per line) and .parquet (a document per row), also .gz. "
                                   "hf: a Hugging Face dataset, streamed (pip install datasets). Documents are joined "
                                   "by a boundary token; val is whole documents.")
    p.add_argument("dataset", help="shakespeare_char, text or hf")
    p.add_argument("--input", nargs="+", action="extend",
                   help="files, folders or globs (repeatable); for hf, local data_files for a builder such as json")
    p.add_argument("--out", help="output folder (default data/DATASET)")
    p.add_argument("--tokenizer",
                   help="char, bpe (byte-level, trained on a sample) or PATH/tokenizer.json (default char)")
    p.add_argument("--vocab_size", type=int, help="BPE vocabulary size (e.g. 4096)")
    p.add_argument("--tokenizer_chars", type=float,
                   help="characters of the corpus BPE learns from: a seeded sample, each document at most 1%% of it "
                        "(default 1e9)")
    p.add_argument("--boundary_token", help="the document boundary token of a given tokenizer.json (default: its "
                                            "<|endoftext|>, </s>, ...)")
    p.add_argument("--tokenizer_from", help="reuse the tokenizer of a dataset folder or checkpoint (to finetune)")
    p.add_argument("--drop_unknown", action="store_true",
                   help="with --tokenizer_from: drop characters the reused char vocabulary lacks (else an error)")
    p.add_argument("--text_field", default="text", help="the JSON field / Parquet column of the text (default text)")
    p.add_argument("--doc_separator", help="a string that separates documents inside .txt files, e.g. "
                                           "'<|endoftext|>'")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of documents held out for val, every 1/F-th (default 0.1); one document: its tokens")
    p.add_argument("--val_input", nargs="+", action="extend", help="the val documents instead (files, folders, globs)")
    p.add_argument("--dataset", dest="hf_name", help="hf: the dataset's name, e.g. roneneldan/TinyStories")
    p.add_argument("--name", dest="hf_config", help="hf: its configuration, e.g. sample-10BT")
    p.add_argument("--split", dest="hf_split", default="train", help="hf: its split (default train)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")

    if train_help:
        from .config import runs_help, settings_help  # the lists, generated from the runs and the config dataclasses
    p = sub.add_parser("train", help="train or finetune a model",
                       epilog=runs_help() + "\n\n" + settings_help() if train_help else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a named run (e.g. shakespeare-char-cpu, the tuned CPU run), a .toml file of "
                                   "your own (TrainConfig fields, [model] table) or a model preset. "
                                   "Any TrainConfig or model config field can be set as --name=value, e.g. "
                                   "--max_iters=2000 --lr=1e-3 --n_routed_experts=16. --resume continues the run in "
                                   "--out_dir; --init_from=CKPT finetunes from a checkpoint's weights. Under "
                                   "`nanokimi torchrun --nproc_per_node=N train ...` it runs DDP, with --fsdp FSDP2.")
    p.add_argument("config", help="named run, .toml file or model preset")

    p = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Stream samples from a checkpoint (a run's out_dir or its checkpoint folder).")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", help="text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (no MLA cache)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("eval", help="a checkpoint's loss, perplexity and bits per token/byte on fixed windows",
                       description="Evaluate a checkpoint (nanoKimi, baseline or imported HF) on BATCHES x BATCH_SIZE "
                                   "windows spread evenly over a split of a prepared dataset: the same tokens for "
                                   "every model. Prints one JSON line.")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="a folder from `nanokimi prepare`, with the model's tokenizer")
    p.add_argument("--block_size", type=int, help="window length (default: the training window, else the context)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--split", default="val", help="val or train")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("plot", help="redraw a run's pictures from its metrics.jsonl",
                       description="Redraw RUN/loss.png, RUN/experts.png (each MoE layer's share of routed tokens "
                                   "per expert over the steps) and RUN/max_logit.png (the largest attention logit "
                                   "against QK-Clip's tau) from RUN/metrics.jsonl, e.g. while the run trains.")
    p.add_argument("run", help="a training run's --out_dir")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face DeepseekV3ForCausalLM folder",
                       description="Export a Kimi checkpoint (folder or run out_dir) to OUT_DIR: config.json "
                                   "(deepseek_v3), model.safetensors with HF names, tokenizer.json.")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")

    p = sub.add_parser("import", help="read a Hugging Face DeepseekV3 folder into a nanoKimi checkpoint",
                       description="Import a DeepseekV3ForCausalLM / Kimi-K2 folder (safetensors only) as a nanoKimi "
                                   "checkpoint folder OUT_CKPT (MTP layers are skipped).")
    p.add_argument("hf_dir")
    p.add_argument("out_ckpt")

    sub.add_parser("torchrun", add_help=False,
                   help="torchrun [options] train ...: DDP/FSDP over processes; Ctrl-C saves and ends in one line")
    sub.add_parser("bench", help="benchmarks (moe-scaling, optim, compare, ...); `nanokimi bench --help`",
                   add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:  # a Ctrl-C while the commands import torch is caught too
        parser = build_parser(train_help=bool(argv) and argv[0] == "train")
        if not argv:  # what there is and where to start, rather than a missing-argument error
            return parser.print_help()
        if argv and argv[0] == "bench":
            return bench_command(argv[1:])
        if argv and argv[0] == "torchrun":
            return torchrun_command(argv[1:])
        args, extra = parser.parse_known_args(argv)
        if args.command == "train":
            return train_command(args.config, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "prepare":
            from .prepare import prepare
            out = args.out or f"data/{args.dataset}"
            source = args.tokenizer_from
            if source and not (Path(source) / "meta.json").is_file():
                from .checkpoint import resolve  # imports torch: only for a run's out_dir
                source = resolve(source)
            if not math.isfinite(args.val_fraction) or not math.isfinite(args.tokenizer_chars or 0):
                raise UserError("--val_fraction and --tokenizer_chars must be finite numbers")
            meta = prepare(args.dataset, out, args.input, args.tokenizer, args.vocab_size, source, args.drop_unknown,
                           args.text_field, args.doc_separator, args.val_fraction, args.val_input,
                           args.tokenizer_chars, args.boundary_token, args.hf_name,
                           args.hf_config,
                           args.hf_split, progress=not args.no_progress and sys.stderr.isatty())
            print(f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
                  f"({meta['train_documents']:,} + {meta['val_documents']:,} documents), {meta['tokenizer']} "
                  f"vocabulary of {meta['vocab_size']}"
                  + (f" ({meta['dropped']} unknown characters dropped)" if meta.get("dropped") else ""))
        elif args.command == "sample":
            from .sample import sample
            sample(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   args.seed, args.num_samples, not args.no_cache, args.device)
        elif args.command == "eval":
            from .evaluate import main as eval_main
            eval_main(args)
        elif args.command == "plot":
            from .checkpoint import Checkpoint, find
            from .plots import plot_run
            settings = (Checkpoint(args.run).train_config or {}) if find(args.run) is not None else {}
            tau = settings.get("qk_clip_tau") if settings.get("optimizer") == "muonclip" else None
            for path in plot_run(args.run, tau):
                print(f"wrote {path}")
        elif args.command == "export":
            from .hf import export
            print(f"wrote {export(args.checkpoint, args.out_dir)}")
        elif args.command == "import":
            from .hf import import_folder
            print(f"wrote {import_folder(args.hf_dir, args.out_ckpt)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`nanokimi sample ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail again
        sys.exit(0)
