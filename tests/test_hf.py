import io
import json

import pytest
import torch

import nanokimi
from nanokimi.cli import main
from nanokimi.sample import sample
from tests.conftest import assert_greedy, cli_error, teacher_forced_logits, train_args

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=2,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return transformers.DeepseekV3Config(**(base | kw))


def yarn(**kw):  # sequences of 20 tokens run past original_max_position_embeddings, into YaRN's interpolated range
    return {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
        }
        | kw
    }


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"q_lora_rank": None},
        yarn(mscale=1.0, mscale_all_dim=1.0),
        yarn(mscale=1.0, mscale_all_dim=0.7, truncate=False),
        yarn(),
    ],
    ids=["q_lora", "direct_q", "yarn_k2", "yarn_unequal_mscales", "yarn_no_mscales"],
)
def test_import_transformers_model_gives_same_logits(tmp_path, kw):
    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)  # large enough that attention is sharp and a wrong rope scale shows
        for layer in reference.model.layers[2:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    reference.save_pretrained(tmp_path / "hf")
    model = nanokimi.from_pretrained(tmp_path / "hf")
    assert model.config.n_group == 2 and model.config.first_k_dense_replace == 2
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        expected = reference(idx).logits
    torch.testing.assert_close(model(idx)[0], expected, atol=1e-4, rtol=0)
    # and through the CLI, into a checkpoint that `sample` can read
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    torch.testing.assert_close(nanokimi.from_pretrained(tmp_path / "imported")(idx)[0], expected, atol=1e-4, rtol=0)
    # and back out: transformers reads nanoKimi's export (rope settings included) to the same logits
    nanokimi.save_pretrained(model, tmp_path / "exported", format="hf")
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()(idx).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(char_data, tmp_path):
    out = tmp_path / "run"
    main(
        [
            *train_args(char_data, out),
            "--max_iters=6",
            "--bias_update_gamma=0.01",
        ]
    )
    model = nanokimi.from_pretrained(out)
    assert model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    main(["export", str(out), str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_interleave"] is True
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    bias = reference.model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(bias, model.layers[1].mlp.gate.e_score_correction_bias)
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx).logits, atol=1e-4, rtol=0)
    # greedy generation: transformers' generate == `nanokimi sample --temperature=0`
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    prompt = "ROMEO:"
    ids = torch.tensor([tokenizer.encode(prompt)])
    start = ids.shape[1]
    hf_seq = reference.generate(ids, max_new_tokens=20, do_sample=False)
    ours = torch.tensor([tokenizer.encode(sample(out, prompt, max_new_tokens=20, temperature=0, out=io.StringIO())[0])])
    assert ours.shape == hf_seq.shape and torch.equal(ours[:, :start], ids)
    assert_greedy(hf_seq[:, start:], teacher_forced_logits(model, hf_seq, start))  # each side's greedy tokens are
    assert_greedy(ours[:, start:], teacher_forced_logits(reference, ours, start))  # the other's, ties aside
    # and the nanoKimi round trip: nanokimi.save_pretrained(format="hf") -> nanokimi.from_pretrained
    nanokimi.save_pretrained(model, tmp_path / "again", format="hf")
    torch.testing.assert_close(nanokimi.from_pretrained(tmp_path / "again")(idx)[0], model(idx)[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}, "rope type 'linear'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "rope type 'dynamic'"),
        ({"num_key_value_heads": 1}, "no grouped KV heads"),
        ({"rope_interleave": False}, "rope_interleave=False is not supported"),
    ],
    ids=["softmax", "linear_rope", "dynamic_rope_4x_spelling", "grouped_kv", "rope_not_interleaved"],
)
def test_import_refuses_what_it_cannot_represent(change, message, tmp_path, capsys):
    reference = transformers.DeepseekV3ForCausalLM(hf_config())
    reference.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | change))
    assert message in cli_error(capsys, "import", tmp_path / "hf", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_import_reads_fused_experts_and_skips_mtp_layers(tmp_path):
    """transformers' in-memory layout (fused experts.gate_up_proj [E, 2I, H] and down_proj) reads as the saved
    per-expert one; a multi-token-prediction layer (DeepSeek-V3's layer 61, here 3) is skipped with a warning."""
    import shutil
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(hf_config()).eval()
    reference.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        expected = reference(idx).logits
    fused = tmp_path / "fused"
    shutil.copytree(tmp_path / "hf", fused)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert "model.layers.2.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(nanokimi.from_pretrained(fused)(idx)[0], expected, atol=1e-5, rtol=0)
    mtp = tmp_path / "mtp"
    shutil.copytree(tmp_path / "hf", mtp)
    tensors = load_file(mtp / "model.safetensors")
    tensors |= {k.replace("layers.2.", "layers.3."): v.clone() for k, v in tensors.items() if ".layers.2." in k}
    tensors |= {f"model.layers.3.{name}.weight": torch.ones(32) for name in ("enorm", "hnorm")}
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, mtp / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mtp / "config.json").read_text())
    (mtp / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match=r"multi-token-prediction layer\(s\) \[3\]"):
        model = nanokimi.from_pretrained(mtp)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], expected, atol=1e-5, rtol=0)


