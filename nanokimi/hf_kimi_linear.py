"""Kimi Linear's Hugging Face layout (`KimiLinearForCausalLM`, transformers >= 5, the format of
moonshotai/Kimi-Linear-48B-A3B) as one of hf.py's adapters: its config.json <-> nanoKimi's hybrid config, and tensor
names both ways (read into DeepseekV3's names for MLA and MoE). hf.py reads and writes the folders.

Checkpoints spell things Moonshot's way, which is what transformers writes too: MoE layers under `block_sparse_moe`
with experts `w1` (gate), `w3` (up), `w2` (down); KDA's forget gate (`f_a_proj`, `f_b_proj`, `dt_bias`, `A_log`)
directly under `self_attn`; the short convolution as `q_conv1d`, `k_conv1d`, `v_conv1d`. transformers' in-memory names
(`mlp`, `experts.gate_up_proj`, `forget_gate.*`, one `conv1d`) are read as well. Kimi Linear's MLA applies no
rotary position (`mla_use_nope`)."""

import torch

from .errors import UserError
from .model import KimiConfig

ARCHITECTURE = "KimiLinearForCausalLM"
# nanoKimi field -> Kimi Linear config.json key(s), the first the one written (transformers 5 / Moonshot spellings)
FIELDS = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "num_hidden_layers": ("num_hidden_layers",),
    "num_attention_heads": ("num_attention_heads",),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    "n_routed_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "num_experts_per_tok": ("num_experts_per_token", "num_experts_per_tok"),
    "n_shared_experts": ("num_shared_experts", "n_shared_experts"),
    "norm_topk_prob": ("moe_renormalize", "norm_topk_prob"),
    "n_group": ("num_expert_group", "n_group"),
    "topk_group": ("topk_group",),
    "routed_scaling_factor": ("routed_scaling_factor",),
    "max_position_embeddings": ("model_max_length", "max_position_embeddings"),
    "rms_norm_eps": ("rms_norm_eps",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "initializer_range": ("initializer_range",),
    "linear_num_heads": ("linear_num_heads",),
    "linear_head_dim": ("linear_head_dim",),
    "linear_conv_kernel_dim": ("linear_conv_kernel_dim",),
}
LINEAR_ATTN_CONFIG = {
    "linear_num_heads": "num_heads",
    "linear_head_dim": "head_dim",
    "linear_conv_kernel_dim": "short_conv_kernel_size",
}  # Moonshot's sub-dict
EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
FORGET_GATE = ("f_a_proj", "f_b_proj", "dt_bias", "A_log")


def reads(hf):
    """Whether a config.json dict is this format."""
    return hf.get("model_type") == "kimi_linear" or ARCHITECTURE in hf.get("architectures", [])


def writes(config):
    """Whether a nanoKimi config exports as Kimi Linear (KDA layers or unrotated MLA) rather than DeepseekV3."""
    return config.mla_use_nope or config.layer_types is not None and "linear_attention" in config.layer_types


def to_hf_config(config):
    if config.attention != "mla":
        raise UserError("Kimi Linear's full-attention layers are MLA: a model with attention='mha' cannot be exported")
    if not config.mla_use_nope:
        raise UserError(
            "KimiLinearForCausalLM's MLA applies no rotary position: a hybrid trained with "
            "mla_use_nope=false cannot be exported (train with --mla_use_nope=true)"
        )
    if config.n_shared_experts < 1:
        raise UserError("Kimi Linear always has a shared expert: a model with n_shared_experts=0 cannot be exported")
    kinds = [config.layer_type(i) for i in range(config.num_hidden_layers)]
    hf = {keys[0]: getattr(config, name) for name, keys in FIELDS.items()}
    linear = {key: getattr(config, name) for name, key in LINEAR_ATTN_CONFIG.items()}
    return hf | {
        "architectures": [ARCHITECTURE],
        "model_type": "kimi_linear",
        "layer_types": kinds,
        "mlp_layer_types": [
            "dense" if i < config.first_k_dense_replace else "sparse" for i in range(config.num_hidden_layers)
        ],
        "first_k_dense_replace": config.first_k_dense_replace,
        "moe_layer_freq": 1,
        "mla_use_nope": True,
        "linear_attn_config": linear
        | {  # Moonshot's spelling, 1-indexed layers
            "kda_layers": [i + 1 for i, k in enumerate(kinds) if k == "linear_attention"],
            "full_attn_layers": [i + 1 for i, k in enumerate(kinds) if k == "full_attention"],
        },
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "moe_router_activation_func": "sigmoid",
        "num_nextn_predict_layers": 0,
        "aux_loss_alpha": config.aux_loss_alpha,
    }


