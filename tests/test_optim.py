import copy

import pytest
import torch

from nanokimi import Kimi
from nanokimi.optim import NS_COEFFICIENTS, Muon, configure_optimizer, qk_clip_factors, zeropower_via_newtonschulz
from tests.conftest import tiny_config


def test_newton_schulz_singular_values_in_band_batched():
    g = torch.randn(4, 48, 96)  # a stack of 4 "experts"
    o = zeropower_via_newtonschulz(g).float()
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.5
    # batched = one matrix at a time (each expert orthogonalised on its own)
    torch.testing.assert_close(o[2], zeropower_via_newtonschulz(g[2]).float())


def update_rms(opt, p, lr):
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    return ((p.detach() - before).pow(2).mean().sqrt() / lr).item()


def test_match_rms_update_is_0_2_lr():
    lr = 1e-2
    matrix = torch.nn.Parameter(torch.randn(256, 128) * 0.02)
    experts = torch.nn.Parameter(torch.randn(4, 256, 128) * 0.02)
    torch_muon = torch.optim.Muon([matrix], lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    assert update_rms(torch_muon, matrix, lr) == pytest.approx(0.2, rel=0.2)
    assert update_rms(Muon([experts], lr=lr, weight_decay=0.0), experts, lr) == pytest.approx(0.2, rel=0.2)


def newton_schulz_fp32(g, steps=5):
    """The reference: one matrix, fp32, the same quintic iteration."""
    a, b, c = NS_COEFFICIENTS
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def test_batched_newton_schulz_equals_per_matrix_fp32():
    grads = torch.randn(6, 48, 32)  # e.g. one projection of 6 layers, batched as Muon batches equal shapes
    batched = zeropower_via_newtonschulz(grads).float()
    reference = torch.stack([newton_schulz_fp32(g) for g in grads])
    # bf16 keeps ~3 significant digits; five iterations of it stay within ~2% of the fp32 result
    assert (batched - reference).abs().max() < 0.03 and (batched - reference).norm() / reference.norm() < 0.03


def test_batched_muon_equals_torch_muon_per_matrix():
    """2-D matrices of two shapes and a 3-D expert stack in one Muon: each matrix gets torch.optim.Muon's update."""
    shapes = [(32, 16), (32, 16), (16, 24), (3, 32, 16)]
    weights = [torch.randn(*s) for s in shapes]
    ours_params = [torch.nn.Parameter(w.clone()) for w in weights]
    singles = [torch.nn.Parameter(m.clone()) for w in weights for m in (w if w.ndim == 3 else [w])]
    ours = Muon(ours_params, lr=0.1, weight_decay=0.1)
    ref = torch.optim.Muon(singles, lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for p, g in zip(ours_params, grads):
            p.grad = g.clone()
        for p, m in zip(singles, [m for g in grads for m in (g if g.ndim == 3 else [g])]):
            p.grad = m.clone()
        ours.step()
        ref.step()
    flat = [m for p in ours_params for m in (p.detach() if p.ndim == 3 else [p.detach()])]
    for mine, theirs in zip(flat, singles):
        torch.testing.assert_close(mine, theirs.detach(), atol=2e-3, rtol=0)


def test_parameter_split():
    model = Kimi(tiny_config())
    opt = configure_optimizer(model, "muonclip")
    kinds = {type(o).__name__: {id(p) for g in o.param_groups for p in g["params"]} for o in opt.optimizers}
    assert id(model.embed_tokens.weight) in kinds["AdamW"] and id(model.lm_head.weight) in kinds["AdamW"]
    assert id(model.layers[0].self_attn.kv_b_proj.weight) in kinds["Muon"]
    assert id(model.layers[1].mlp.gate.weight) in kinds["Muon"]
    assert id(model.layers[1].mlp.experts.gate_proj) in kinds["Muon"]
    assert id(model.norm.weight) in kinds["AdamW"]
    every = set().union(*kinds.values())
    assert every == {id(p) for p in model.parameters()}  # every parameter exactly once
    assert sum(map(len, kinds.values())) == len(every)


def head_max_logits(model, idx):
    return model(idx, record_max_logits=True)[2]


def test_qk_clip_caps_exploding_heads_only():
    torch.manual_seed(0)
    model = Kimi(tiny_config())
    attn = model.layers[0].self_attn
    with torch.no_grad():  # blow up head 1's query and key so its logits exceed tau
        attn.q_b_proj.weight.view(2, 16, -1)[1] *= 30
        attn.kv_b_proj.weight.view(2, 16, -1)[1, :8] *= 30
    idx = torch.randint(0, 50, (2, 32))
    before = head_max_logits(model, idx)
    tau = 5.0
    assert before[0, 1] > tau and before[0, 0] < tau
    kv_a, kv_b = attn.kv_a_proj_with_mqa.weight.clone(), attn.kv_b_proj.weight.clone()
    q_head0 = attn.q_b_proj.weight.view(2, 16, -1)[0].clone()
    opt = configure_optimizer(model, "muonclip", lr=0.0, weight_decay=0.0, qk_clip_tau=tau)  # lr 0: clip only
    _, loss, max_logits = model(idx, idx, record_max_logits=True)
    loss.backward()
    opt.step(max_logits=max_logits)
    after = head_max_logits(model, idx)
    assert after[0, 1] <= tau * (1 + 1e-3) and after[0, 1] == pytest.approx(tau, rel=1e-3)
    assert torch.equal(attn.q_b_proj.weight.view(2, 16, -1)[0], q_head0)  # unclipped head bit-identical
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, kv_a)  # shared rope key (and latent) untouched
    assert torch.equal(attn.kv_b_proj.weight.view(2, 16, -1)[:, 8:], kv_b.view(2, 16, -1)[:, 8:])  # values untouched
    assert torch.equal(attn.kv_b_proj.weight.view(2, 16, -1)[0], kv_b.view(2, 16, -1)[0])


def test_qk_clip_on_mha_ablation_scales_whole_heads():
    model = Kimi(tiny_config(attention="mha"))
    attn = model.layers[0].self_attn
    with torch.no_grad():
        for w in (attn.q_proj.weight, attn.k_proj.weight):
            w.view(2, 16, -1)[1] *= 30
    idx = torch.randint(0, 50, (2, 32))
    before = head_max_logits(model, idx)
    v, q_head0 = attn.v_proj.weight.clone(), attn.q_proj.weight.view(2, 16, -1)[0].clone()
    attn.qk_clip_(qk_clip_factors(before[0], tau=5.0))
    after = head_max_logits(model, idx)
    assert before[0, 1] > 5.0 and after[0, 1] == pytest.approx(5.0, rel=1e-3)
    assert torch.equal(attn.q_proj.weight.view(2, 16, -1)[0], q_head0) and torch.equal(attn.v_proj.weight, v)


def test_qk_clip_is_noop_below_tau():
    model = Kimi(tiny_config())
    before = [p.clone() for p in model.parameters()]
    opt = configure_optimizer(model, "muonclip", lr=0.0, weight_decay=0.0, qk_clip_tau=100.0)
    opt.step(max_logits=torch.tensor([[1.0, 2.0], [3.0, 99.0]]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["muonclip", "muon", "adamw"])
def test_optimizers_reduce_loss(name):
    torch.manual_seed(0)
    model = Kimi(tiny_config())
    opt = configure_optimizer(model, name, lr=3e-3)
    idx = torch.randint(0, 50, (8, 32))
    losses = []
    for _ in range(20):
        _, loss, max_logits = model(idx[:, :-1], idx[:, 1:], record_max_logits=True)
        loss.backward()
        opt.step(max_logits=max_logits)
        opt.zero_grad()
        model.update_expert_bias()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_state_dict_round_trip_resumes_identically():
    idx = torch.randint(0, 50, (4, 17))

    def steps(model, opt, n):
        for _ in range(n):
            _, loss, max_logits = model(idx[:, :-1], idx[:, 1:], record_max_logits=True)
            loss.backward()
            opt.step(max_logits=max_logits)
            opt.zero_grad()

    torch.manual_seed(0)
    a = Kimi(tiny_config())
    opt_a = configure_optimizer(a, "muonclip", lr=1e-2)
    steps(a, opt_a, 3)
    b = Kimi(tiny_config())
    b.load_state_dict(a.state_dict())
    opt_b = configure_optimizer(b, "muonclip", lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read back from disk
    steps(a, opt_a, 3)
    steps(b, opt_b, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
