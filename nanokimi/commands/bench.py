"""`nanokimi bench BENCHMARK ...`: the benchmarks, whose own parser (bench/cli.py) reads the rest of the line."""

NAME = "bench"
PASS_THROUGH = True


def add_parser(sub):
    return sub.add_parser(
        NAME, help="benchmarks (moe-scaling, optim, compare, ...); `nanokimi bench --help`", add_help=False
    )


def run(argv):
    from ..bench.cli import main

    main(argv)
