"""The benchmarks produce well-formed report sections (their numbers are checked by reading them, not here)."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanokimi.train
from nanokimi.bench.report import hardware_kind, machine
from nanokimi.bench.speed import newton_schulz_flops
from nanokimi.hardware import cpu_kind, native_bf16_matmul
from nanokimi.bench.training import RECIPES, check_reproduced
from nanokimi.cli import main
from tests.conftest import SHAKESPEARE, cli_error
from nanokimi.commands.train import parse_value
from nanokimi.errors import UserError
from nanokimi.optim import zeropower_via_newtonschulz


def sections(report):
    text = report.read_text()
    return dict(re.findall(r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", text, re.S))


@pytest.mark.parametrize("shape", [(4, 48, 96), (3, 96, 48), (2, 32, 32)])
def test_newton_schulz_floor_counts_the_iterations_flops(shape):
    """The step benchmark's floor uses the FLOPs torch's own counter sees in Muon's Newton-Schulz (wide and tall)."""
    with FlopCounterMode(display=False) as counter:
        zeropower_via_newtonschulz(torch.randn(*shape))
    assert newton_schulz_flops([shape[1:]] * shape[0]) == counter.get_total_flops()


def test_speed_sections(tmp_path):
    report = tmp_path / "BENCH.md"
    main(["bench", f"--report={report}", "moe-scaling", "--experts", "4", "8", "--repeats=1", "--batch=2", "--seq=16"])
    main(["bench", f"--report={report}", "inference", "--contexts", "8", "16", "--new_tokens=4", "--repeats=1"])
    main(
        ["bench", f"--report={report}", "moe-scaling", "--experts", "4", "16", "--repeats=1", "--batch=2", "--seq=16"]
    )  # a rerun replaces its section
    main(["bench", f"--report={report}", "step", "--shapes", "2x16", "3x8", "--repeats=1", "--rounds=2"])
    found = sections(report)
    step = f"step-{hardware_kind()}"  # one section per CPU kind, named in its stamp
    assert set(found) == {"moe-scaling", "inference", step}
    for needle in (
        "| 2x16 | nanoKimi + MuonClip |",
        "| 3x8 | nanoGPT baseline + AdamW |",
        "of which Newton-Schulz",
        "routing and dispatch",
        "| 2x16 | 3x8 |",
        "Goal: nanoKimi + MuonClip <= 1.3x",
        "| 3x8 | Kimi Linear hybrid (3 KDA : 1 MLA) + MuonClip |",
        "Goal: the Kimi Linear hybrid <= 1.3x nanoKimi's (MLA) step; measured ",
        "matmul peak in its dtype (its floor)",
        "Newton-Schulz's floor alone is",
        "| 2x16 | nanoKimi + MuonClip, Newton-Schulz ",
        "the precision the trainer chooses on this machine by its capability",
        f"CPU {cpu_kind()}, {torch.get_num_threads()} threads",
    ):
        assert needle in found[step], needle
    assert "| 16 | 2 |" in found["moe-scaling"] and "Command: `nanokimi bench" in found["moe-scaling"]
    assert found["inference"].count("nanoKimi, MLA cache") == 2 and "KV-cache bytes" in found["inference"]
    assert found["inference"].count("nanoKimi-MHA ablation, KV cache") == 2 and "peak memory MiB" in found["inference"]


@pytest.mark.slow
def test_optim_report(char_data, tmp_path):
    report = tmp_path / "BENCH.md"
    main(
        [
            "bench",
            f"--report={report}",
            "optim",
            f"--data={char_data}",
            f"--out={tmp_path / 'runs'}",
            "--steps=8",
            "--lrs",
            "1e-3",
            "2e-3",
            "--fractions",
            "0.5",
            "--stress_steps=4",
            "--eval_interval=4",
            "--eval_iters=1",
            "--batch_size=4",
            "--block_size=32",
        ]
    )
    body = sections(report)["optim"]
    precision = f"Newton-Schulz ran in {'bfloat16' if native_bf16_matmul('cpu') else 'float32'} in the Muon runs"
    for needle in ("| 0.002 |", "| muonclip |", "| muon, 0.5x the steps |", "max logit (peak)", "Machine:", precision):
        assert needle in body, needle
    for plot in ("optim_val_loss.png", "optim_stress.png"):
        assert (tmp_path / "assets" / plot).stat().st_size > 1000