def kimi_linear_config(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        linear_num_heads=2,
        linear_head_dim=8,
        linear_conv_kernel_dim=4,
        model_max_length=512,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.KimiLinearConfig(**(base | kw))


LINEAR, FULL = "linear_attention", "full_attention"


@pytest.mark.parametrize(
    "kw",
    [
        {"layer_types": [LINEAR, LINEAR, LINEAR, FULL]},
        {
            "layer_types": [FULL, LINEAR, LINEAR, LINEAR],
            "q_lora_rank": 12,
            "linear_head_dim": 16,
            "linear_num_heads": 3,
            "linear_conv_kernel_dim": 2,
        },
        {
            "num_hidden_layers": 3,
            "layer_types": [LINEAR, FULL, LINEAR],
            "mlp_layer_types": ["dense", "dense", "sparse"],
            "n_group": 2,
            "topk_group": 1,
        },
    ],
    ids=["kda_kda_kda_mla", "mla_first_wide_kda", "two_dense_grouped"],
)
def test_kimi_linear_imports_and_exports_with_transformers_logits_and_greedy_tokens(tmp_path, kw):
    """A KimiLinearForCausalLM built by transformers -> nanoKimi (same logits past a 64-token chunk, same greedy
    tokens) -> exported back and loaded by transformers (same logits)."""
    torch.manual_seed(0)
    reference = transformers.KimiLinearForCausalLM(kimi_linear_config(**kw)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if not name.endswith(("A_log", "dt_bias")):  # decay rates keep transformers' (fla's) init
                p.normal_(0, 0.1)
        for module in reference.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    reference.save_pretrained(tmp_path / "hf")
    model = nanokimi.from_pretrained(tmp_path / "hf")
    assert model.config.layer_types == reference.config.layer_types and model.config.mla_use_nope
    idx = torch.randint(0, 64, (2, 150))
    with torch.no_grad():
        expected = reference(idx).logits
        torch.testing.assert_close(model(idx)[0], expected, atol=1e-4, rtol=0)
        prompt = idx[:1, :12]
        hf_tokens = reference.generate(prompt, max_new_tokens=30, do_sample=False)
    assert_greedy(hf_tokens[:, 12:], teacher_forced_logits(model, hf_tokens, 12))
    ours = model.generate(prompt, 30, temperature=0)
    assert_greedy(ours[:, 12:], teacher_forced_logits(reference, ours, 12))
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    main(["export", str(tmp_path / "imported"), str(tmp_path / "exported")])
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["KimiLinearForCausalLM"] and config["layer_types"] == model.config.layer_types
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
        torch.testing.assert_close(reloaded(idx).logits, expected, atol=1e-4, rtol=0)
        reloaded_tokens = reloaded.generate(prompt, max_new_tokens=30, do_sample=False)
    assert_greedy(reloaded_tokens[:, 12:], teacher_forced_logits(reference, reloaded_tokens, 12))


def test_a_hybrid_with_rotary_mla_is_not_exported_as_kimi_linear(tmp_path, capsys):
    from tests.conftest import tiny_config

    model = nanokimi.Kimi(tiny_config(layer_types=[LINEAR, FULL]))
    with pytest.raises(nanokimi.errors.UserError, match="mla_use_nope"):
        nanokimi.save_pretrained(model, tmp_path / "hf", format="hf")


def test_kimi_linear_config_in_moonshots_own_spelling_imports_alike(tmp_path):
    """moonshotai/Kimi-Linear-48B-A3B's config.json names things its own way: linear_attn_config with 1-indexed
    kda_layers / full_attn_layers, first_k_dense_replace, num_experts, num_experts_per_token, moe_renormalize,
    model_max_length; no layer_types. The same weights give the same logits under either spelling."""
    torch.manual_seed(0)
    reference = transformers.KimiLinearForCausalLM(
        kimi_linear_config(
            layer_types=[LINEAR, LINEAR, LINEAR, FULL], mlp_layer_types=["dense", "sparse", "sparse", "sparse"]
        )
    ).eval()
    reference.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    moonshot = {
        k: v
        for k, v in config.items()
        if k not in ("layer_types", "mlp_layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim")
    }
    moonshot |= {
        "first_k_dense_replace": 1,
        "mla_use_nope": True,
        "moe_router_activation_func": "sigmoid",
        "linear_attn_config": {
            "kda_layers": [1, 2, 3],
            "full_attn_layers": [4],
            "num_heads": 2,
            "head_dim": 8,
            "short_conv_kernel_size": 4,
        },
    }
    (tmp_path / "hf" / "config.json").write_text(json.dumps(moonshot))
    model = nanokimi.from_pretrained(tmp_path / "hf")
    assert model.config.layer_types == [LINEAR, LINEAR, LINEAR, FULL] and model.config.first_k_dense_replace == 1
    idx = torch.randint(0, 64, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx).logits, atol=1e-4, rtol=0)
    linear = moonshot["linear_attn_config"]
    for wrong, needle in (
        ({"mla_use_nope": False}, "mla_use_nope"),
        ({"mlp_layer_types": ["sparse", "dense", "sparse", "sparse"]}, "dense layers after"),
        ({"linear_attn_config": linear | {"gate_lower_bound": -5.0}}, "gate_lower_bound=-5.0"),
        ({"gate_lower_bound": -5.0}, "gate_lower_bound=-5.0"),
        ({"linear_attn_config": linear | {"use_short_conv": False}}, "linear_attn_config.use_short_conv is not"),
        ({"layer_types": [FULL, LINEAR, LINEAR, LINEAR]}, "contradicts"),
        (
            {"linear_attn_config": {k: v for k, v in linear.items() if k != "full_attn_layers"}},
            "has kda_layers but no full_attn_layers",
        ),
        ({"linear_attn_config": linear | {"full_attn_layers": [3]}}, "each of the 4 layers once"),
    ):
        (tmp_path / "hf" / "config.json").write_text(json.dumps(moonshot | wrong))
        with pytest.raises(nanokimi.errors.UserError, match=needle):
            nanokimi.from_pretrained(tmp_path / "hf")
