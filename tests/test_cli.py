"""The command line's contract: bad input is a one-line error with exit code 2, never a traceback."""

import json

import pytest

from nanokimi.cli import main
from nanokimi.config import TrainConfig, load_train_config
from tests.conftest import TINY, cli_error, run_cli, train_args


@pytest.mark.parametrize(
    "case",
    [
        "missing_data",
        "empty_input",
        "short_data",
        "unknown_dataset",
        "bad_model_value",
        "bad_train_value",
        "unknown_setting",
        "unknown_preset",
        "missing_checkpoint",
        "fsdp_without_torchrun",
        "ep_without_torchrun",
    ],
)
def test_bad_input_gives_one_line_error(case, char_data, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be" * 2)
    tiny_run = train_args(char_data, tmp_path / "o")
    argv, expected = {
        "missing_data": (
            ["train", "shakespeare-char-cpu", f"--data={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"],
            "nanokimi prepare",
        ),
        "empty_input": (["prepare", "text", f"--input={empty}", f"--out={tmp_path / 'd'}"], "empty"),
        "unknown_dataset": (["prepare", "wikitext", f"--out={tmp_path / 'd'}"], "unknown dataset"),
        "short_data": (None, "block_size+1"),
        "bad_model_value": (tiny_run + ["--num_experts_per_tok=99"], "num_experts_per_tok"),
        "bad_train_value": (tiny_run + ["--lr=-1"], "lr"),
        "unknown_setting": (tiny_run + ["--n_experts=4"], "n_experts"),
        "unknown_preset": (["train", "gpt-5"], "unknown run or preset"),
        "missing_checkpoint": (["sample", tmp_path / "nothing"], "no checkpoint"),
        "fsdp_without_torchrun": (tiny_run + ["--fsdp"], "torchrun --nproc_per_node=N"),
        "ep_without_torchrun": (tiny_run + ["--fsdp", "--ep"], "--fsdp --ep`"),
    }[case]
    if case == "short_data":
        main(["prepare", "text", f"--input={short}", f"--out={tmp_path / 's'}"])
        argv = train_args(tmp_path / "s", tmp_path / "o")
    assert expected in cli_error(capsys, *argv)


def test_every_command_declares_itself_in_one_pattern():
    """A command module's docstring is its help (one line) and its description; NAME, run, and add_arguments unless
    another parser reads its line (PASS_THROUGH)."""
    from nanokimi.cli import COMMANDS, build_parser

    commands = build_parser()._subparsers._group_actions[0]
    listed = {action.dest: action.help for action in commands._choices_actions}
    for module in COMMANDS:
        summary, blank, description = module.__doc__.partition("\n\n")
        assert blank and "\n" not in summary and description.strip(), module.NAME
        assert listed[module.NAME] == summary and commands.choices[module.NAME].description == description
        assert callable(module.run)
        assert hasattr(module, "add_arguments") != getattr(module, "PASS_THROUGH", False), module.NAME


def test_no_traceback_from_subprocess(tmp_path):
    result = run_cli("sample", tmp_path / "missing")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flag",
    [
        "--beta1=2",
        "--weight_decay=-1",
        "--initializer_range=-0.02",
        "--rope_scaling=foo",
        '--rope_scaling={"type":"yarn"}',
        "--device=mps",
        "--device=cuda:0",
        "--device=foo",
        "--grad_clip=-1",
        "--rms_norm_eps=-1",
        "--rope_theta=0",
        "--qk_clip_tau=-1",
        "--n_positions=0",
    ],
)
def test_invalid_settings_are_named(flag, char_data, tmp_path, capsys):
    name = flag[2:].split("=")[0]
    preset = "gpt-shakespeare-char-cpu" if name == "n_positions" else "shakespeare-char-cpu"
    err = cli_error(capsys, "train", preset, f"--data={char_data}", f"--out_dir={tmp_path / 'o'}", *TINY[-6:], flag)
    assert name in err and err.count("error:") == 1, err  # the setting's whole name, in one line
    assert not (tmp_path / "o" / "checkpoint").exists()


