"""Kimi Delta Attention and the Kimi Linear hybrid: the chunked and recurrent delta rules agree (values, carried
state, gradients), cached decoding equals uncached, the optimizer's split, the real preset's size, a hybrid trains,
resumes, samples and evaluates from the command line."""

import json
import math

import pytest
import torch

from nanokimi import checkpoint
from nanokimi.cli import main
from nanokimi.kda import KDACache, chunk_delta_rule, l2_normalize, recurrent_delta_rule
from nanokimi.model import Kimi
from nanokimi.optim import configure_optimizer
from nanokimi.models import PRESETS
from tests.conftest import (
    TINY,
    assert_greedy,
    assert_sampled_greedily,
    cli_error,
    run_cli,
    step_losses,
    teacher_forced_logits,
    tiny_config,
    train_args,
)

HYBRID = dict(
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    num_hidden_layers=3,
    linear_num_heads=2,
    linear_head_dim=8,
    linear_conv_kernel_dim=3,
    mla_use_nope=True,
)
HYBRID_FLAGS = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in HYBRID.items()]


def delta_inputs(B=2, nh=3, T=150, d=16, decay=12.0, seed=0):
    """Random q, k, v, log decays and betas; decay 12 per step makes a chunk of 16 decay by ~e^-96, past fp32's
    range, so a chunked form that split exp(G_i - G_j) into exp(G_i) exp(-G_j) would overflow (and one that
    computed the decays above the diagonal before masking them would turn inf into nan)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, B, nh, T, d, generator=g).unbind(0)
    log_decay = -torch.rand(B, nh, T, d, generator=g) * decay
    beta = torch.rand(B, nh, T, generator=g)
    return l2_normalize(q) * d**-0.5, l2_normalize(k), v, log_decay, beta


@pytest.mark.parametrize("T", [1, 5, 64, 150])
def test_chunked_and_recurrent_forms_agree_with_and_without_a_carried_state(T):
    q, k, v, g, beta = delta_inputs(T=T)
    chunked, state = chunk_delta_rule(q, k, v, g, beta)
    stepped, stepped_state = recurrent_delta_rule(q, k, v, g, beta)
    assert torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, stepped, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, stepped_state, atol=1e-5, rtol=0)
    # in two pieces, the second starting from the first's state (a prefill continued), the cut inside a chunk
    if T > 1:
        cut = max(1, T * 2 // 5)
        first, carried = chunk_delta_rule(*(t[:, :, :cut] for t in (q, k, v, g, beta)))
        second, end = chunk_delta_rule(*(t[:, :, cut:] for t in (q, k, v, g, beta)), state=carried)
        torch.testing.assert_close(torch.cat([first, second], 2), stepped, atol=1e-5, rtol=0)
        torch.testing.assert_close(end, stepped_state, atol=1e-5, rtol=0)
    # against a float64 recurrence: both fp32 forms are accurate, not just alike
    exact, _ = recurrent_delta_rule(*(t.double() for t in (q, k, v, g, beta)))
    torch.testing.assert_close(chunked.double(), exact, atol=1e-5, rtol=0)


def test_a_long_prefill_runs_span_by_span_to_the_same_result(monkeypatch):
    from nanokimi import kda

    q, k, v, g, beta = delta_inputs(T=300, decay=0.5)
    whole, whole_state = chunk_delta_rule(q, k, v, g, beta)
    monkeypatch.setattr(kda, "chunk_span", lambda B, nh, d: 128)  # 300 tokens: spans of 128, 128, 44
    spans, spans_state = chunk_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(spans, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(spans_state, whole_state, atol=1e-5, rtol=0)
    monkeypatch.undo()
    # the span follows the shapes: whole chunks, shorter for a bigger batch or more heads, never under one chunk
    one, many = kda.chunk_span(1, 32, 128), kda.chunk_span(16, 32, 128)
    assert one % kda.CHUNK == many % kda.CHUNK == 0 and many < one and kda.chunk_span(10**6, 64, 128) == kda.CHUNK


@pytest.mark.parametrize("decay", [0.5, 12.0])
def test_gradients_flow_through_both_forms_alike(decay):
    inputs = [t.clone().requires_grad_() for t in delta_inputs(T=100, decay=decay)]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    weight = torch.randn(2, 3, 100, 16)
    for rule, args in ((chunk_delta_rule, inputs), (recurrent_delta_rule, twins)):
        out, state = rule(*args)
        ((out * weight).sum() + state.square().sum()).backward()
    for a, b in zip(inputs, twins):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_the_delta_rule_runs_in_fp32_under_bf16_autocast(monkeypatch):
    """Under autocast the layer's projections run in bf16, but the delta rule (state, decayed scores, triangular
    solve) stays fp32: its output inside autocast is the one it gives the same inputs outside, to fp32 rounding."""
    from nanokimi import kda

    calls = []

    def recorded(*args):
        calls.append((args, kda_rule(*args)))
        return calls[-1][1]

    kda_rule = kda.chunk_delta_rule
    monkeypatch.setattr(kda, "chunk_delta_rule", recorded)
    layer = kda.KDA(tiny_config(**HYBRID)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 70, 32))
    ((args, (o, state)),) = calls
    assert o.dtype == state.dtype == torch.float32
    with torch.no_grad():
        reference, reference_state = kda_rule(*args)
    torch.testing.assert_close(o, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state, reference_state, atol=1e-6, rtol=1e-5)


def test_hybrid_decoding_with_a_constant_state_equals_the_full_forward():
    torch.manual_seed(0)
    model = Kimi(tiny_config(**HYBRID, max_position_embeddings=256)).eval()
    idx = torch.randint(0, 50, (2, 140))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_cache(2, 200)
        pieces = [model(idx[:, :70], cache=cache, start_pos=0)[0]]  # prefill past a chunk boundary
        pieces += [model(idx[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(70, 130)]  # one token a step
        pieces += [model(idx[:, 130:], cache=cache, start_pos=130)[0]]  # several tokens after decoding
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    kda = [c for c in cache if isinstance(c, KDACache)]
    assert len(kda) == 2 and all(c.state.shape == (2, 2, 8, 8) for c in kda)
    small = model.make_cache(2, 20)  # the KDA state does not grow with the context; MLA's latents do
    assert [c.state.shape for c in small if isinstance(c, KDACache)] == [c.state.shape for c in kda]
    for use_cache in (True, False):
        seq = model.generate(idx[:, :9], 40, temperature=0, use_cache=use_cache)
        assert_greedy(seq[:, 9:], teacher_forced_logits(model, seq, 9))


def test_muon_takes_kda_matrices_adamw_its_filters_and_decays_and_qk_clip_only_softmax_attention():
    model = Kimi(tiny_config(**HYBRID))
    opt = configure_optimizer(model, "muonclip", qk_clip_tau=1e-3)
    adamw, muon = opt.optimizers
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    kda = model.layers[0].self_attn
    for p in (
        kda.q_proj.weight,
        kda.b_proj.weight,
        kda.forget_gate.f_b_proj.weight,
        kda.g_a_proj.weight,
        kda.o_proj.weight,
    ):
        assert id(p) in in_muon
    for p in (kda.conv1d.weight, kda.forget_gate.A_log, kda.forget_gate.dt_bias, kda.o_norm.weight):
        assert id(p) not in in_muon
    assert model.attention_layers() == [model.layers[1].self_attn]
    x = torch.randint(0, 50, (2, 32))
    _, loss, max_logits = model(x, x, record_max_logits=True)
    assert max_logits.shape == (1, 2)
    loss.backward()
    before = model.layers[1].self_attn.kv_b_proj.weight.clone()
    opt.step(max_logits=max_logits)  # tau tiny: the MLA layer's heads are clipped, KDA's left alone
    assert not torch.equal(before, model.layers[1].self_attn.kv_b_proj.weight)


def test_kimi_linear_preset_is_the_real_48b_a3b():
    config = PRESETS["kimi-linear-48b-a3b"]
    assert config.layer_types.count("full_attention") == 7 and config.layer_types[3] == "full_attention"
    with torch.device("meta"):
        params = Kimi(config).num_params()
    assert 48e9 <= params["total"] <= 49.5e9  # model card: 48B
    assert 2.9e9 <= params["active"] - params["embedding"] <= 3.2e9  # "A3B": active per token, lookup table aside


@pytest.mark.parametrize(
    "flag, needle",
    [
        ('--layer_types=["linear_attention"]', "layer_types must list 3"),
        ('--layer_types=["x", "x", "x"]', "layer_types must list 3"),
        ("--linear_head_dim=0", "linear_head_dim must be a positive"),
    ],
)
def test_a_hybrid_config_that_cannot_work_is_one_line(char_data, tmp_path, capsys, flag, needle):
    flags = [f for f in HYBRID_FLAGS if not f.startswith(flag.split("=")[0] + "=")]
    err = cli_error(
        capsys,
        *train_args(char_data, tmp_path / "o"),
        *flags,
        flag,
    )
    assert needle in err


def test_a_hybrid_trains_resumes_samples_and_evaluates(char_data, tmp_path):
    out = tmp_path / "run"
    flags = [f"--data={char_data}", f"--out_dir={out}", *TINY, *HYBRID_FLAGS, "--lr=1e-2"]
    main(["train", "shakespeare-char-cpu", *flags, "--max_iters=8", "--lr_decay_iters=12", "--eval_interval=4"])
    main(["train", "shakespeare-char-cpu", *flags, "--resume", "--max_iters=12"])
    main(
        [
            "train",
            "shakespeare-char-cpu",
            *flags,
            f"--out_dir={tmp_path / 'straight'}",
            "--max_iters=12",
            "--eval_interval=4",
        ]
    )
    resumed, straight = step_losses(out), step_losses(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 13)) and all(resumed[s] == straight[s] for s in range(1, 13))
    assert resumed[12] < resumed[1]
    assert checkpoint.Checkpoint(out).model_config["layer_types"] == HYBRID["layer_types"]
    assert_sampled_greedily(out, "ROMEO:", 26)  # 32 tokens: the context
    evaluated = run_cli("eval", out, f"--data={char_data}", "--batches=4")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)  # char-level ASCII text: a byte a token, so bits per byte = per token
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2)) == result["bits_per_token"]
    assert result["loss"] < step_losses(out)[1] - 0.2  # the trained model, not a fresh one


@pytest.mark.slow
def test_a_compiled_hybrid_trains_as_eager(char_data, tmp_path):
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        main(
            [
                *train_args(char_data, tmp_path / name),
                *HYBRID_FLAGS,
                "--max_iters=3",
                "--muon_dtype=float32",
                *extra,
            ]
        )
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and all(compiled[s] == pytest.approx(eager[s], rel=1e-3) for s in eager)