@pytest.mark.slow
def test_compare_quick_report(char_data, tmp_path):
    report = tmp_path / "BENCH.md"
    main(["bench", f"--report={report}", "compare", "--quick", f"--data={char_data}", f"--out={tmp_path / 'runs'}"])
    body = sections(report)[f"compare-cpu-{hardware_kind()}"]
    for needle in (
        "nanoGPT recipe (baseline.py)",
        "time to the recipe's val loss",
        "NOT checked",
        "MFU",
        "val loss @ 64",
        "--n_embd=128",
        f"Machine: {machine()}",
        "nanoKimi's Newton-Schulz ran in ",
    ):
        assert needle in body, needle
    assert len([line for line in body.splitlines() if line.startswith("| nanoKimi (")]) == 2  # 0.5x and 1x
    assert (tmp_path / "assets" / f"compare_cpu_{hardware_kind()}.png").stat().st_size > 1000


@pytest.mark.slow
def test_sweep_report(char_data, tmp_path):
    report = tmp_path / "BENCH.md"
    main(
        [
            "bench",
            f"--report={report}",
            "sweep",
            f"--data={char_data}",
            f"--out={tmp_path / 'runs'}",
            "--budget_s=0.5",
            "--shapes",
            "4x32",
            "8x32",
            "--lrs",
            "2e-3",
            "--warmups",
            "2",
            "--eval_batches=1",
        ]
    )
    body = sections(report)["sweep-cpu"]
    for needle in (
        "| batch x block | 4x32",
        "| batch x block | 8x32",
        "| lr (min_lr = lr/10) | 0.002",
        "3 layers",
        "(best)",
        "Best: ",
    ):
        assert needle in body, needle


def flags(command):
    """--name=value pairs of a command line, values parsed."""
    return {k: parse_value(v) for k, v in re.findall(r"--(\w+)=(\S+)", command)}


def test_cpu_recipe_is_nanogpts_own():
    recipe = RECIPES["cpu"]
    given = flags(recipe.command)  # nanoGPT README's CPU command ...
    assert given == dict(
        device="cpu",
        compile=False,
        eval_iters=20,
        log_interval=1,
        block_size=64,
        batch_size=12,
        n_layer=4,
        n_head=4,
        n_embd=128,
        max_iters=2000,
        lr_decay_iters=2000,
        dropout=0.0,
    )
    # ... each flag as the trainer and baseline.py receive it (log_interval only sets how often nanoGPT prints)
    for name, value in given.items():
        if name != "log_interval":
            assert (recipe.model | recipe.train)[name] == value, name
    assert recipe.model["n_positions"] == given["block_size"]  # nanoGPT's model context is its block_size
    # config/train_shakespeare_char.py and train.py's defaults; nanoGPT runs fp32 on a CPU
    assert {
        k: recipe.train[k]
        for k in (
            "lr",
            "min_lr",
            "warmup_iters",
            "beta1",
            "beta2",
            "weight_decay",
            "grad_clip",
            "eval_interval",
            "optimizer",
            "lr_schedule",
            "dtype",
        )
    } == dict(
        lr=1e-3,
        min_lr=1e-4,
        warmup_iters=100,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_interval=250,
        optimizer="adamw",
        lr_schedule="cosine",
        dtype="float32",
    )
    assert recipe.published_val == 1.88 and RECIPES["gpu"].published_val == 1.4697
    # the GPU recipe is config/train_shakespeare_char.py as it stands: the baby GPT, bf16 + compile on a GPU
    gpu = RECIPES["gpu"]
    assert flags(gpu.command) == {}
    assert gpu.model == dict(n_layer=6, n_head=6, n_embd=384, dropout=0.2, n_positions=256)
    assert {k: gpu.train[k] for k in ("batch_size", "block_size", "max_iters", "lr_decay_iters", "eval_iters")} == dict(
        batch_size=64, block_size=256, max_iters=5000, lr_decay_iters=5000, eval_iters=200
    )
    assert (gpu.train["device"], gpu.train["dtype"], gpu.train["compile"]) == ("cuda", "auto", True)
    assert gpu.train | {k: v for k, v in given.items() if k in recipe.train} | {"dtype": "float32"} == recipe.train