def from_hf_config(hf):
    """A KimiConfig from a Kimi Linear config.json dict, refusing what nanoKimi cannot represent."""
    checks = {
        "hidden_act": "silu",
        "attention_bias": False,
        "moe_router_activation_func": "sigmoid",
        "moe_layer_freq": 1,
        "mla_use_nope": True,
    }
    for key, supported in checks.items():
        if key in hf and hf[key] != supported:
            raise UserError(
                f"{key}={hf[key]!r} is not supported (nanoKimi implements Kimi Linear with {key}={supported!r})"
            )
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise UserError("num_key_value_heads must equal num_attention_heads (MLA has no grouped KV heads)")
    fields = {name: next(hf[k] for k in keys if k in hf) for name, keys in FIELDS.items() if any(k in hf for k in keys)}
    linear = hf.get("linear_attn_config") or {}
    fields |= {name: linear[key] for name, key in LINEAR_ATTN_CONFIG.items() if key in linear}
    for where, values in (("", hf), ("linear_attn_config.", linear)):
        if values.get("gate_lower_bound") is not None:  # fla's bounded gate: lower_bound * sigmoid(...)
            raise UserError(
                f"{where}gate_lower_bound={values['gate_lower_bound']!r} is not supported (nanoKimi's KDA "
                f"forget gate is Kimi Linear's -exp(A_log) * softplus(f + dt_bias), with no lower bound)"
            )
    unknown = sorted(set(linear) - set(LINEAR_ATTN_CONFIG.values()) - {"kda_layers", "full_attn_layers"})
    if unknown:  # a KDA variant nanoKimi does not implement would otherwise load as a different model, silently
        raise UserError(
            f"linear_attn_config.{unknown[0]} is not supported: nanoKimi's KDA reads only "
            f"{', '.join(sorted(LINEAR_ATTN_CONFIG.values()))}, kda_layers and full_attn_layers "
            f"(remove the key if it does not change the model)"
        )
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    listed = layer_lists(linear, n)
    if layer_types is not None and listed is not None and list(layer_types) != listed:
        raise UserError(
            f"layer_types {layer_types} contradicts linear_attn_config's kda_layers / full_attn_layers "
            f"(which say {listed}): make them agree, or drop one"
        )
    layer_types = layer_types or listed
    if layer_types is None:  # transformers' default pattern
        layer_types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    mlp = hf.get("mlp_layer_types")
    dense = hf.get("first_k_dense_replace", 1) if mlp is None else mlp.count("dense")
    if mlp is not None and mlp != ["dense"] * dense + ["sparse"] * (len(mlp) - dense):
        raise UserError(
            f"mlp_layer_types {mlp} puts dense layers after MoE ones: nanoKimi's dense layers come first "
            f"(first_k_dense_replace)"
        )
    fields |= {"layer_types": layer_types, "first_k_dense_replace": dense, "mla_use_nope": True}
    if hf.get("aux_loss_alpha") is not None:
        fields["aux_loss_alpha"] = hf["aux_loss_alpha"]
    try:
        return KimiConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot represent this config in nanoKimi: {e}") from None


