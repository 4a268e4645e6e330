"""benchmarks (moe-scaling, optim, compare, ...); `nanokimi bench --help`

`nanokimi bench BENCHMARK ...`: the benchmarks, whose own parser (bench/cli.py) reads the rest of the line."""

NAME = "bench"
PASS_THROUGH = True


def run(argv):
    from ..bench.cli import main

    main(argv)