def test_compare_refuses_a_baseline_that_does_not_reproduce_nanogpt():
    check_reproduced(RECIPES["cpu"], 1.90)
    with pytest.raises(UserError, match="did not reproduce"):
        check_reproduced(RECIPES["cpu"], 2.10)


def test_a_stopped_training_run_stops_the_benchmark(char_data, tmp_path, monkeypatch, capsys):
    class StopAtOnce(nanokimi.train.StopRequest):  # as if Ctrl-C arrived during the first step
        def __init__(self):
            super().__init__()
            self.requested = True

    monkeypatch.setattr(nanokimi.train, "StopRequest", StopAtOnce)
    report = tmp_path / "BENCH.md"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", f"--report={report}", "compare", "--quick", f"--data={char_data}", f"--out={tmp_path / 'runs'}"])
    assert exit_info.value.code != 0 and "the benchmark was stopped" in capsys.readouterr().err
    assert not report.exists()


@pytest.mark.slow
def test_memory_report_fsdp_halves_the_state_and_ep_sends_tokens_not_experts(tmp_path):
    report = tmp_path / "BENCH.md"
    main(
        [
            "bench",
            f"--report={report}",
            "memory",
            "--preset=shakespeare-char-cpu",
            "--batch_size=2",
            "--block_size=16",
            "--port=29572",
        ]
    )
    body = sections(report)["memory"]
    held = body[: body.index("MiB sent per rank")]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in held.splitlines()
        if " x2 |" in line or "| 1 process |" in line
    }
    state = {name: float(row[4]) for name, row in rows.items()}
    experts = {name: float(row[5]) for name, row in rows.items()}
    assert state["FSDP x2"] <= 0.55 * state["DDP x2"] and state["FSDP+EP x2"] <= 0.55 * state["DDP x2"]
    assert experts["FSDP+EP x2"] == pytest.approx(experts["1 process"] / 2, rel=0.01)
    sent = {
        tuple(cell.strip("| ") for cell in line.split(" | ")[:2]): [
            float(c.strip("| ")) for c in line.split(" | ")[2:5]
        ]
        for line in body.splitlines()
        if "| measured |" in line or "| formula" in line
    }
    for layout in ("FSDP x2", "FSDP+EP x2"):  # the projection's formula is the counted traffic
        measured, formula = sent[(layout, "measured")], sent[(layout, "formula (`project`)")]
        assert measured[:2] == pytest.approx(formula[:2], rel=0.01, abs=0.002)
    assert sent[("FSDP x2", "measured")][2] == 0 < sent[("FSDP+EP x2", "measured")][2]  # all-to-all only under EP
    # EP gathers and reduce-scatters what is not an expert only
    assert sent[("FSDP+EP x2", "measured")][0] < 0.5 * sent[("FSDP x2", "measured")][0]
    assert "Projected to `kimi-k2`" in body and "| 1024 | FSDP+EP |" in body