def layer_lists(linear, n):
    """The layer types that linear_attn_config's 1-indexed kda_layers and full_attn_layers give (None if it has
    neither), refusing lists that do not name each of the n layers once: transformers reads them only together."""
    given = [key for key in ("kda_layers", "full_attn_layers") if key in linear]
    if not given:
        return None
    if len(given) == 1:
        missing = ({"kda_layers", "full_attn_layers"} - set(given)).pop()
        raise UserError(
            f"linear_attn_config has {given[0]} but no {missing}: transformers reads the layout only from "
            f"both (else it takes its default pattern), give both (1-indexed) or layer_types"
        )
    kda, full = linear["kda_layers"], linear["full_attn_layers"]
    if sorted(list(kda) + list(full)) != list(range(1, n + 1)):
        raise UserError(
            f"linear_attn_config's kda_layers {kda} and full_attn_layers {full} must name each of the "
            f"{n} layers once, counting from 1"
        )
    return ["linear_attention" if i + 1 in kda else "full_attention" for i in range(n)]


def to_hf_names(state, config):
    """nanoKimi state dict (`model.` prefixes added, experts still stacked) -> Kimi Linear checkpoint names."""
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers":
            layer, rest = int(parts[2]), parts[3:]
            prefix = f"model.layers.{layer}"
            if rest[0] == "mlp" and layer >= config.first_k_dense_replace:
                rest = ["block_sparse_moe", *rest[1:]]
            if rest[1] == "experts":  # the stacks [E, out, in], one tensor per expert as w1 / w3 / w2
                proj = next(w for w, ours in EXPERT_PROJ.items() if ours == rest[2])
                for e, matrix in enumerate(tensor):
                    out[f"{prefix}.{rest[0]}.experts.{e}.{proj}.weight"] = matrix.contiguous()
                continue
            if rest[:2] == ["self_attn", "conv1d"]:
                for letter, filters in zip("qkv", tensor.chunk(3)):
                    out[f"{prefix}.self_attn.{letter}_conv1d.weight"] = filters.contiguous()
                continue
            if rest[:2] == ["self_attn", "forget_gate"]:
                rest = ["self_attn", *rest[2:]]
                if rest[1] == "A_log":
                    tensor = tensor.view(1, 1, -1, 1)
            name = ".".join([prefix, *rest])
        out[name] = tensor.contiguous()
    return out


def from_hf_names(tensors):
    """Kimi Linear checkpoint tensors (Moonshot's or transformers' in-memory names) -> DeepseekV3-style names for
    MLA and MoE (`mlp.experts.E.PROJ.weight` or fused) and nanoKimi's KDA names; hf.from_hf_state_dict does the rest."""
    out, convs = {}, {}
    for name, tensor in tensors.items():
        parts = name.removeprefix("model.").split(".")
        if parts[0] != "layers" or len(parts) < 4 or not parts[1].isdigit():
            out[name] = tensor
            continue
        if parts[2] == "block_sparse_moe":
            parts[2] = "mlp"
        if parts[3:4] == ["experts"] and len(parts) == 7 and parts[5] in EXPERT_PROJ:
            parts[5] = EXPERT_PROJ[parts[5]]
        if parts[2] == "self_attn" and parts[3] in FORGET_GATE:
            parts[3:3] = ["forget_gate"]
        if parts[2:4] == ["self_attn", "forget_gate"] and parts[4] == "A_log":
            tensor = tensor.reshape(-1)  # [1, 1, nh, 1] -> [nh]
        if parts[2] == "self_attn" and parts[3] in ("q_conv1d", "k_conv1d", "v_conv1d"):
            convs.setdefault(int(parts[1]), {})[parts[3][0]] = tensor
            continue
        out["model." + ".".join(parts)] = tensor
    for layer, filters in convs.items():
        if sorted(filters) != ["k", "q", "v"]:
            raise UserError(
                f"layer {layer} holds only {', '.join(f'{c}_conv1d' for c in sorted(filters))}: a KDA "
                f"layer has q_conv1d, k_conv1d and v_conv1d"
            )
        out[f"model.layers.{layer}.self_attn.conv1d.weight"] = torch.cat([filters[c] for c in "qkv"])
    return out
