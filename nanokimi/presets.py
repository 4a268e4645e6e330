"""Named model configs. `kimi-k2` is the real Kimi-K2-Instruct (0711) config, `kimi-linear-48b-a3b` the real Kimi Linear
(KDA + MLA hybrid); the others are small enough to train."""

import dataclasses

import torch

from .baseline import GPT, GPTConfig
from .errors import UserError
from .hardware import available_memory
from .model import Kimi, KimiConfig

PRESETS = {
    # moonshotai/Kimi-K2-Instruct config.json (see ../shared/kimi-k2.md section 1): 1.04T total, 32.6B active.
    # Build it on the meta device: `with torch.device("meta"): Kimi(PRESETS["kimi-k2"])`.
    "kimi-k2": KimiConfig(
        vocab_size=163840,
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        n_routed_experts=384,
        n_shared_experts=1,
        num_experts_per_tok=8,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
        max_position_embeddings=131072,
        rope_theta=50000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
        aux_loss_alpha=1e-3,
    ),
    # moonshotai/Kimi-Linear-48B-A3B config.json: 27 layers, KDA in all but 4, 8, ..., 24 and 27 (1-indexed, MLA
    # without rotary position there), the same DeepSeekMoE. Model card: 48B total, 3B active; counted here (meta
    # device): 49.1B total, 3.5B active per token, 3.1B without the embedding table (a lookup).
    "kimi-linear-48b-a3b": KimiConfig(
        vocab_size=163840,
        hidden_size=2304,
        num_hidden_layers=27,
        num_attention_heads=32,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=9216,
        moe_intermediate_size=1024,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.446,
        max_position_embeddings=1048576,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        layer_types=[
            "full_attention" if i + 1 in (4, 8, 12, 16, 20, 24, 27) else "linear_attention" for i in range(27)
        ],
        linear_num_heads=32,
        linear_head_dim=128,
        linear_conv_kernel_dim=4,
        mla_use_nope=True,
    ),
    # Character-level Shakespeare on a 2-core laptop CPU (the run of the same name trains 3 of its layers, ~3 min).
    "shakespeare-char-cpu": KimiConfig(
        vocab_size=65,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=384,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=128,
        dropout=0.0,
    ),
    # GPU size, next to nanoGPT's 10.7M "baby GPT" (6 layers, 6 heads, 384 wide, block 256, dropout 0.2).
    "shakespeare-char": KimiConfig(
        vocab_size=65,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=64,
        intermediate_size=1536,
        moe_intermediate_size=256,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        dropout=0.2,
    ),
}

# The nanoGPT dense baseline at the same two sizes (nanoGPT's config/train_shakespeare_char.py and its CPU variant).
BASELINE_PRESETS = {
    "gpt-shakespeare-char-cpu": GPTConfig(n_positions=128, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    "gpt-shakespeare-char": GPTConfig(n_positions=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
}

ARCHS = {"kimi": (KimiConfig, Kimi), "gpt": (GPTConfig, GPT)}  # a checkpoint's "arch" -> config, model classes


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
