"""train or finetune a model

Train a named run (e.g. shakespeare-char-cpu, the tuned CPU run), a .toml file of your own (TrainConfig fields,
[model] table) or a model preset. Any TrainConfig or model config field can be set as --name=value, e.g.
--max_iters=2000 --lr=1e-3 --n_routed_experts=16. --resume continues the run in --out_dir; --init_from=CKPT finetunes
from a checkpoint's weights. Under `nanokimi torchrun --nproc_per_node=N train ...` it runs DDP, with --fsdp FSDP2."""

import argparse
import ast
import dataclasses
import inspect
import json
import os
import re

from ..errors import UserError

# The --name=value flags are parsed here (and the help listing every setting written); config.py assembles the run
# from them, train.py trains.
NAME = "train"
OPEN_SETTINGS = True  # any TrainConfig or model field as --name=value: run gets the flags argparse does not know


class FullHelp(argparse.Action):
    """--help with the named runs and every setting: lists generated from the runs and the config dataclasses, whose
    imports (torch, the model) are made only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show this help, the named runs and every setting")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = runs_help() + "\n\n" + settings_help()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the lists, line by line
        parser.print_help()
        parser.exit()


def add_arguments(p):
    p.add_argument("-h", "--help", action=FullHelp)  # in place of argparse's own
    p.add_argument("config", help="named run, .toml file or model preset")


def run(args, settings):
    from ..config import load_train_config
    from ..processes import exit_worker, lost_peer
    from ..train import train

    cfg, model_overrides = load_train_config(args.config, parse_overrides(settings))
    try:
        summary = train(cfg, model_overrides)
    except (RuntimeError, ConnectionError) as e:
        if not lost_peer(e):
            raise
        raise UserError(
            f"this worker lost its connection to another one ({str(e).strip().splitlines()[0][:120]}); "
            f"the run's last checkpoint is kept: continue with --resume"
        ) from None
    if summary:
        print(json.dumps(summary))
    if "RANK" in os.environ:  # a torchrun worker, its process group already left
        exit_worker()


# ---- the flags: --name=value settings, parsed here and checked by config.py ----


def parse_value(raw):
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'none' -> None, '{"type": "yarn"}' -> dict, else the string."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low.lstrip("+-") in ("nan", "inf", "infinity"):  # every spelling, so that the finite check names it
        return float(low)
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError):
            pass
    return raw


def parse_overrides(args):
    """['--max_iters=10', '--resume'] -> {'max_iters': 10, 'resume': True}."""
    out = {}
    for arg in args:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: settings look like --name=value")
        key, sep, value = arg[2:].partition("=")
        out[key] = parse_value(value) if sep else True
    return out


def settings_help():
    """Every --name=value setting of `nanokimi train` with its default and the comment beside it in the source: the
    help text cannot drift from the dataclasses."""
    from ..baseline import GPTConfig
    from ..config import TrainConfig
    from ..model import KimiConfig

    sections = []
    for title, cls in (
        ("training (TrainConfig)", TrainConfig),
        ("nanoKimi model (KimiConfig)", KimiConfig),
        ("nanoGPT baseline model (GPTConfig)", GPTConfig),
    ):
        comments = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
        lines = [
            (f"  --{f.name}={f.default}".ljust(35) + " " + comments.get(f.name, "")).rstrip()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        ]
        sections.append(f"{title}:\n" + "\n".join(lines))
    return "\n\n".join(sections)


def runs_help():
    """The named runs and the bare model presets, for `nanokimi train --help`."""
    from ..config import named_runs
    from ..models import BASELINE_PRESETS, PRESETS

    runs = "\n".join(f"  {name:<27} {purpose}" for name, purpose in named_runs().items())
    bare = [p for p in [*PRESETS, *BASELINE_PRESETS] if p not in named_runs()]
    return (
        f"named runs (a run's settings and model; from any folder):\n{runs}\n\nmodel presets without a run of "
        f"their own (trained with the defaults below): {', '.join(bare)}"
    )
