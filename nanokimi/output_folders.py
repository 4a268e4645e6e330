"""Which command owns which folder. `train` owns a run's out_dir, `prepare` a dataset folder, `export` a Hugging Face
folder, `import` a checkpoint folder. Each writes only into a folder that is new, empty or of its own kind, and
never into another command's (nor the user's own files, where it owns whole folders): refused with one line, before
anything is read or written."""

import contextlib
import fcntl
import json
import os
from pathlib import Path

from .errors import UserError, write_failure


def read_config(folder):
    """folder/config.json as a dict, or None (absent, unreadable, not an object)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def kind(folder):
    """What `folder` holds, as words for a message: "a training run", "a nanoKimi checkpoint", "a Hugging Face model
    folder", "a prepared dataset", or None (new, empty, or only files no nanoKimi command writes)."""
    folder = Path(folder)
    config = read_config(folder)
    if config is not None and "arch" in config:
        return "a nanoKimi checkpoint"
    if config is not None and "architectures" in config:
        return "a Hugging Face model folder"
    if (folder / "meta.json").is_file() and (folder / "train.bin").is_file():
        return "a prepared dataset"
    if (folder / "metrics.jsonl").is_file() or (folder / "checkpoint").is_dir() or (folder / ".lock").is_file():
        return "a training run"
    return None


def check_destination(folder, command, own_kind, own_files=None):
    """Refuse `folder` as `nanokimi COMMAND`'s destination when it holds another kind of folder than `own_kind`,
    or (with `own_files`, the names the command writes) any file the command does not write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file: `nanokimi {command}` writes a folder, pick a new one")
    if not folder.is_dir():
        return
    found = kind(folder)
    if found is not None and found != own_kind:
        raise UserError(
            f"{folder} holds {found}: `nanokimi {command}` does not write into it, pick a new or empty folder"
        )
    # in a folder that is not of the command's kind, even a file of its names is the user's (e.g. their config.json)
    foreign = sorted(
        p.name for p in folder.iterdir() if own_files is not None and (found is None or p.name not in own_files)
    )
    if foreign:
        raise UserError(
            f"{folder} holds files `nanokimi {command}` did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): pick a new or empty folder"
        )


def check_apart(source, destination, command):
    """Refuse a destination that is the source, inside it, holds it, or holds the current folder."""
    source, destination = Path(source).resolve(), Path(destination).resolve()
    if destination == source or destination.is_relative_to(source) or source.is_relative_to(destination):
        raise UserError(
            f"`nanokimi {command}` reads {source} and would write {destination}: pick a destination "
            f"apart from its source"
        )
    if Path.cwd().resolve().is_relative_to(destination):
        raise UserError(
            f"{destination} holds the current folder: `nanokimi {command}` replaces its destination "
            f"whole, pick a new folder"
        )


# A command that replaces several files of a folder as one set (prepare's dataset: train.bin, val.bin, meta.json,
# tokenizer.json) writes them into SWAP_FOLDER inside it, then marks that complete with SWAP_DONE listing them all
SWAP_FOLDER, SWAP_DONE = ".prepare.tmp", "COMPLETE"


def commit_swap(folder, replaces):
    """Mark the files in folder/SWAP_FOLDER complete, then move them in (`finish_swap`): they replace the set
    `replaces` (names), whose members not among them are removed (e.g. a previous dataset's tokenizer.json)."""
    swap = Path(folder) / SWAP_FOLDER
    names = sorted(p.name for p in swap.iterdir())
    part = swap / f"{SWAP_DONE}.part"
    with open(part, "w") as f:
        f.write(json.dumps({"new": names, "replaces": sorted(replaces)}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, swap / SWAP_DONE)
    finish_swap(folder)


def finish_swap(folder):
    """Move a complete set of new files from folder/SWAP_FOLDER into `folder`, the mark last. Idempotent: after a kill
    at any point the next call (every reader of the folder makes one) ends with the whole new set, never old and new
    files side by side. A set not marked complete is left alone: the folder still holds the previous set whole.
    A move that cannot be made (a read-only folder) is one line."""
    swap = Path(folder) / SWAP_FOLDER
    done = swap / SWAP_DONE
    if not done.is_file():
        return
    try:
        mark = json.loads(done.read_text())
        for name in set(mark["replaces"]) - set(mark["new"]):
            (Path(folder) / name).unlink(missing_ok=True)
        for name in mark["new"]:
            if (swap / name).exists():
                os.replace(swap / name, Path(folder) / name)
        done.unlink()
        for leftover in swap.iterdir():
            leftover.unlink()
        swap.rmdir()
    except OSError as e:
        raise UserError(
            f"{folder} holds a new dataset a stopped prepare left to move in, and it cannot be moved here "
            f"({write_failure(e)}): make the folder writable, or prepare again"
        ) from None


@contextlib.contextmanager
def folder_lock(folder, lock_name, busy, fix):
    """An advisory lock on folder/lock_name (the folder made if need be), released when the process ends, however it
    ends. Held by another process: UserError(busy); the folder not writable: one line ending in `fix`."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        lock = open(Path(folder) / lock_name, "w")
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({write_failure(e)}): {fix}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        yield


def command_lock(folder, command):
    """One `nanokimi COMMAND` at a time writing into `folder` (a second would delete the first's files)."""
    return folder_lock(
        folder,
        f".{command}.lock",
        f"another `nanokimi {command}` is writing to {folder}: wait for it to end or pick another folder",
        "pick a writable folder",
    )
