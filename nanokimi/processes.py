"""A run's processes: the ranks under torchrun (process group, device, precision), the lock that keeps one run per
out_dir, and the stop signals that end a run cleanly. The training loop (train.py) uses them; nothing here trains."""

import contextlib
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UserError
from .output_folders import folder_lock
from .hardware import check_device


class Run:
    """Process-level setup: distributed group, device, precision."""

    def __init__(self, cfg):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank, self.world = 0, 1
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        check_device(device)
        if self.distributed:
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if device.startswith("cuda"):
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(device)
        self.device = torch.device(device)
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = (
                ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
                if self.device.type == "cuda"
                else "float32"
            )
        self.dtype = getattr(torch, dtype)
        self.master = self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def close(self, finished=False):
        """Leave the process group. After a finished run the ranks leave together (a barrier first): a gloo worker
        whose peer had already exited aborted at teardown (SIGABRT, seen once in a loaded test run)."""
        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def exit_worker():
    """End a torchrun worker whose run is over and whose process group is gone: its output flushed, then os._exit,
    skipping the C++ destructors that run at a normal exit. There a thread of the gloo backend, still joinable, made
    the exit abort ("terminate called without an active exception" with no Python frame left, exit -6 after a run
    that had finished and saved): 2 of about 150 torchrun launches of the test suites, both on a loaded machine."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def lost_peer(error):
    """Whether `error`, raised under torchrun, is a collective that failed because another worker is gone (killed,
    crashed): gloo and NCCL raise it as a RuntimeError naming the lost connection."""
    text = str(error).lower()
    return "RANK" in os.environ and (
        isinstance(error, (dist.DistError, ConnectionError)) or "gloo" in text or "connection" in text or "nccl" in text
    )


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to save a checkpoint and exit cleanly at the end of the current step."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def run_lock(out_dir):
    """One training process per out_dir (a second would interleave checkpoints and metrics): an advisory lock on
    out_dir/.lock, released when the process ends, however it ends."""
    out = Path(out_dir).absolute()
    created = [p for p in [out, *out.parents] if not p.exists()]  # out_dir and the parents this makes, innermost first
    try:
        with folder_lock(
            out_dir,
            ".lock",
            f"another nanokimi run is training in {out_dir}: wait for it to end or pick another --out_dir",
            "pick a writable --out_dir",
        ):
            yield
    finally:  # a run refused before its first write leaves no folder behind
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [".lock"]:
            (out / ".lock").unlink()
            for folder in created:
                with contextlib.suppress(OSError):  # another process may have written there meanwhile
                    folder.rmdir()


@contextlib.contextmanager
def shared_lock(run, out_dir):
    """run_lock, taken by rank 0 for every process of the run: when it is refused, every rank stops with a line
    saying so (without this, the other ranks waited in their first collective and then reported a lost peer)."""
    if not run.distributed:
        with run_lock(out_dir):
            yield
        return
    with contextlib.ExitStack() as stack:
        refusal = None
        if run.master:
            try:
                stack.enter_context(run_lock(out_dir))
            except UserError as e:
                refusal = e
        refused = torch.tensor(
            [refusal is not None], dtype=torch.int32, device=run.device if dist.get_backend() == "nccl" else "cpu"
        )
        dist.broadcast(refused, src=0)
        if refused.item():
            raise refusal or UserError(
                f"rank 0 could not take the run's lock on {out_dir} (its message is above): this rank stops with it"
            )
        yield
