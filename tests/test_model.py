import pytest
import torch
import torch.nn.functional as F

from nanokimi import PRESETS, Kimi
from nanokimi.baseline import GPT, GPTConfig
from nanokimi.grouped_gemm import grouped_mm
from nanokimi.hardware import compile_model
from nanokimi.model import KimiConfig, MoE
from tests.conftest import assert_greedy, teacher_forced_logits, tiny_config

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def test_causal():
    model = Kimi(tiny_config()).eval()
    idx = torch.randint(0, 50, (2, 24))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 50, (2, 12))
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize(
    "kw",
    [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}, {"n_group": 2, "topk_group": 1}],
    ids=["q_lora", "direct_q", "yarn", "grouped"],
)
def test_absorbed_cache_matches_full_forward(kw):
    config = tiny_config(**kw)
    model = Kimi(config).eval()
    idx = torch.randint(0, 50, (2, 40))
    full, _ = model(idx)
    cache = model.make_cache(2, 40)
    # the cache holds only the latent and the shared rope key: kv_lora_rank + qk_rope_head_dim per token per layer
    assert cache[0].kv.shape == (2, 40, config.kv_lora_rank) and cache[0].pe.shape == (2, 40, config.qk_rope_head_dim)
    steps = [model(idx[:, :17], cache=cache, start_pos=0)[0]]
    steps += [model(idx[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_mha_ablation_is_causal_and_its_kv_cache_matches_full_forward():
    config = tiny_config(attention="mha")
    model = Kimi(config).eval()
    assert not hasattr(model.layers[0].self_attn, "kv_b_proj")
    idx = torch.randint(0, 50, (2, 30))
    full, _ = model(idx)
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 50
    assert torch.equal(model(changed)[0][:, :20], full[:, :20])
    cache = model.make_cache(2, 30)
    # every head's key and value: nh * (qk_head_dim + v_head_dim) per token per layer, vs MLA's d_c + d_rope
    assert cache[0].k.shape == (2, 2, 30, config.qk_head_dim) and cache[0].v.shape == (2, 2, 30, config.v_head_dim)
    steps = [model(idx[:, :11], cache=cache, start_pos=0)[0], model(idx[:, 11:14], cache=cache, start_pos=11)[0]]
    steps += [model(idx[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(14, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_yarn_changes_frequencies_and_scale():
    plain, yarn = Kimi(tiny_config()), Kimi(tiny_config(rope_scaling=YARN))
    assert yarn.layers[0].self_attn.scale > plain.layers[0].self_attn.scale
    assert not torch.allclose(plain.rope_cos, yarn.rope_cos)


def test_greedy_decoding_with_and_without_cache_follows_the_full_forward():
    model = Kimi(tiny_config()).eval()  # context 64
    idx = torch.randint(0, 50, (1, 5))
    for use_cache in (True, False):
        seq = model.generate(idx, 30, temperature=0, use_cache=use_cache)
        assert_greedy(seq[:, 5:], teacher_forced_logits(model, seq, 5))
    # past the context, uncached decoding slides a window of 64 tokens; the cached one refills its cache with the
    # newest 32 tokens each time it is full (from position 0: positions past the context were never trained)
    seq = model.generate(idx, 100, temperature=0, use_cache=False)
    assert_greedy(seq[:, 5:], teacher_forced_logits(model, seq, 5, max_context=64))
    seq = model.generate(idx, 100, temperature=0, use_cache=True)
    window_start = 0
    for t in range(5, 105):
        if t - window_start > 64:  # full: the newest half (the token just sampled included) prefilled again
            window_start = t - 32
        assert_greedy(seq[:, t : t + 1], teacher_forced_logits(model, seq[:, window_start : t + 1], t - window_start))


def reference_moe(moe, x):
    """Per-token loop over the same weights: the DeepSeek-V3 formulas written plainly."""
    c = moe.config
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        s = torch.sigmoid(moe.gate.weight @ tok)
        chosen = (s + moe.gate.e_score_correction_bias).topk(c.num_experts_per_tok).indices
        w = s[chosen] / s[chosen].sum() * c.routed_scaling_factor
        y = moe.shared_experts(tok)
        for weight, e in zip(w, chosen):
            ex = moe.experts
            y = y + weight * (ex.down_proj[e] @ (F.silu(ex.gate_proj[e] @ tok) * (ex.up_proj[e] @ tok)))
        out.append(y)
    return torch.stack(out).view_as(x)


def test_moe_matches_per_token_reference():
    moe = Kimi(tiny_config(n_routed_experts=8, num_experts_per_tok=3)).layers[1].mlp
    assert isinstance(moe, MoE)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(moe(x)[0], reference_moe(moe, x), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped GEMM")
def test_grouped_mm_op_matches_torch_grouped_mm_and_its_gradients():
    """Our compile-traceable wrapper: the same output and gradients as torch's op, an expert with no tokens included."""
    a, b = torch.randn(10, 8, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # expert 1 gets no rows
    grad = torch.randn(10, 4)
    expected = torch._grouped_mm(a, b, offs=offsets)
    expected_grads = torch.autograd.grad(expected, (a, b), grad)
    out = grouped_mm(a, b, offsets)
    grads = torch.autograd.grad(out, (a, b), grad.expand(10, 4))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, expected_grads)
    assert grads[1][1].abs().max() == 0


@pytest.mark.slow
def test_compiles_as_one_graph_with_the_eager_results():
    """The whole training forward (MLA, routing, grouped expert GEMMs, max-logit recording) traces without a graph
    break, and the compiled model gives eager's loss, max logits and gradients."""
    model = Kimi(tiny_config())
    idx, targets = torch.randint(0, 50, (2, 2, 24)).unbind()
    traced = torch._dynamo.explain(model)(idx, targets, record_max_logits=True)
    assert traced.graph_break_count == 0, [r.reason.splitlines()[0] for r in traced.break_reasons]
    results = []
    for net in (model, compile_model(model)):
        _, loss, max_logits = net(idx, targets, record_max_logits=True)
        loss.backward()
        results.append((loss, max_logits, {n: p.grad for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-4)


def test_bias_changes_selection_not_weights():
    moe = Kimi(tiny_config()).layers[1].mlp
    x = torch.randn(64, 32)
    weights, indices, scores = moe.gate(x)
    moe.gate.e_score_correction_bias[3] = 10.0  # force expert 3 into every token's top-k
    w2, i2, s2 = moe.gate(x)
    assert (i2 == 3).any(dim=1).all() and not torch.equal(indices, i2)
    torch.testing.assert_close(s2, scores)  # scores themselves are unbiased
    expected = scores.gather(1, i2)
    torch.testing.assert_close(w2, expected / expected.sum(1, keepdim=True) * moe.config.routed_scaling_factor)


def test_bias_update_moves_load_toward_balance():
    model = Kimi(tiny_config(n_routed_experts=8))
    moe = model.layers[1].mlp
    with torch.no_grad():
        moe.gate.weight[0] += 0.5 * torch.ones(32)  # skew: expert 0 wins for tokens with positive mean
    x = torch.randn(4, 64, 32).abs()
    imbalance = []
    for _ in range(40):
        moe(x)
        imbalance.append(model.update_expert_bias(gamma=0.01)[0]["max_over_mean"])
    assert imbalance[-1] < 0.6 * imbalance[0]
    assert abs(moe.gate.e_score_correction_bias.sum()) < 1e-5  # centred updates
    assert moe.tokens_per_expert.sum() == 0  # counters reset each step


def test_aux_loss_only_in_training():
    idx = torch.randint(0, 50, (2, 16))
    torch.manual_seed(1)
    with_aux = Kimi(tiny_config(aux_loss_alpha=0.1))
    torch.manual_seed(1)
    without = Kimi(tiny_config(aux_loss_alpha=0.0))
    assert with_aux(idx, idx)[1] > without(idx, idx)[1]
    # evaluation: the loss is the plain cross-entropy, whatever the training forwards before it did
    with_aux.eval()
    logits, loss = with_aux(idx, idx)
    assert loss.item() == F.cross_entropy(logits.flatten(0, 1), idx.flatten()).item()
    assert with_aux.layers[1].mlp.tokens_per_expert.sum() == 2 * 16 * 2  # the training forward only


def test_max_logits_returned_when_asked():
    model = Kimi(tiny_config()).eval()
    idx = torch.randint(0, 50, (2, 16))
    logits, loss, max_logits = model(idx, idx, record_max_logits=True)
    assert max_logits.shape == (2, 2) and len(model(idx, idx)) == 2
    with torch.no_grad():  # doubling head 1's query rows in layer 0 doubles that head's logits, and its max
        model.layers[0].self_attn.q_b_proj.weight.view(2, 16, -1)[1] *= 2
    doubled = model(idx, record_max_logits=True)[2]
    torch.testing.assert_close(doubled[0], max_logits[0] * torch.tensor([1.0, 2.0]))


def test_a_q_lora_rank_of_0_is_none_the_direct_q_projection():
    """0 is DeepSeek-V3's own code's spelling (and a TOML file's, which has no None): one q_proj, no q latent."""
    config = KimiConfig(q_lora_rank=0)
    assert config.q_lora_rank is None and hasattr(Kimi(config).layers[0].self_attn, "q_proj")
    with pytest.raises(ValueError, match="q_lora_rank must be positive or None"):
        KimiConfig(q_lora_rank=-1)


def test_the_presets_are_the_toml_files():
    from nanokimi.models import BASELINE_PRESETS, PRESET_FILES

    assert [*PRESETS, *BASELINE_PRESETS] == [
        "kimi-k2",
        "kimi-linear-48b-a3b",
        "shakespeare-char-cpu",
        "shakespeare-char",
        "gpt-shakespeare-char-cpu",
        "gpt-shakespeare-char",
    ]  # the order `nanokimi train --help` lists them in
    assert {p.name.removesuffix(".toml") for p in PRESET_FILES.iterdir()} == {*PRESETS, *BASELINE_PRESETS}
    k2 = PRESETS["kimi-k2"]  # Kimi-K2-Instruct's config.json (../shared/kimi-k2.md section 1)
    assert (k2.hidden_size, k2.num_hidden_layers, k2.n_routed_experts, k2.num_experts_per_tok) == (7168, 61, 384, 8)
    assert (k2.q_lora_rank, k2.kv_lora_rank, k2.rope_scaling["factor"], k2.routed_scaling_factor) == (
        1536,
        512,
        32.0,
        2.827,
    )
    assert PRESETS["kimi-linear-48b-a3b"].q_lora_rank is None  # config.json's null


def test_kimi_k2_parameter_count_on_meta():
    """Counted tensor by tensor from K2's config.json (DeepSeek-V3's layout), apart from the model's code: a missing
    shared expert (22M per layer), norm or router would show; published: 1.04T total (rounded), 32.6B active."""
    with torch.device("meta"):
        model = Kimi(PRESETS["kimi-k2"])
    h, vocab, layers, heads, q_rank, kv_rank, nope, rope, v = 7168, 163840, 61, 64, 1536, 512, 128, 64, 128
    attention = (
        h * q_rank
        + q_rank
        + q_rank * heads * (nope + rope)  # q_a_proj, q_a_layernorm, q_b_proj
        + h * (kv_rank + rope)
        + kv_rank
        + kv_rank * heads * (nope + v)  # kv_a_proj_with_mqa, norm, kv_b_proj
        + heads * v * h
    )  # o_proj
    expert, routed, active_routed = 3 * h * 2048, 384, 8  # gate, up and down of moe_intermediate_size 2048
    moe = routed * expert + 1 * expert + routed * h  # routed experts, the shared expert, the router
    total = 2 * vocab * h + h + layers * (attention + 2 * h) + 3 * h * 18432 + (layers - 1) * moe
    counts = model.num_params()
    assert counts["total"] == total == 1_026_408_209_408
    assert counts["active"] == total - (layers - 1) * (routed - active_routed) * expert
    assert abs(counts["active"] / 32.6e9 - 1) < 0.01


def test_gradients_reach_every_parameter():
    model = Kimi(tiny_config(q_lora_rank=None))
    idx = torch.randint(0, 50, (4, 32))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_same_seed_same_output():
    idx = torch.randint(0, 50, (2, 16))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(Kimi(tiny_config())(idx)[0])
    assert torch.equal(*outs)


def test_invalid_configs_are_explained():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config(num_experts_per_tok=9)
    with pytest.raises(ValueError, match="divisible by n_group"):
        tiny_config(n_routed_experts=6, n_group=4)


def test_baseline_has_same_interface():
    model = GPT(GPTConfig(n_positions=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    idx = torch.randint(0, 50, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 50) and loss.ndim == 0
    assert model.generate(idx, 40, top_p=0.9, use_cache=False).shape == (2, 48)
    with pytest.raises(ValueError, match="no KV cache"):
        model.generate(idx, 1, use_cache=True)
    kimi = Kimi(tiny_config())
    for m in (model, kimi):  # the interface the trainer and benchmarks use, with no switch on the model class
        assert m.context_length == m.config.context_length and m.flops_per_token(8) > 6 * m.num_params()["active"] / 2
        assert isinstance(m.update_expert_bias(), list) and isinstance(m.attention_layers(), list)
    assert model.attention_layers() == [] and len(kimi.attention_layers()) == 2
