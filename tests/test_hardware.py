"""Choices that depend on the machine: Newton-Schulz's precision and the routed-expert GEMM path, each by
capability, and the line that says what was chosen."""

import json
import os
import time

import pytest
import torch

from nanokimi import Kimi, hardware
from nanokimi.grouped_gemm import grouped_matmul
from nanokimi.optim import configure_optimizer, newton_schulz_dtype, zeropower_via_newtonschulz
from tests.conftest import run_cli, tiny_config, train, train_args
from tests.test_optim import newton_schulz_fp32


@pytest.mark.parametrize(
    "device, avx512_bf16, amx, aten, onednn_bf16, capability, expected",
    [
        ("cpu", False, False, "AVX2", False, None, torch.float32),  # AVX2: bf16 emulated, ~7x slower
        ("cpu", True, False, "AVX512", True, None, torch.bfloat16),  # Zen 4 / Ice Lake: AVX-512 bf16
        ("cpu", False, True, "AVX512", True, None, torch.bfloat16),  # Sapphire Rapids: AMX
        ("cpu", False, False, "AVX512", True, None, torch.float32),  # Skylake-X: AVX-512 without bf16 instructions
        ("cpu", True, False, "AVX2", True, None, torch.float32),  # ATEN_CPU_CAPABILITY=avx2 on a Zen 4
        ("cpu", True, True, "AVX512", False, None, torch.float32),  # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN has no bf16 kernel
        ("cuda", False, False, "AVX2", False, (9, 0), torch.bfloat16),  # H100
        ("cuda", False, False, "AVX2", False, (8, 0), torch.bfloat16),  # A100
        ("cuda", True, False, "AVX512", True, (7, 5), torch.float32),  # T4: no bf16 tensor cores
        ("mps", True, False, "AVX512", True, None, torch.float32),
    ],
)
def test_auto_newton_schulz_dtype_by_capability(
    monkeypatch, device, avx512_bf16, amx, aten, onednn_bf16, capability, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(hardware, "cuda_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert newton_schulz_dtype(device) == expected


def test_the_avx2_emulation_variables_choose_fp32_and_say_avx2(char_data, tmp_path):
    """How this project measures the AVX2 kind on an AVX-512 machine: the rule reads what torch runs, not CPUID, so
    the trainer takes fp32 Newton-Schulz and names the CPU "AVX2" (on an AVX2 CPU the same holds by itself)."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    result = run_cli(
        *train_args(char_data, tmp_path / "run"),
        "--max_iters=1",
        "--eval_interval=1",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "CPU AVX2, " in first and "Newton-Schulz float32 (auto: no native bf16 matmul on CPU AVX2)" in first, first


def test_auto_newton_schulz_dtype_does_not_flip_with_load(monkeypatch):
    """The choice is a rule: the same on an idle machine and on one whose clock another job steals (no timing)."""
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("the precision choice timed something"))
    choices = {configure_optimizer(Kimi(tiny_config()), "muonclip").optimizers[1].ns_dtype for _ in range(3)}
    assert choices == {torch.bfloat16 if hardware.native_bf16_matmul("cpu") else torch.float32}
    assert configure_optimizer(Kimi(tiny_config()), "muon").optimizers[1].precision() == (
        f"Newton-Schulz {str(choices.pop())[6:]} (auto: "
        f"{'native' if hardware.native_bf16_matmul('cpu') else 'no native'} bf16 matmul on CPU {hardware.cpu_kind()})"
    )


@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_forced_newton_schulz_dtype(forced):
    assert newton_schulz_dtype("cpu", forced) == getattr(torch, forced)
    muon = configure_optimizer(Kimi(tiny_config()), "muon", muon_dtype=forced).optimizers[1]
    assert muon.ns_dtype == getattr(torch, forced) and muon.precision().endswith("(as set)")


def test_fp32_newton_schulz_equals_the_fp32_reference():
    grads = torch.randn(5, 48, 32)
    reference = torch.stack([newton_schulz_fp32(g) for g in grads])
    torch.testing.assert_close(zeropower_via_newtonschulz(grads, dtype=torch.float32), reference, atol=1e-4, rtol=1e-4)


def test_trainer_names_its_choices_and_resume_keeps_them(char_data, tmp_path, capsys):
    """The run is started in the precision this machine would NOT choose, so a resume that re-chose would show."""
    forced = "float32" if hardware.native_bf16_matmul("cpu") else "bfloat16"
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=3", "--eval_interval=3", f"--muon_dtype={forced}")
    first = capsys.readouterr().out.splitlines()[0]
    assert f"CPU {hardware.cpu_kind()}, {torch.get_num_threads()} threads" in first
    assert "expert GEMM grouped" in first and f"Newton-Schulz {forced} (as set)" in first
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["muon_dtype"] == forced
    train(char_data, out, "--max_iters=5", "--eval_interval=3", "--resume")  # saved settings: muon_dtype kept
    assert f"Newton-Schulz {forced} (as set)" in capsys.readouterr().out


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


@pytest.mark.parametrize(
    "device, dtype, widths, capability, expected",
    [
        ("cpu", torch.float32, (128, 128), None, "grouped"),
        ("cpu", torch.float32, (30, 128), None, "loop"),  # 120-byte rows: torch's kernel needs 16-byte alignment
        ("cuda", torch.bfloat16, (128, 128), (9, 0), "grouped"),  # H100: torch's fast kernel
        ("cuda", torch.bfloat16, (128, 128), (8, 0), "grouped"),  # A100
        ("cuda", torch.float16, (128, 128), (8, 0), "loop"),  # fp16: no grouped kernel
        ("cuda", torch.float16, (128, 128), (7, 5), "loop"),  # T4
        ("cuda", torch.float32, (128, 128), (9, 0), "loop"),
    ],
)
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
