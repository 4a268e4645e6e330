"""One place assembles a training run's configuration: a named run (the package's runs/*.toml: the tuned CPU run, the
GPU run, the finetune), a TOML file of your own, or a model preset with TrainConfig's defaults; `--name=value` flags; on
`--resume` the settings saved with the run. What the run then trains on (data, model config, the checkpoint it
continues) is plan.py's.

Per-invocation flags (`resume`, `overwrite`, `init_from`, `fsdp`) say what this command does: they are never saved
into a run nor read back from one. `block_size` is always the training window; a model's context is its own setting
(`max_position_embeddings` for Kimi, `n_positions` for the baseline)."""

import dataclasses
import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path


from . import checkpoint
from .baseline import GPTConfig
from .errors import UserError
from .model import KimiConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    preset: str = "shakespeare-char-cpu"  # model preset (nanokimi.PRESETS or a gpt-* baseline)
    data: str = "data/shakespeare_char"  # a folder written by `nanokimi prepare`
    out_dir: str = "out/shakespeare-char-cpu"  # checkpoint/, metrics.jsonl, loss.png
    # batches: tokens per optimizer step = batch_size * block_size * grad_accum (grad_accum summed over all ranks)
    batch_size: int = 32  # sequences per micro-batch
    block_size: int = 128  # training window in tokens (at most the model's context)
    grad_accum: int = 1  # micro-batches per optimizer step, over all processes
    max_iters: int = 2000  # optimizer steps
    max_time_s: float = 0.0  # a training-time budget (evals excluded): the run and its lr schedule end at whichever
    # of max_iters and max_time_s comes first (0: none). For runs compared at equal wall-clock (`nanokimi bench`).
    # optimizer and schedule
    optimizer: str = "muonclip"  # muonclip | muon | adamw
    lr: float = 2e-3  # peak learning rate (Muon's update is RMS-matched to AdamW's, so one lr serves both)
    min_lr: float = 2e-4  # the schedule's final lr
    lr_schedule: str = "wsd"  # wsd (K2's warmup-stable-decay) | cosine
    warmup_iters: int = 100  # linear warmup steps
    decay_frac: float = 0.3  # wsd: fraction of lr_decay_iters spent decaying (cosine) to min_lr
    lr_decay_iters: int = 0  # the schedule's length in steps (0: max_iters)
    weight_decay: float = 0.1  # decoupled, on matrices only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # max gradient norm (0 disables)
    qk_clip_tau: float = 100.0  # MuonClip: heads whose max attention logit exceeds tau are rescaled to it
    muon_dtype: str = "auto"  # Newton-Schulz precision: auto (bf16 or fp32, whichever this machine runs faster,
    # measured at start-up) | float32 | bfloat16
    bias_update_gamma: float = 1e-3  # aux-loss-free balancing step (0 freezes the expert bias)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between evaluations (each also writes a checkpoint)
    eval_iters: int = 20  # batches per split and evaluation
    log_interval: int = 10  # steps between metrics.jsonl records
    ckpt_interval: int = 0  # extra checkpoints every N steps (0: only at evals and at the end)
    log_max_logit: bool = False  # record max attention logits even when not clipping (muon/adamw)
    progress: bool = True  # a progress bar on a terminal (plain lines otherwise)
    # run
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (CUDA: bf16 where supported, else fp16 + GradScaler; fp32 elsewhere: CPU bf16
    # autocast is 7x slower without bf16 instructions and measured slower at the CPU run's shapes even with them,
    # see BENCHMARKS step) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model
    # per invocation, never saved with the run
    resume: bool = False  # continue the run in out_dir
    overwrite: bool = False  # start afresh in an out_dir that holds a checkpoint (replaced at the first save)
    init_from: str = ""  # a checkpoint to finetune from (weights only; new optimizer and schedule)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state over the processes
    # (FSDP2) instead of replicating them (DDP); a run's checkpoints resume under either layout or one process
    ep: bool = False  # with --fsdp: expert parallelism, each process owns n_routed_experts / processes experts and
    # tokens travel to them (all-to-all) instead of every process gathering every expert

    def __post_init__(self):
        for f in dataclasses.fields(self):  # NaN and infinity, in any spelling JSON or TOML reads, up front
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"{f.name} must be a finite number, got {getattr(self, f.name)}")
        if not 0 <= self.seed < 2**63:  # torch's generator seeds are 64-bit
            raise UserError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("batch_size", "block_size", "grad_accum", "eval_iters", "log_interval", "eval_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "max_iters",
            "max_time_s",
            "warmup_iters",
            "ckpt_interval",
            "lr_decay_iters",
            "weight_decay",
            "grad_clip",
            "bias_update_gamma",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.qk_clip_tau <= 0:
            raise UserError(f"qk_clip_tau must be positive, got {self.qk_clip_tau}")
        if self.lr_schedule not in ("wsd", "cosine"):
            raise UserError(f"unknown lr_schedule {self.lr_schedule!r}: use wsd or cosine")
        if self.optimizer not in ("muonclip", "muon", "adamw"):
            raise UserError(f"unknown optimizer {self.optimizer!r}: use muonclip, muon or adamw")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise UserError(f"unknown device {self.device!r}: use {', '.join(DEVICES)} or cuda:N")
        if self.muon_dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"unknown muon_dtype {self.muon_dtype!r}: use auto, float32 or bfloat16")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"unknown dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if not 0 < self.decay_frac <= 1:
            raise UserError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.resume and self.init_from:
            raise UserError("--resume continues a run and --init_from starts a new one from weights: pass only one")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --out_dir and --overwrite replaces it: pass only one")


