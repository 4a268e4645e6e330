"""Checkpoints as a folder of safetensors + JSON (nothing is ever unpickled), written atomically.

    OUT_DIR/checkpoint/
        model.safetensors      weights (and the MoE e_score_correction_bias buffers)
        config.json            {"arch", "model": model config, "train": training config}
        optimizer.safetensors  optimizer tensors; optimizer.json holds the rest of its state_dict
        trainer.json           step, best val loss, ...
        meta.json (+ tokenizer.json)   the tokenizer

Writes go to OUT_DIR/.checkpoint.tmp; then checkpoint -> .checkpoint.old, .checkpoint.tmp -> checkpoint, and
.checkpoint.old is removed (the same for any folder name, e.g. `save_pretrained`). A kill at any moment leaves a
complete checkpoint under one of the two names, and `resolve` finds it."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .errors import UserError, check_fields, write_failure
from .hardware import check_device
from .models import ARCHS, build_model, make_config
from .tokenizer import TOKENIZER_FILES, CharTokenizer, copy_tokenizer, load_tokenizer

NAME, OLD = "checkpoint", ".checkpoint.old"
FILES = {
    "model.safetensors",
    "config.json",
    "optimizer.safetensors",
    "optimizer.json",
    "trainer.json",
    *TOKENIZER_FILES,
}  # what a checkpoint folder holds


def find(path):
    """The checkpoint folder at `path` (the folder itself or a run's out_dir), or None."""
    path = Path(path)
    if (path / "config.json").is_file() or path.name in (NAME, OLD):
        return path
    if (path / NAME).is_dir():
        return path / NAME
    if (path / OLD).is_dir():  # killed between the two renames of `save`
        return path / OLD
    if (path.parent / f".{path.name}.old").is_dir():  # the same, for a folder saved under its own name
        return path.parent / f".{path.name}.old"
    return None


def resolve(path):
    """Like find, but a missing checkpoint is a UserError."""
    found = find(path)
    if found is None:
        raise UserError(f"no checkpoint in {path}: pass a run's --out_dir or its checkpoint folder")
    return found


def flatten_state(obj, tensors, prefix="t"):
    """Split a nested state (dicts, lists, tensors, numbers) into JSON and a flat {key: tensor} dict."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):  # optimizer state is keyed by parameter index
            return {"__int_keys__": {str(k): flatten_state(v, tensors) for k, v in obj.items()}}
        return {k: flatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, tensors) for v in obj]
    return obj


def unflatten_state(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): unflatten_state(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save(
    out_dir,
    model,
    arch,
    model_config,
    train_config=None,
    tokenizer_dir=None,
    optimizer_state=None,
    trainer_state=None,
    name=NAME,
    weights=None,
):
    """Write the checkpoint folder out_dir/name atomically (see the module docstring). train_config: the run's
    settings as a dict; weights: the model's full state dict when `model` holds only shards of it (FSDP), else read
    from `model`. Refuses non-finite weights; a failed write (disk full, read-only folder) is a UserError and leaves
    the previous checkpoint and no temporary folder behind."""
    weights = model.state_dict() if weights is None else weights
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"the weights are not finite ({len(bad)} tensors, e.g. {bad[0]}), so they were not saved: the "
            f"last good checkpoint in {out_dir} is kept; lower --lr or raise --warmup_iters"
        )
    copies = tied_copies(model)

    def write(folder):
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items() if k not in copies}
        save_tensors(state, folder / "model.safetensors")
        write_json(
            folder / "config.json", {"arch": arch, "model": dataclasses.asdict(model_config), "train": train_config}
        )
        if optimizer_state is not None:
            tensors = {}
            write_json(folder / "optimizer.json", flatten_state(optimizer_state, tensors))
            save_tensors(tensors, folder / "optimizer.safetensors")
        write_json(folder / "trainer.json", trainer_state or {})
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, folder)

    try:
        return replace_folder(Path(out_dir), name, write)
    except (OSError, safetensors.SafetensorError) as e:
        raise UserError(
            f"could not write the checkpoint in {out_dir} ({write_failure(e)}): free some space or make "
            f"the folder writable; the previous checkpoint, if any, is kept"
        ) from None


def save_tensors(tensors, path, metadata=None):
    """safetensors' save_file, with the file's mode that of any other new file (safetensors writes 0600 through a
    temporary file; the JSON beside it gets the umask's 0644)."""
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def replace_folder(out_dir, name, write):
    """out_dir/name replaced as a whole by the folder `write(folder)` fills: written into .NAME.tmp, synced, then
    swapped in by two renames, so a kill at any point leaves the previous folder or the new one (the next save
    finishes a swap a kill interrupted). Returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / name).is_symlink():  # followed, not replaced: the swap happens beside the folder it points to
        target = (out_dir / name).resolve()
        out_dir, name = target.parent, target.name
    final, tmp, old = out_dir / name, out_dir / f".{name}.tmp", out_dir / f".{name}.old"
    if not final.exists() and old.exists():  # finish a swap a kill interrupted
        os.replace(old, final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:  # a failed write (disk full, read-only) leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def tied_copies(model):
    """{name: the earlier name of the same tensor} for parameters shared under two names (tied embeddings):
    safetensors refuses shared tensors, so a checkpoint stores each once."""
    first, copies = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            copies[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return copies


class Checkpoint:
    """A checkpoint folder read back: config, weights, optimizer and trainer state, each validated on access."""

    def __init__(self, path):
        self.path = resolve(path)
        cfg = self.read_json("config.json")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or cfg.get("arch") not in ARCHS:
            raise UserError(
                f"{self.path / 'config.json'} is not a nanoKimi checkpoint config: point to a folder "
                f"written by `nanokimi train`"
            )
        check_fields(cfg, self.path / "config.json", {"train?": (dict, type(None))})
        self.arch, self.model_config, self.train_config = cfg["arch"], cfg["model"], cfg.get("train")
        if self.arch == "gpt" and "block_size" in self.model_config:  # written before the baseline's n_positions
            self.model_config["n_positions"] = self.model_config.pop("block_size")

    def read_json(self, name):
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(
                f"checkpoint file {path} is missing: the checkpoint is incomplete; use another "
                f"checkpoint or train again"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"checkpoint file {path} is corrupt ({e}): use another checkpoint or train again") from None
        except RecursionError:
            raise UserError(
                f"checkpoint file {path} is nested too deeply to be nanoKimi's: use another checkpoint or train again"
            ) from None

    def read_tensors(self, name):
        path = self.path / name
        if not path.is_file():
            raise UserError(
                f"checkpoint file {path} is missing: the checkpoint is incomplete; use another "
                f"checkpoint or train again"
            )
        try:
            return safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise UserError(
                f"checkpoint file {path} is corrupt or truncated ({e}): use another checkpoint or train again"
            ) from None

    def load_weights(self, model, grow_vocab=False):
        """The weights into `model`; with grow_vocab, a model whose vocabulary has tokens appended (the chat tokens
        of a finetune) gets the saved rows of its embedding and output layer, and the mean row for each new one."""
        state = self.read_tensors("model.safetensors")
        for name, twin in tied_copies(model).items():
            if name not in state and twin in state:
                state[name] = state[twin]
        if grow_vocab:
            rows = model.config.vocab_size
            for name, tensor in model.state_dict().items():
                saved = state.get(name)
                if (
                    saved is not None
                    and tensor.shape[0] == rows > saved.shape[0]
                    and tensor.shape[1:] == saved.shape[1:]
                ):
                    state[name] = torch.cat(
                        [saved, saved.mean(0, keepdim=True).expand(rows - len(saved), *saved.shape[1:])]
                    )
        load_matching(model, state, f"checkpoint {self.path}")

    def optimizer_state(self):
        state = check_fields(self.read_json("optimizer.json"), self.path / "optimizer.json", {"optimizers": list})
        return unflatten_state(state, self.read_tensors("optimizer.safetensors"))

    def trainer_state(self):
        """step, best val loss, training seconds, ... of the run saved here."""
        state = check_fields(
            self.read_json("trainer.json"),
            self.path / "trainer.json",
            {
                "step": int,
                "best_val_loss": float,
                "elapsed": float,
                "evaluated_at?": (int, type(None)),
                "muon_dtype?": str,
            },
            fix="restore it, or start a new run from the weights with --init_from",
        )
        if state["step"] < 0:
            raise UserError(f'{self.path / "trainer.json"}: "step" is {state["step"]}, expected >= 0')
        return state


def load_matching(model, state, source):
    """Load `state` into `model`, or name what does not fit (from `source`) in one line."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        k
        for k in expected.keys() & state.keys()
        if expected[k].shape != state[k].shape or expected[k].is_floating_point() != state[k].is_floating_point()
    ]  # e.g. a header saying I32 for F32
    if missing or unexpected or wrong:
        raise UserError(
            f"{source} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape or type {wrong[:3]}): its config.json and weights disagree"
        )
    model.load_state_dict(state)


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer or None, checkpoint) from a checkpoint folder or a run's out_dir."""
    ckpt = Checkpoint(path)
    model = build_model(ckpt.arch, make_config(ckpt.arch, ckpt.model_config, {}, ckpt.path / "config.json"))
    ckpt.load_weights(model)
    tokenizer = load_tokenizer(ckpt.path) if (ckpt.path / "meta.json").is_file() else None
    if tokenizer is not None and (
        tokenizer.vocab_size > model.config.vocab_size
        or isinstance(tokenizer, CharTokenizer)
        and tokenizer.vocab_size != model.config.vocab_size
    ):
        raise UserError(
            f"{ckpt.path / 'meta.json'}: its tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"{model.config.vocab_size}: the tokenizer files were edited or come from another model"
        )
    return model.to(device).eval(), tokenizer, ckpt


def load_with_tokenizer(path, device):
    """(model, tokenizer) of a checkpoint, which must have a tokenizer."""
    check_device(device)
    model, tokenizer, ckpt = load_model(path, device)
    if tokenizer is None:
        raise UserError(
            f"checkpoint {ckpt.path} has no tokenizer (meta.json): copy one in from its dataset, or "
            f"import the model from a folder that has tokenizer.json"
        )
    return model, tokenizer
