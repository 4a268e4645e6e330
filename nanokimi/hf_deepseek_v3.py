"""The DeepseekV3ForCausalLM format (Kimi-K2's own checkpoints) as one of hf.py's adapters: its config.json <->
KimiConfig, and nanoKimi's tensor names <-> the checkpoint's. nanoKimi's names already are HF's (minus the `model.`
prefix); the one difference is that nanoKimi stacks routed experts as [E, out, in] tensors, written one key per
expert here (hf.py reads both those and transformers' fused in-memory layout)."""

from .errors import UserError
from .model import KimiConfig

ARCHITECTURE = "DeepseekV3ForCausalLM"
SAME_NAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
    "aux_loss_alpha",
)


def reads(hf):
    """Whether a config.json dict is this format (Kimi-K2's says model_type kimi_k2)."""
    return hf.get("model_type") in ("deepseek_v3", "kimi_k2") or ARCHITECTURE in hf.get("architectures", [])


def writes(config):
    """Every model that is not another format's (hf.FORMATS asks the others first)."""
    return True


def to_hf_config(config):
    if config.attention != "mla":
        raise UserError(
            "DeepseekV3 attention is MLA: a model trained with the attention='mha' ablation cannot be exported"
        )
    if config.n_shared_experts < 1:
        raise UserError("DeepseekV3 always has a shared expert: a model with n_shared_experts=0 cannot be exported")
    hf = {name: getattr(config, name) for name in SAME_NAME_FIELDS}
    return hf | {
        "architectures": [ARCHITECTURE],
        "model_type": "deepseek_v3",
        "num_key_value_heads": config.num_attention_heads,
        "moe_layer_freq": 1,
        "rope_interleave": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "seq_aux": True,
        "num_nextn_predict_layers": 0,
    }


def from_hf_config(hf):
    """A KimiConfig from an HF config.json dict, refusing what nanoKimi cannot represent."""
    checks = {
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "attention_bias": False,
        "moe_layer_freq": 1,
        "rope_interleave": True,
    }
    for key, supported in checks.items():
        if key in hf and hf[key] != supported:
            raise UserError(f"{key}={hf[key]!r} is not supported (nanoKimi implements {key}={supported!r})")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise UserError("num_key_value_heads must equal num_attention_heads (MLA has no grouped KV heads)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 / 4.x spelling
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise UserError(f"rope type {kind!r} is not supported (only default and yarn)")
    fields = {name: hf[name] for name in SAME_NAME_FIELDS if name in hf}
    fields |= {"rope_theta": theta, "rope_scaling": rope if kind == "yarn" else None}
    if "aux_loss_alpha" in fields and fields["aux_loss_alpha"] is None:
        del fields["aux_loss_alpha"]
    try:
        return KimiConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot represent this config in nanoKimi: {e}") from None


def to_hf_names(state, config):
    """nanoKimi state dict (`model.` prefixes added) -> checkpoint names: each routed-expert stack as one tensor per
    expert, mlp.experts.E.PROJ.weight."""
    out = {}
    for name, tensor in state.items():
        if ".mlp.experts." in name:
            prefix, proj = name.rsplit(".", 1)
            for e, matrix in enumerate(tensor):
                out[f"{prefix}.{e}.{proj}.weight"] = matrix.contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def from_hf_names(tensors):
    """The checkpoint's names are the ones hf.from_hf_state_dict reads."""
    return tensors
