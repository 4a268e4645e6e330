"""The benchmarks produce well-formed report sections (their numbers are checked by reading them, not here)."""

import re

import pytest

import nanokimi.train
from nanokimi.cli import main


def sections(report):
    text = report.read_text()
    return dict(re.findall(r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", text, re.S))


def test_moe_scaling_and_inference_sections(tmp_path):
    report = tmp_path / "BENCH.md"
    main(["bench", f"--report={report}", "moe-scaling", "--experts", "4", "8", "--repeats=1", "--batch=2",
          "--seq=16"])
    main(["bench", f"--report={report}", "inference", "--contexts", "8", "16", "--new_tokens=4", "--repeats=1"])
    main(["bench", f"--report={report}", "moe-scaling", "--experts", "4", "16", "--repeats=1", "--batch=2",
          "--seq=16"])  # a rerun replaces its section
    found = sections(report)
    assert set(found) == {"moe-scaling", "inference"}
    assert "| 16 | 2 |" in found["moe-scaling"] and "Command: `nanokimi bench" in found["moe-scaling"]
    assert found["inference"].count("nanoKimi, MLA cache") == 2 and "KV-cache bytes" in found["inference"]
    assert found["inference"].count("nanoKimi-MHA ablation, KV cache") == 2 and "peak memory MiB" in found["inference"]


@pytest.mark.slow
def test_optim_report(char_data, tmp_path):
    report = tmp_path / "BENCH.md"
    main(["bench", f"--report={report}", "optim", f"--data={char_data}", f"--out={tmp_path / 'runs'}", "--steps=8",
          "--lrs", "1e-3", "2e-3", "--fractions", "0.5", "--stress_steps=4", "--eval_interval=4", "--eval_iters=1",
          "--batch_size=4", "--block_size=32"])
    body = sections(report)["optim"]
    for needle in ("| 0.002 |", "| muonclip |", "| muon, 0.5x the steps |", "max logit (peak)", "Machine:"):
        assert needle in body, needle
    for plot in ("optim_val_loss.png", "optim_stress.png"):
        assert (tmp_path / "assets" / plot).stat().st_size > 1000


@pytest.mark.slow
def test_compare_quick_report(char_data, tmp_path):
    report = tmp_path / "BENCH.md"
    main(["bench", f"--report={report}", "compare", "--quick", f"--data={char_data}", f"--out={tmp_path / 'runs'}",
          "--batch_size=4", "--block_size=32"])
    body = sections(report)["compare"]
    for needle in ("nanoGPT baseline", "MLA -> MHA", "MoE -> dense", "MuonClip -> AdamW", "MFU", "val perplexity",
                   "time to baseline", "Machine:"):
        assert needle in body, needle
    rows = [line for line in body.splitlines() if line.startswith("| nanoKimi |")]
    assert len(rows) == 4  # main table, ablations, throughput, accounting
    assert (tmp_path / "assets" / "compare_val_loss.png").stat().st_size > 1000


def test_a_stopped_training_run_stops_the_benchmark(char_data, tmp_path, monkeypatch, capsys):
    class StopAtOnce(nanokimi.train.StopRequest):  # as if Ctrl-C arrived during the first step
        def __init__(self):
            super().__init__()
            self.requested = True

    monkeypatch.setattr(nanokimi.train, "StopRequest", StopAtOnce)
    report = tmp_path / "BENCH.md"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", f"--report={report}", "compare", "--quick", f"--data={char_data}", f"--out={tmp_path / 'runs'}",
              "--batch_size=4", "--block_size=32"])
    assert exit_info.value.code != 0 and "the benchmark was stopped" in capsys.readouterr().err
    assert not report.exists()
