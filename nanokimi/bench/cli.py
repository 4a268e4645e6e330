"""`nanokimi bench ...`: one subcommand per benchmark; options every benchmark of a kind shares come from parent
parsers."""

import argparse
from pathlib import Path

from . import __doc__ as overview
from .speed import bench_inference, bench_moe_scaling, bench_qk_overhead
from .training import bench_compare, bench_optim


def parent(*options):
    """A parser holding shared options, each (flag, keyword arguments)."""
    p = argparse.ArgumentParser(add_help=False)
    for flag, kwargs in options:
        p.add_argument(flag, **kwargs)
    return p


def build_parser():
    model = parent(("--preset", dict(default="shakespeare-char-cpu", help="nanoKimi preset")))
    batch = parent(("--batch_size", dict(type=int, default=32)), ("--block_size", dict(type=int, default=128)))
    training = parent(("--data", dict(default="data/shakespeare_char", help="a folder from `nanokimi prepare`")),
                      ("--eval_iters", dict(type=int, default=10, help="batches per split and evaluation")))

    parser = argparse.ArgumentParser(prog="nanokimi bench", description=overview,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default="BENCHMARKS.md", help="markdown file whose section is (re)written")
    sub = parser.add_subparsers(dest="bench", required=True)

    p = sub.add_parser("moe-scaling", parents=[model], help="MoE layer cost vs number of experts at fixed top-k")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    p.set_defaults(run=bench_moe_scaling)

    p = sub.add_parser("inference", parents=[model],
                       help="decode tokens/s, peak memory, KV bytes per token: MLA cache, none, MHA")
    p.add_argument("--baseline", default="gpt-shakespeare-char-cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=bench_inference)

    p = sub.add_parser("optim", parents=[model, batch, training],
                       help="AdamW vs Muon vs MuonClip, plus a high-LR stress run")
    p.add_argument("--out", default="out/bench-optim")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3], help="lr sweep, per optimizer")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.6],
                   help="shorter Muon runs, as fractions of --steps")
    p.add_argument("--eval_interval", type=int, default=25)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--stress_lr", type=float, default=0.03)
    p.add_argument("--stress_steps", type=int, default=200)
    p.add_argument("--tau", type=float, default=100.0)
    p.set_defaults(run=bench_optim)

    p = sub.add_parser("qk-overhead", parents=[model, batch],
                       help="training-step cost of MuonClip's max-logit recording and clipping")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=6, help="interleaved measurements of each optimizer")
    p.set_defaults(run=bench_qk_overhead)

    p = sub.add_parser("compare", parents=[model, batch, training],
                       help="nanoKimi vs the nanoGPT baseline at equal budget, ablations, throughput")
    p.add_argument("--out", default="out/bench-compare")
    p.add_argument("--budget_s", type=float, default=160.0,
                   help="training seconds per run (160: the whole benchmark takes ~40 min on 2 CPU cores)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--evals", type=int, default=20, help="evaluations per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny budget (a smoke test of the report, <= 3 min)")
    p.set_defaults(run=bench_compare)
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    args.command = " ".join(["nanokimi bench", *argv])  # stamped on the report section
    args.assets = Path(args.report).parent / "assets"  # plots sit beside the report, linked as assets/NAME.png
    if getattr(args, "quick", False):
        args.budget_s, args.seeds, args.eval_iters, args.evals = 4.0, 1, 2, 2
    args.run(args)