@pytest.mark.slow
def test_ablate_quick_report(char_data, tmp_path):
    report = tmp_path / "BENCH.md"

    def ablate(out, *options):
        main(
            [
                "bench",
                f"--report={report}",
                "ablate",
                "--quick",
                f"--data={char_data}",
                f"--out={tmp_path / out}",
                *options,
            ]
        )

    def row_names(body, shape="16x64"):
        return [line.split(" | ")[0].strip("| ") for line in body.splitlines() if f" | {shape} | " in line]

    ablate("runs")
    body = sections(report)[f"ablate-{hardware_kind()}"]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in body.splitlines()
        if " | 16x64 | " in line or " | 12x64 | " in line
    }
    assert len(rows) == 9 and "nanoKimi - MoE (dense, equal active params)" in rows and "nanoGPT + Muon" in rows
    assert "nanoKimi + KDA (Kimi Linear: 2 KDA + 1 MLA)" in rows and "KDA beside MLA" in body
    # the dense ablation has the MoE model's active parameters; the MoE model has more in all
    assert (
        rows["nanoKimi - MoE (dense, equal active params)"][1].split(" (")[1]
        == rows["nanoKimi (MLA + MoE + MuonClip)"][1].split(" (")[1]
    )
    assert rows["nanoGPT, its recipe's settings"][2] == "0.001" and "The lr sweep" in body
    assert f"Newton-Schulz ran in {'bfloat16' if native_bf16_matmul('cpu') else 'float32'} in the Muon runs" in body
    assert (tmp_path / "assets" / f"ablate_{hardware_kind()}.png").stat().st_size > 1000
    # --contenders: the rows asked for, beside the shipped run they are measured against
    ablate("kda", "--contenders", "kda")
    body = sections(report)[f"ablate-kda-{hardware_kind()}"]
    assert row_names(body) == [
        "nanoKimi (MLA + MoE + MuonClip)",
        "nanoKimi + KDA (Kimi Linear: 2 KDA + 1 MLA)",
    ]
    # --config: another run (here its 4-layer, 16x128 BPE sibling) as the base; the dense row follows its depth
    ablate("bpe", "--config=gutenberg-bpe-cpu", "--contenders", "dense")
    # each its own section and picture: the whole ablation of the char run stays beside them
    assert list(sections(report)) == [
        f"ablate-{hardware_kind()}",
        f"ablate-kda-{hardware_kind()}",
        f"ablate-gutenberg-bpe-cpu-dense-{hardware_kind()}",
    ]
    assert sections(report)[f"ablate-{hardware_kind()}"].count(" | 16x64 | ") == 8  # and the recipe's 12x64
    assert (tmp_path / "assets" / f"ablate_gutenberg-bpe-cpu-dense-{hardware_kind()}.png").stat().st_size > 1000
    # the shipped run's row alone is a section of its own too, not the whole ablation's
    whole = sections(report)[f"ablate-{hardware_kind()}"]
    ablate("kimi", "--contenders", "kimi")
    assert sections(report)[f"ablate-{hardware_kind()}"] == whole
    assert sections(report)[f"ablate-kimi-{hardware_kind()}"].count(" | 16x64 | ") == 1
    # a Kimi Linear run as the base: its rows say KDA + MLA, not MLA
    ablate("kl", "--config=kimi-linear-shakespeare-char-cpu", "--contenders", "mha")
    body = sections(report)[f"ablate-kimi-linear-shakespeare-char-cpu-mha-{hardware_kind()}"]
    assert row_names(body) == [
        "nanoKimi (KDA + MLA + MoE + MuonClip)",
        "nanoKimi - MLA (MHA beside the KDA layers)",
    ]
    body = sections(report)[f"ablate-gutenberg-bpe-cpu-dense-{hardware_kind()}"]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in body.splitlines() if " | 16x128 | " in line}
    assert list(rows) == ["nanoKimi (MLA + MoE + MuonClip)", "nanoKimi - MoE (dense, equal active params)"]
    active = {name: float(row[1].split(" (")[1].rstrip("M)")) for name, row in rows.items()}
    # 4 dense layers: the MoE run's active parameters, but for the routers' (8 x 128 per MoE layer)
    assert active["nanoKimi - MoE (dense, equal active params)"] == pytest.approx(
        active["nanoKimi (MLA + MoE + MuonClip)"], abs=0.011
    )  # shown to 0.01M
    assert "settings of `gutenberg-bpe-cpu` (16x128" in body
    assert "the sparse MoE " in body.split("every layer dense")[1]  # the MoE question answered without nanoGPT's row


def test_long_context_section_counts_caches_that_grow_and_one_that_stays_flat(tmp_path):
    from nanokimi.bench.long_context import cache_bytes, contenders

    report = tmp_path / "B.md"
    main(
        [
            "bench",
            f"--report={report}",
            "long-context",
            "--contexts",
            "64",
            "256",
            "--new_tokens=3",
            "--rounds=1",
            "--memory_up_to=64",
        ]
    )
    section = report.read_text()
    assert section.count("KDA hybrid 3:1 (Kimi Linear)") >= 3 and "cache GiB" in section
    models = contenders("shakespeare-char-cpu", 4, 512)
    mla, kda, _ = (m.config for m in models.values())
    # MLA's latents grow 4x with 4x the tokens; the hybrid's 3 KDA states do not, only its one MLA layer's cache
    assert cache_bytes(mla, 256) == 4 * cache_bytes(mla, 64)
    kda_state = cache_bytes(kda, 64) - cache_bytes(mla, 64) // 4
    assert kda_state > 0 and cache_bytes(kda, 256) == kda_state + cache_bytes(mla, 256) // 4


