"""`nanokimi train CONFIG [--name=value ...]`: train or finetune (config.py assembles the run, train.py trains)."""

import argparse
import json
import os

from ..errors import UserError

NAME = "train"
OPEN_SETTINGS = True  # any TrainConfig or model field as --name=value: run gets the flags argparse does not know


class FullHelp(argparse.Action):
    """--help with the named runs and every setting: lists generated from the runs and the config dataclasses, whose
    imports (torch, the model) are made only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show this help, the named runs and every setting")

    def __call__(self, parser, namespace, values, option_string=None):
        from ..config import runs_help, settings_help

        parser.epilog = runs_help() + "\n\n" + settings_help()
        parser.print_help()
        parser.exit()


def add_parser(sub):
    p = sub.add_parser(
        NAME,
        help="train or finetune a model",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a named run (e.g. shakespeare-char-cpu, the tuned CPU run), a .toml file of "
        "your own (TrainConfig fields, [model] table) or a model preset. "
        "Any TrainConfig or model config field can be set as --name=value, e.g. "
        "--max_iters=2000 --lr=1e-3 --n_routed_experts=16. --resume continues the run in "
        "--out_dir; --init_from=CKPT finetunes from a checkpoint's weights. Under "
        "`nanokimi torchrun --nproc_per_node=N train ...` it runs DDP, with --fsdp FSDP2.",
    )
    p.add_argument("-h", "--help", action=FullHelp)
    p.add_argument("config", help="named run, .toml file or model preset")
    return p


def run(args, settings):
    from ..config import load_train_config
    from ..processes import exit_worker, lost_peer
    from ..train import train

    cfg, model_overrides = load_train_config(args.config, settings)
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
