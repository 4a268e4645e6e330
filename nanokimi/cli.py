"""`nanokimi` command line: prepare, train, torchrun, sample, chat, serve, eval, plot, export, import, bench. Train
settings come from a named run, a TOML file or a model preset, and any `--field=value` on the command line,
nanoGPT-style."""

import argparse
import os
import sys

from .commands import bench, chat, export, import_, plot, prepare, sample, serve, torchrun, train
from .commands import eval as evaluate
from .errors import OneLineParser, UserError

# in `nanokimi`'s list order
COMMANDS = (prepare, train, torchrun, sample, chat, serve, evaluate, plot, export, import_, bench)


START = """start here:
  nanokimi prepare shakespeare_char              # TinyShakespeare (or --input=FILE), char-level, into data/
  nanokimi train shakespeare-char-cpu            # the CPU run, ~3 min on 2 cores (what `make demo` runs)
  nanokimi sample out/shakespeare-char-cpu       # its samples
your own documents: nanokimi prepare text --input=FOLDER --tokenizer=bpe --vocab_size=8192
`nanokimi COMMAND --help` for a command's options; README.md and docs/ for each topic."""


def build_parser():
    """The command line: every command's parser, its help from its module's docstring and its options from the
    module's add_arguments."""
    parser = OneLineParser(
        prog="nanokimi",
        description="Train, finetune and sample Kimi-K2-style models.",
        epilog=START,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=14, width=120),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for command in COMMANDS:
        summary, _, description = command.__doc__.partition("\n\n")
        # "resolve": a command may replace argparse's own -h (train lists every setting)
        p = sub.add_parser(command.NAME, help=summary, description=description, conflict_handler="resolve")
        if hasattr(command, "add_arguments"):
            command.add_arguments(p)
        p.set_defaults(module=command)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:  # a Ctrl-C while the commands import torch is caught too
        parser = build_parser()
        if not argv:  # what there is and where to start, rather than a missing-argument error
            return parser.print_help()
        passed = {c.NAME: c for c in COMMANDS if getattr(c, "PASS_THROUGH", False)}.get(argv[0])
        if passed is not None:  # another parser reads the rest of the line
            return passed.run(argv[1:])
        args, extra = parser.parse_known_args(argv)
        if getattr(args.module, "OPEN_SETTINGS", False):
            return args.module.run(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.module.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`nanokimi sample ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail again
        sys.exit(0)
