"""`nanokimi bench ...`: one subcommand per benchmark; options every benchmark of a kind shares come from parent
parsers."""

import argparse
import math
import os
from pathlib import Path

from ..batches import TokenData
from ..errors import OneLineParser, UserError, write_failure
from ..models import BASELINE_PRESETS, PRESETS
from . import __doc__ as overview
from .ablation import CONTENDERS, bench_ablate
from .chat import bench_chat
from .corpora import bench_prepare
from .long_context import bench_long_context
from .memory import bench_memory
from .serve import bench_serve
from .speed import bench_inference, bench_moe_scaling, bench_step
from .training import RECIPES, bench_compare, bench_optim, bench_sweep


def shape(text):
    """'12x64' -> (12, 64)."""
    try:
        batch, block = (int(n) for n in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxBLOCK, e.g. 12x64") from None
    return batch, block


def positive(text, least=1):
    """An integer >= least (1: counts and lengths)."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive integer" if least == 1 else f"{text!r} is not an integer >= {least}"
        )
    return value


def two_or_more(text):
    """A number of generated tokens: the first one and at least one decoded after it, which is what is timed."""
    return positive(text, least=2)


def positive_number(text):
    """A finite number > 0, for seconds, sizes, learning rates and fractions (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def parent(*options):
    """A parser holding shared options, each (flag, keyword arguments)."""
    p = argparse.ArgumentParser(add_help=False)
    for flag, kwargs in options:
        p.add_argument(flag, **kwargs)
    return p


def build_parser():
    model = parent(("--preset", dict(default="shakespeare-char-cpu", choices=sorted(PRESETS), help="nanoKimi preset")))
    baseline = parent(
        ("--baseline", dict(default="gpt-shakespeare-char-cpu", choices=sorted(BASELINE_PRESETS), help="its preset"))
    )
    batch = parent(
        ("--batch_size", dict(type=positive, default=32)), ("--block_size", dict(type=positive, default=128))
    )
    data = parent(("--data", dict(default="data/shakespeare_char", help="a folder from `nanokimi prepare`")))

    parser = OneLineParser(
        prog="nanokimi bench", description=overview, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", default="BENCHMARKS.md", help="markdown file whose section is (re)written")
    sub = parser.add_subparsers(dest="bench", required=True)

    p = sub.add_parser("moe-scaling", parents=[model], help="MoE layer cost vs number of experts at fixed top-k")
    p.add_argument("--experts", type=positive, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--top_k", type=positive, default=2)
    p.add_argument("--batch", type=positive, default=32)
    p.add_argument("--seq", type=positive, default=128)
    p.add_argument("--repeats", type=positive, default=9)
    p.add_argument("--rounds", type=positive, default=5, help="interleaved measurements of each layer")
    p.set_defaults(run=bench_moe_scaling)

    p = sub.add_parser(
        "inference",
        parents=[model, baseline],
        help="decode tokens/s, peak memory, KV bytes per token: MLA cache, none, MHA",
    )
    p.add_argument("--contexts", type=positive, nargs="+", default=[64, 256, 1024])
    p.add_argument("--new_tokens", type=two_or_more, default=64)
    p.add_argument("--repeats", type=positive, default=3)
    p.set_defaults(run=bench_inference)

    p = sub.add_parser(
        "long-context",
        parents=[model],
        help="prefill, decode, memory and cache from 1k to 32k tokens: MLA, the KDA hybrid, MHA",
    )
    p.add_argument("--layers", type=positive, default=4, help="layers of each model (the hybrid: 3 KDA, then MLA)")
    p.add_argument("--contexts", type=positive, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--new_tokens", type=two_or_more, default=33, help="the first token and those decoded after it")
    p.add_argument("--rounds", type=positive, default=2, help="interleaved runs of each layout per context")
    p.add_argument("--memory_up_to", type=positive, default=8192, help="the longest context whose peak is tracked")
    p.set_defaults(run=bench_long_context)

    p = sub.add_parser(
        "optim", parents=[model, batch, data], help="AdamW vs Muon vs MuonClip, plus a high-LR stress run"
    )
    p.add_argument("--out", default="out/bench-optim")
    p.add_argument("--steps", type=positive, default=400)
    p.add_argument("--lrs", type=positive_number, nargs="+", default=[2e-3, 4e-3, 8e-3], help="lr sweep, per optimizer")
    p.add_argument(
        "--fractions",
        type=positive_number,
        nargs="+",
        default=[0.5, 0.6],
        help="shorter Muon runs, as fractions of --steps",
    )
    p.add_argument("--eval_interval", type=positive, default=25)
    p.add_argument("--eval_iters", type=positive, default=10, help="batches per split and evaluation")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--stress_lr", type=positive_number, default=0.03)
    p.add_argument("--stress_steps", type=positive, default=200)
    p.add_argument("--tau", type=positive_number, default=100.0)
    p.set_defaults(run=bench_optim)

    p = sub.add_parser(
        "step",
        parents=[model, baseline],
        help="ms per training step: nanoKimi (MuonClip, AdamW) vs the baseline, and its breakdown",
    )
    p.add_argument("--shapes", type=shape, nargs="+", default=[(12, 64), (32, 128)], help="batch x block, e.g. 12x64")
    p.add_argument("--repeats", type=positive, default=15)
    p.add_argument("--rounds", type=positive, default=5, help="interleaved measurements of each contender")
    p.add_argument("--compile", action="store_true", help="add nanoKimi + MuonClip under torch.compile")
    p.set_defaults(run=bench_step)

    p = sub.add_parser(
        "memory", help="per-rank training state and bytes sent: 1 process, DDP, FSDP, FSDP+EP; Kimi-K2 projected"
    )
    p.add_argument(
        "--preset",
        default="shakespeare-char",
        choices=sorted(PRESETS),
        help="nanoKimi preset (29.5M parameters by default)",
    )
    p.add_argument("--batch_size", type=positive, default=4)
    p.add_argument("--block_size", type=positive, default=64)
    p.add_argument("--port", type=int, default=29571, help="torchrun's rendezvous port")
    p.add_argument("--timeout_s", type=positive_number, default=600, help="limit on each layout's run")
    p.add_argument(
        "--k2_tokens",
        type=positive,
        default=4096,
        help="tokens per rank per step in the Kimi-K2 projection (one 4096-token sequence)",
    )
    p.set_defaults(run=bench_memory)

    p = sub.add_parser(
        "compare",
        parents=[data],
        help="nanoKimi's shipped config vs nanoGPT's own recipe: time to the recipe's val loss",
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="cpu",
        help="nanoGPT's CPU recipe (README) or its GPU one (config/train_shakespeare_char.py, needs CUDA)",
    )
    p.add_argument(
        "--config", help="nanoKimi run to compare: a named run or .toml file (default: the recipe's shipped run)"
    )
    p.add_argument("--out", default="out/bench-compare")
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument(
        "--fractions",
        type=positive_number,
        nargs="+",
        default=[0.25, 0.4, 0.5],
        help="nanoKimi runs of these fractions of the recipe's training time (1x is always run)",
    )
    p.add_argument("--eval_batches", type=positive, default=200, help="x 12 fixed val windows score every run")
    p.add_argument("--quick", action="store_true", help="a few steps each: a smoke test of the report")
    p.set_defaults(run=bench_compare)

    p = sub.add_parser(
        "ablate", parents=[data], help="each Kimi-K2 idea removed, and nanoGPT three ways: equal time and equal tokens"
    )
    p.add_argument("--out", default="out/bench-ablate")
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument(
        "--lrs", type=positive_number, nargs="+", default=[3e-3, 6e-3, 1.2e-2], help="the lr sweep, shared by all"
    )
    p.add_argument(
        "--budget_s",
        type=positive_number,
        default=40.0,
        help="the short budget, training seconds (40: bench compare's 0.4x of the recipe's ~100 s)",
    )
    p.add_argument(
        "--long_budget_s",
        type=positive_number,
        default=120.0,
        help="the long budget for the MoE question, about the demo's 150 s of training",
    )
    p.add_argument("--tokens", type=positive, default=204800, help="training tokens of the equal-token runs")
    p.add_argument("--eval_batches", type=positive, default=17, help="x 12 fixed val windows score every run")
    p.add_argument(
        "--config",
        default="shakespeare-char-cpu",
        help="the nanoKimi run every row starts from: a named run or .toml (the nanoGPT and KDA rows: only "
        "shakespeare-char-cpu)",
    )
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=[c.key for c in CONTENDERS.values()],
        default=[c.key for c in CONTENDERS.values()],
        help="the rows to run (the shipped run always)",
    )
    p.add_argument("--quick", action="store_true", help="a few seconds each: a smoke test of the report")
    p.set_defaults(run=bench_ablate)

    p = sub.add_parser(
        "prepare",
        help="nanokimi prepare's MB/s and peak memory on corpora of 10 MB..1 GB, each "
        "format, next to the tokenizer's own batched rate",
    )
    p.add_argument("--source", required=True, help="a UTF-8 text the documents are drawn from (e.g. TinyShakespeare)")
    p.add_argument("--out", default="out/bench-prepare", help="where corpora and datasets are written")
    p.add_argument("--sizes_mb", type=positive_number, nargs="+", default=[10, 100, 1000])
    p.add_argument("--formats", nargs="+", choices=["txt", "jsonl", "parquet"], default=["txt", "jsonl", "parquet"])
    p.add_argument("--vocab_size", type=positive, default=8192)
    p.add_argument("--bpe", action="store_true", help="also time BPE training (from the sample) on the first format")
    p.add_argument("--limit_mb", type=positive, default=100, help="MB of documents the tokenizer's rate is timed on")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora")
    p.set_defaults(run=bench_prepare)

    p = sub.add_parser("chat", help="a chat run's held-out exact-match accuracy, with the calculator and without")
    p.add_argument("--checkpoint", default="out/chat-arithmetic-cpu", help="the chat run (out_dir) scored")
    p.add_argument("--conversations", type=positive, default=200, help="held-out conversations of chat_tasks.py")
    p.add_argument("--seed", type=int, default=1, help="their seed (the recipe's data is seed 0)")
    p.set_defaults(run=bench_chat)

    p = sub.add_parser("serve", help="nanokimi serve's aggregate tokens/s and first-token time at 1, 4, 16 clients")
    p.add_argument("--checkpoint", default="out/chat-arithmetic-cpu", help="the run served")
    p.add_argument("--clients", type=positive, nargs="+", default=[1, 4, 16], help="concurrent clients, per row")
    p.add_argument("--requests", type=positive, default=32, help="requests per burst (every row the same)")
    p.add_argument("--max_tokens", type=positive, default=64, help="per request")
    p.add_argument("--rounds", type=positive, default=3, help="bursts per row, rows interleaved")
    p.add_argument("--threads", type=positive, help="the server's torch threads (default: serve's own)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=bench_serve)

    p = sub.add_parser("sweep", parents=[data], help="the CPU config's batch shape, lr, warmup and dims")
    p.add_argument("--config", default="shakespeare-char-cpu", help="the starting point: a named run or .toml file")
    p.add_argument("--out", default="out/bench-sweep")
    p.add_argument(
        "--budget_s",
        type=positive_number,
        default=34.0,
        help="training seconds per run (34: 0.4x the nanoGPT CPU recipe's ~85 s on 2 cores)",
    )
    p.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        default=[(4, 64), (6, 64), (8, 64), (12, 64), (16, 64), (32, 128)],
        help="batch x block, e.g. 12x64",
    )
    p.add_argument("--warmups", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--lrs", type=positive_number, nargs="+", default=[3e-3, 6e-3, 1.2e-2])
    p.add_argument("--eval_batches", type=positive, default=100, help="x 12 fixed val windows score every run")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(run=bench_sweep)
    return parser


def check_writable(report):
    """A UserError now, not after the benchmark has run, unless `report` can be (re)written the way write_section
    does it: a file beside it, then a rename."""
    report = Path(report)
    if report.is_dir():
        raise UserError(f"--report={report} is a folder: name a markdown file, e.g. {report / 'BENCHMARKS.md'}")
    probe = report.with_name(f".{report.name}.tmp")
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write --report={report} ({write_failure(e)}): pick a writable place") from None
    if report.exists() and not os.access(report, os.R_OK):
        raise UserError(f"cannot read --report={report}, whose other sections are kept: make it readable")


def main(argv):
    args = build_parser().parse_args(argv)
    check_writable(args.report)  # before anything is written or run
    if getattr(args, "data", None) is not None:
        TokenData(args.data, 1)
    args.command = " ".join(["nanokimi bench", *argv])  # stamped on the report section
    args.assets = Path(args.report).parent / "assets"  # plots sit beside the report, linked as assets/NAME.png
    if getattr(args, "quick", False):  # a smoke test of the report: one seed, a second or a few steps per run
        quick = dict(
            seeds=1,
            fractions=[0.5],
            eval_batches=2,
            budget_s=1.0,
            long_budget_s=1.0,
            tokens=2048,
            lrs=getattr(args, "lrs", [])[:2],
        )
        vars(args).update({k: v for k, v in quick.items() if hasattr(args, k)})
    args.run(args)