def test_prepare_report_times_each_format_with_a_tokenizer_of_the_asked_size(tmp_path):
    report, out = tmp_path / "B.md", tmp_path / "runs"
    for vocab in (300, 400):  # a tokenizer left in --out by another --vocab_size is not reused
        main(
            [
                "bench",
                f"--report={report}",
                "prepare",
                f"--source={SHAKESPEARE}",
                "--sizes_mb",
                "0.2",
                "--formats",
                "txt",
                "jsonl",
                "--vocab_size",
                str(vocab),
                "--limit_mb",
                "1",
                f"--out={out}",
            ]
        )
        body = sections(report)["prepare"]
        assert f"tokenizer.json of {vocab} tokens learnt from 0.2 MB" in body, body
        rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| 0.2 MB")]
        assert [row[1] for row in rows] == ["txt", "jsonl"] and rows[0][3] == rows[1][3]  # the same documents


@pytest.mark.parametrize(
    "argv, message",
    [
        (["long-context", "--new_tokens=1"], "--new_tokens: '1' is not an integer >= 2"),
        (["ablate", "--budget_s=nan"], "--budget_s: 'nan' is not a finite number > 0"),
        (["ablate", "--lrs", "0.01", "-1"], "--lrs: '-1' is not a finite number > 0"),
        (["optim", "--fractions", "inf"], "--fractions: 'inf' is not a finite number > 0"),
        (["prepare", "--source=TEXT", "--sizes_mb", "0"], "--sizes_mb: '0' is not a finite number > 0"),
        (["prepare", "--source=MISSING"], "cannot be read (No such file or directory)"),
        (["prepare", "--source=BINARY"], "is not UTF-8 text"),
        (["prepare", "--source=EMPTY"], "holds no text"),
        (["long-context", "--preset=kimi-k2"], "--preset=kimi-k2 needs about"),
        (["inference", "--preset=kimi-k2"], "--preset=kimi-k2 needs about"),
        (["step", "--preset=kimi-k2"], "--preset=kimi-k2 needs about"),
        (["memory", "--preset=kimi-k2"], "--preset=kimi-k2 needs about"),
        (["step", "--baseline=gpt-5"], "invalid choice: 'gpt-5' (choose from 'gpt-shakespeare-char', "),
        (["inference", "--baseline=shakespeare-char-cpu"], "invalid choice: 'shakespeare-char-cpu'"),
    ],
)
def test_bad_benchmark_options_are_one_line_errors_before_any_work(argv, message, tmp_path, capsys):
    files = {
        "TEXT": SHAKESPEARE,
        "MISSING": tmp_path / "missing",
        "BINARY": tmp_path / "binary",
        "EMPTY": tmp_path / "empty",
    }
    files["BINARY"].write_bytes(bytes(range(256)) * 4)
    files["EMPTY"].write_text("\n\n  \n")
    argv = [a.split("=")[0] + f"={files[a.split('=')[1]]}" if a.split("=")[-1] in files else a for a in argv]
    out = [f"--out={tmp_path / 'o'}"] if argv[0] in ("ablate", "optim", "prepare") else []
    report = tmp_path / "B.md"
    assert message in cli_error(capsys, "bench", f"--report={report}", *argv, *out)
    assert not report.exists() and not (tmp_path / "o").exists()


def test_an_unwritable_report_is_refused_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr("nanokimi.bench.cli.bench_step", lambda args: ran.append(args))
    (tmp_path / "folder.md").mkdir()
    assert "is a folder" in cli_error(capsys, "bench", f"--report={tmp_path / 'folder.md'}", "step")
    assert "cannot write --report" in cli_error(capsys, "bench", f"--report={tmp_path / 'no' / 'B.md'}", "step")
    assert not ran
