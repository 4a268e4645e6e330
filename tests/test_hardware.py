"""Choices that depend on the machine: Newton-Schulz's precision by measurement, the routed-expert GEMM path by
capability, and the line that says what was chosen."""

import json

import pytest
import torch

from nanokimi import Kimi, hardware, optim
from nanokimi.model import grouped_matmul
from nanokimi.optim import configure_optimizer, newton_schulz_dtype, zeropower_via_newtonschulz
from tests.conftest import tiny_config, train
from tests.test_optim import newton_schulz_fp32


def fake_clock(monkeypatch, seconds):
    """time.perf_counter advances by seconds[candidate] during each run(candidate): mocked timings."""
    now = [0.0]
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: now[0])

    def run(candidate):
        now[0] += seconds[candidate]
    return run


@pytest.mark.parametrize("seconds, expected", [
    ({torch.float32: 1.0, torch.bfloat16: 7.0}, torch.float32),  # an AVX2 CPU: bf16 emulated
    ({torch.float32: 1.0, torch.bfloat16: 0.5}, torch.bfloat16),  # AVX-512 bf16 / a GPU
    ({torch.float32: 1.0, torch.bfloat16: 0.95}, torch.float32),  # within the margin: the more precise default
])
def test_fastest_picks_by_measured_time(monkeypatch, seconds, expected):
    chosen, measured = hardware.fastest((torch.float32, torch.bfloat16), fake_clock(monkeypatch, seconds), "cpu")
    assert chosen == expected and measured == pytest.approx(seconds)


@pytest.mark.parametrize("bf16_seconds, expected", [(7.0, torch.float32), (0.5, torch.bfloat16)])
def test_auto_newton_schulz_dtype_follows_the_probe(monkeypatch, bf16_seconds, expected):
    optim.measure_newton_schulz_dtype.cache_clear()
    seconds = {torch.float32: 1.0, torch.bfloat16: bf16_seconds}
    calls = []

    def mocked_fastest(candidates, run, device):
        run(candidates[0])  # the probe runs Newton-Schulz on the optimizer's real shapes
        calls.append(device)
        return hardware.fastest(candidates, fake_clock(monkeypatch, seconds), device)
    monkeypatch.setattr(optim, "fastest", mocked_fastest)
    opt = configure_optimizer(Kimi(tiny_config()), "muonclip")
    muon = opt.optimizers[1]
    assert muon.ns_dtype == expected and muon.ns_timings == pytest.approx(seconds) and calls == ["cpu"]
    assert muon.precision().startswith(f"Newton-Schulz {str(expected)[6:]} (measured: float32 1000.0 ms")
    configure_optimizer(Kimi(tiny_config()), "muonclip")  # the same shapes: measured once per process
    assert len(calls) == 1
    optim.measure_newton_schulz_dtype.cache_clear()


@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_forced_newton_schulz_dtype_is_not_measured(monkeypatch, forced):
    monkeypatch.setattr(optim, "measure_newton_schulz_dtype", lambda *a: pytest.fail("measured a forced dtype"))
    assert newton_schulz_dtype({(8, 8): 1}, "cpu", forced) == (getattr(torch, forced), None)
    muon = configure_optimizer(Kimi(tiny_config()), "muon", muon_dtype=forced).optimizers[1]
    assert muon.ns_dtype == getattr(torch, forced) and muon.precision().endswith("(as set)")


def test_fp32_newton_schulz_equals_the_fp32_reference():
    grads = torch.randn(5, 48, 32)
    reference = torch.stack([newton_schulz_fp32(g) for g in grads])
    torch.testing.assert_close(zeropower_via_newtonschulz(grads, dtype=torch.float32), reference, atol=1e-4, rtol=1e-4)


def test_trainer_names_its_choices_and_resume_keeps_them(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=3", "--eval_interval=3", "--muon_dtype=float32")
    first = capsys.readouterr().out.splitlines()[0]
    assert f"CPU {hardware.cpu_kind()}, {torch.get_num_threads()} threads" in first
    assert "expert GEMM grouped" in first and "Newton-Schulz float32 (as set)" in first
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["muon_dtype"] == "float32"
    train(char_data, out, "--max_iters=5", "--eval_interval=3", "--resume")  # saved settings: muon_dtype kept
    assert "Newton-Schulz float32" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped GEMM")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_gemm_paths_agree(dtype):
    """The grouped kernel and the per-expert loop: the same output and gradients, an expert with no rows included."""
    a, b = torch.randn(12, 16, dtype=dtype), torch.randn(3, 16, 8, dtype=dtype)
    offsets = torch.tensor([5, 5, 12], dtype=torch.int32)
    grad = torch.randn(12, 8, dtype=dtype)
    results = []
    for path in ("grouped", "loop"):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = grouped_matmul(a_, b_, offsets, path)
        results.append((out, *torch.autograd.grad(out, (a_, b_), grad)))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results[0], results[1], **tolerance)


@pytest.mark.parametrize("device, dtype, widths, capability, expected", [
    ("cpu", torch.float32, (128, 128), None, "grouped"),
    ("cpu", torch.float32, (30, 128), None, "loop"),  # 120-byte rows: torch's kernel needs 16-byte alignment
    ("cuda", torch.bfloat16, (128, 128), (9, 0), "grouped"),  # H100: torch's fast kernel
    ("cuda", torch.bfloat16, (128, 128), (8, 0), "grouped"),  # A100
    ("cuda", torch.float16, (128, 128), (8, 0), "loop"),  # fp16: no grouped kernel
    ("cuda", torch.float16, (128, 128), (7, 5), "loop"),  # T4
    ("cuda", torch.float32, (128, 128), (9, 0), "loop"),
])
def test_expert_gemm_path_by_capability(monkeypatch, device, dtype, widths, capability, expected):
    monkeypatch.setattr(hardware, "cuda_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert hardware.expert_gemm_path(device, dtype, widths) == expected


def test_unaligned_widths_train():
    """hidden_size=30: rows torch's grouped kernel refuses; the loop path takes them."""
    model = Kimi(tiny_config(hidden_size=30))
    idx = torch.randint(0, 50, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.layers[1].mlp.experts.gate_proj.grad.abs().sum() > 0
