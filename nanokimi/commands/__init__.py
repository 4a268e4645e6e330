"""One module per `nanokimi` command, all in one pattern: its docstring is the command's help (the first line, in
`nanokimi --help`'s list) and description (the rest, in `nanokimi COMMAND --help`), NAME its name,
`add_arguments(p)` declares its options and `run` runs it. A module imports nothing heavy at its top (every
command's parser is built for any command line, and `nanokimi prepare` starts without torch): `run` imports what the
command needs. Two kinds of command set a flag: PASS_THROUGH (`torchrun`, `bench`: another parser reads the rest, so
`run` gets it as a list, and they declare no options) and OPEN_SETTINGS (`train`: any TrainConfig or model field as
--name=value, so `run` also gets the flags argparse does not know). cli.py lists the commands and is the one place
their errors become one-line messages."""


def add_checkpoint_arguments(p):
    """The checkpoint a command loads and the device it runs on: `sample`, `chat`, `serve` and `eval`'s first
    options."""
    p.add_argument("checkpoint", help="a run's out_dir or its checkpoint folder")
    p.add_argument("--device", default="cpu", help="where the model runs, e.g. cpu, cuda, cuda:1 (default cpu)")