INVOCATION_FIELDS = ("resume", "overwrite", "init_from", "fsdp", "ep")


def saved_settings(cfg):
    """The settings stored with a run: everything but the per-invocation flags."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in INVOCATION_FIELDS}


def coerce(cls, values):
    """Check values against dataclass `cls`'s defaults: ints where ints belong, floats accept ints."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{key}={value}: give a finite number")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif default is not None and value is not None and type(value) is not type(default):
            raise UserError(f"--{key} expects a {type(default).__name__}, got {value!r}")
        out[key] = value
    return out


def train_fields():
    return {f.name for f in dataclasses.fields(TrainConfig)}


def model_fields():
    return {f.name for c in (KimiConfig, GPTConfig) for f in dataclasses.fields(c)} - train_fields()


RUNS = importlib.resources.files("nanokimi") / "runs"  # the shipped runs, one TOML each, installed with the package


def named_runs():
    """{name: what it is for (its TOML's first comment line)} of the shipped runs."""
    return {
        f.name.removesuffix(".toml"): f.read_text().splitlines()[0].lstrip("# ")
        for f in sorted(RUNS.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".toml")
    }


def load_train_config(target, cli=None):
    """`nanokimi train TARGET --name=value...` -> (TrainConfig, model-field overrides). TARGET is a named run, a .toml
    file ([model] table: model fields) or a model preset name; `cli` the command line's settings, {name: value}
    (commands/train.py parses the flags). With --resume, the saved run's settings are the base and this command
    line's settings update them."""
    base, model_overrides = {}, {}
    path = Path(target)
    if not (path.suffix == ".toml" or path.is_file()) and target in named_runs():
        path = RUNS / f"{target}.toml"
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise UserError(
                f"config file {path} not found: pass a .toml file, a named run "
                f"({', '.join(named_runs())}) or a preset name"
            )
        try:
            base = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid TOML ({e})") from None
        model_overrides = base.pop("model", {})
        if not isinstance(model_overrides, dict):
            raise UserError(
                f"config file {path}: `model` must be a [model] table of model settings, got {model_overrides!r}"
            )
        infinite = [k for k, v in model_overrides.items() if isinstance(v, float) and not math.isfinite(v)]
        if infinite:
            raise UserError(
                f"config file {path}: [model] {infinite[0]} = {model_overrides[infinite[0]]}: give a finite number"
            )
    else:
        base = {"preset": target, "out_dir": f"out/{target}"}
    cli = cli or {}
    infinite = [k for k, v in cli.items() if isinstance(v, float) and not math.isfinite(v)]
    if infinite:
        raise UserError(f"--{infinite[0]}={cli[infinite[0]]}: give a finite number")
    train_names, model_names = train_fields(), model_fields()
    unknown = sorted(cli.keys() - train_names - model_names) + sorted(base.keys() - train_names)
    if unknown:
        raise UserError(f"unknown setting(s) {unknown}: see `nanokimi train --help`")
    cli_train = {k: v for k, v in cli.items() if k in train_names}
    invocation = {k: base.pop(k) for k in INVOCATION_FIELDS if k in base} | {
        k: cli_train.pop(k) for k in INVOCATION_FIELDS if k in cli_train
    }
    own_file = path.is_file() and path.parent != RUNS  # the user's TOML, not a named run
    if invocation.get("resume") and own_file:  # the user's file, edited since: applied as flags are (or refused)
        cli_train = {k: v for k, v in base.items() if k not in INVOCATION_FIELDS} | cli_train
    elif invocation.get("resume") or invocation.get("init_from"):
        model_overrides = {}  # a [model] table builds a new model; a continued or finetuned one is the checkpoint's
    model_overrides |= {k: v for k, v in cli.items() if k in model_names}
    if invocation.get("resume"):  # the saved run's settings, updated by what this command line sets again
        out_dir = cli_train.get("out_dir", base.get("out_dir", TrainConfig.out_dir))
        saved = checkpoint.Checkpoint(out_dir)
        if saved.train_config:
            base = {k: v for k, v in saved.train_config.items() if k in train_names and k not in INVOCATION_FIELDS}
            try:
                coerce(TrainConfig, base)
            except UserError as e:
                raise UserError(f'{saved.path / "config.json"} "train": {e}'.replace(": --", ": ")) from None
        base["out_dir"] = out_dir
    return TrainConfig(**coerce(TrainConfig, base | cli_train | invocation)), model_overrides