@pytest.mark.parametrize(
    "case",
    [
        "cuda",
        "mps",
        "foo",
        "tiny_temperature",
        "model_not_a_dict",
        "rope_scaling_str",
        "meta_without_chars",
        "no_newline",
    ],
)
def test_sample_problems_are_one_line(case, char_data, tmp_path, capsys):
    out = tmp_path / "run"
    main([*train_args(char_data, out), "--max_iters=1"])
    config = out / "checkpoint" / "config.json"
    args = {
        "cuda": ["--device=cuda:0"],
        "mps": ["--device=mps"],
        "foo": ["--device=foo"],
        "tiny_temperature": ["--temperature=1e-45"],
    }.get(case, [])
    if case in ("model_not_a_dict", "rope_scaling_str"):
        saved = json.loads(config.read_text())
        saved["model"] = "abc" if case == "model_not_a_dict" else saved["model"] | {"rope_scaling": "yarn"}
        config.write_text(json.dumps(saved))
    if case == "meta_without_chars":
        (out / "checkpoint" / "meta.json").write_text('{"tokenizer": "char", "vocab_size": 3}')
    if case == "no_newline":  # a vocabulary without "\n": the default prompt is the problem, not the user's typing
        meta = json.loads((out / "checkpoint" / "meta.json").read_text())
        meta["chars"] = [c if c != "\n" else "~" for c in meta["chars"]]
        (out / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    err = cli_error(capsys, "sample", out, "--max_new_tokens=3", *args)
    expected = {
        "cuda": "CUDA",
        "mps": "MPS",
        "foo": "unknown device",
        "tiny_temperature": "temperature",
        "model_not_a_dict": "not a nanoKimi checkpoint",
        "rope_scaling_str": "rope_scaling",
        "meta_without_chars": "chars",
        "no_newline": "--prompt",
    }[case]
    assert expected in err


def test_named_run_is_the_shipped_toml_from_any_folder(tmp_path, monkeypatch):
    """`nanokimi train shakespeare-char-cpu` is the tuned CPU run (the TOML inside the package), wherever it is typed;
    a model preset without a run takes TrainConfig's defaults; a TOML file of one's own still works."""
    monkeypatch.chdir(tmp_path)
    cfg, model = load_train_config("shakespeare-char-cpu", {"max_iters": 7})
    assert (cfg.batch_size, cfg.block_size, cfg.lr, cfg.max_iters) == (16, 64, 6e-3, 7)
    assert model == {"num_hidden_layers": 3, "max_position_embeddings": 64, "dropout": 0.0}
    assert load_train_config("shakespeare-char")[0].block_size == 256  # the GPU run
    assert load_train_config("finetune-shakespeare-char")[0].lr == 5e-4
    cfg, model = load_train_config("gpt-shakespeare-char-cpu")
    assert (cfg.preset, cfg.batch_size, cfg.lr, model) == (
        "gpt-shakespeare-char-cpu",
        TrainConfig.batch_size,
        TrainConfig.lr,
        {},
    )
    (tmp_path / "mine.toml").write_text('preset = "shakespeare-char-cpu"\nbatch_size = 3\n[model]\nhidden_size = 64\n')
    cfg, model = load_train_config("mine.toml")
    assert cfg.batch_size == 3 and model == {"hidden_size": 64}


def test_train_help_lists_every_setting():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for run in ("shakespeare-char-cpu", "shakespeare-char", "finetune-shakespeare-char", "gutenberg-bpe-cpu"):
        assert f"\n  {run} " in result.stdout, run
    assert "The tuned CPU run" in result.stdout
    for setting in (
        "--max_iters=2000",
        "--qk_clip_tau=100.0",
        "--n_routed_experts=8",
        "--n_positions=256",
        "--overwrite=False",
    ):
        assert setting in result.stdout, setting
    assert "peak learning rate" in result.stdout  # the comment beside the field


def test_a_log_file_gets_plain_lines(char_data, tmp_path):
    result = run_cli(
        *train_args(char_data, tmp_path / "o"),
        "--max_iters=3",
        "--progress=true",
    )
    assert result.returncode == 0 and "\r" not in result.stdout + result.stderr
    assert "step 3: loss" in result.stdout
