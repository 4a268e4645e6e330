"""torchrun [options] train ...: DDP/FSDP over processes; Ctrl-C saves and ends in one line

`nanokimi torchrun [torchrun's options] train ...` is `torchrun [options] -m nanokimi train ...` through torchrun's own
entry point, ending in one line instead of its traceback."""

import signal
import sys

from ..errors import UserError

NAME = "torchrun"
PASS_THROUGH = True  # torchrun's own options, then `train ...`: run gets them as they were typed


def run(argv):
    """`nanokimi torchrun [torchrun options] train ...` = `torchrun [options] -m nanokimi train ...`, run through
    torchrun's own entry point, with its two ways of ending as one line instead of a traceback: a Ctrl-C/SIGTERM
    (the workers save a checkpoint first) and a failed worker (whose own one-line error is printed above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if "train" not in argv:
        raise UserError(
            "usage: nanokimi torchrun [torchrun's options, e.g. --nproc_per_node=2] train CONFIG [--settings]"
        )
    split = argv.index("train")
    nproc = next(
        (
            a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < split else "")
            for i, a in enumerate(argv[:split])
            if a.split("=")[0] in ("--nproc_per_node", "--nproc-per-node")
        ),
        None,
    )
    if nproc is not None and not (nproc.isdigit() and int(nproc) > 0 or nproc in ("auto", "cpu", "gpu", "xpu")):
        raise UserError(
            f"--nproc_per_node={nproc}: give the number of processes per machine (e.g. 2), or auto, cpu, gpu"
        )
    try:
        torchrun_main([*argv[:split], "-m", "nanokimi", *argv[split:]])
    except SignalException as e:
        print(
            f"interrupted ({e.sigval.name}): the workers saved the run's checkpoint; continue with --resume",
            file=sys.stderr,
        )
        sys.exit(128 + e.sigval)
    except ChildFailedError as e:
        # a worker killed by a signal (the OOM killer, kill -9) is the cause, whatever the others then printed;
        # SIGTERM is torchrun's own way of ending the rest (a worker given SIGTERM by the user saves and exits 0)
        killed = sorted(
            rank for rank, failure in e.failures.items() if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM
        )
        if killed:
            failure = e.failures[killed[0]]
            print(
                f"error: worker rank {killed[0]} was killed by {failure.signal_name()} and the others stopped "
                f"with it; the run's last checkpoint is kept: continue with --resume",
                file=sys.stderr,
            )
            sys.exit(128 - failure.exitcode)
        rank, failure = e.get_first_failure()
        print(
            f"error: worker rank {rank} failed with exit code {failure.exitcode} (its message is above)",
            file=sys.stderr,
        )
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
