"""The two model families by name (nanoKimi's Kimi, the nanoGPT baseline), their named configs (presets/*.toml:
`kimi-k2` is the real Kimi-K2-Instruct (0711) config, `kimi-linear-48b-a3b` the real Kimi Linear (KDA + MLA
hybrid), the others are small enough to train), and building a model once it is known to fit the device."""

import dataclasses
import importlib.resources

import torch

from .baseline import GPT, GPTConfig
from .errors import UserError
from .hardware import available_memory
from .model import Kimi, KimiConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ARCHS = {"kimi": (KimiConfig, Kimi), "gpt": (GPTConfig, GPT)}  # a checkpoint's "arch" -> config, model classes
PRESET_FILES = importlib.resources.files("nanokimi") / "presets"  # installed with the package, as runs/


def read_presets():
    """{arch: {name: config}}: the named configs, presets/NAME.toml, each an `arch` and the config's fields."""
    presets = {arch: {} for arch in ARCHS}
    for path in sorted(PRESET_FILES.iterdir(), key=lambda path: path.name):
        if path.name.endswith(".toml"):
            fields = tomllib.loads(path.read_text())
            arch = fields.pop("arch")
            presets[arch][path.name.removesuffix(".toml")] = ARCHS[arch][0](**fields)
    return presets


NAMED = read_presets()
PRESETS = NAMED["kimi"]  # kimi-k2, kimi-linear-48b-a3b (Moonshot's released configs), shakespeare-char(-cpu)
BASELINE_PRESETS = NAMED["gpt"]  # the nanoGPT dense baseline at the two Shakespeare sizes


def find_preset(name):
    """(arch, config) of a preset name."""
    if name in PRESETS:
        return "kimi", PRESETS[name]
    if name in BASELINE_PRESETS:
        return "gpt", BASELINE_PRESETS[name]
    raise UserError(
        f"unknown run or preset {name!r}: choose one of {', '.join([*PRESETS, *BASELINE_PRESETS])} "
        f"(`nanokimi train --help` lists the named runs) or pass a .toml file"
    )


def make_config(arch, base, overrides, source=None):
    """A copy of config `base` (dataclass or dict, read from file `source` if given) with field overrides; invalid
    values become a UserError (naming `source`)."""
    cls = ARCHS[arch][0]
    fields = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base)
    unknown = sorted(overrides.keys() - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"unknown {arch} model setting(s) {unknown}: see the {cls.__name__} fields in nanokimi")
    try:
        return cls(**(fields | overrides))
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid model config{f' in {source}' if source else ''}: {e}") from None


def build_model(arch, config, device="cpu", batch_tokens=0, shards=1, context=""):
    """The model (on the CPU), once it is known to fit in `device`'s memory: to hold it, or to train it on
    `batch_tokens` per micro-batch (`check_fits`, on the meta device first)."""
    check_fits(arch, config, device, batch_tokens, shards, context)
    return ARCHS[arch][1](config)


def check_fits(arch, config, device, batch_tokens=0, shards=1, context="", fix=None):
    """A UserError naming the setting to lower, unless the model fits in `device`'s available memory: 4 bytes per
    parameter to hold it; when training `batch_tokens` per micro-batch, 16 bytes per parameter (weights, gradients,
    two optimizer states; divided over `shards` FSDP ranks) plus activations, ~68 bytes x width x layers per token
    (fp32; Korthikanti et al. 2022, without attention scores, which SDPA does not keep) and 12 bytes per token per
    vocabulary entry (logits, their float copy and gradient). An estimate for refusing the impossible before any
    allocation, not a promise that what passes fits. Buffers (RoPE tables) count at their size. `fix`: the advice, where
    the command's own options differ from train's."""
    with torch.device("meta"):  # counts without allocating (a K2-sized config builds here in seconds)
        model = ARCHS[arch][1](config)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # e.g. RoPE tables over the whole context
    width = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    need = buffers + params * 4
    if batch_tokens:
        need = buffers + params * 16 // shards + batch_tokens * (68 * width * layers + 12 * config.vocab_size)
    free = available_memory(device)
    if free is not None and need > free:
        fix = fix or ("lower --batch_size or --block_size, or the model's size" if batch_tokens else "a smaller model")
        raise UserError(
            f"{context or 'the model'} needs about {need / 2**30:.1f} GiB ({params / 1e6:,.1f}M "
            f"parameters{', training' if batch_tokens else ''}) but {device} has {free / 2**30:.1f} GiB "
            f"available: {fix}"
        )
