"""The command line's contract: bad input is a one-line error with exit code 2, never a traceback."""

import pytest

from nanokimi.cli import main
from tests.conftest import TINY, cli_error, run_cli


@pytest.mark.parametrize("case", ["missing_data", "empty_input", "short_data", "unknown_dataset", "bad_model_value",
                                  "bad_train_value", "unknown_setting", "unknown_preset", "missing_checkpoint"])
def test_bad_input_gives_one_line_error(case, char_data, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be" * 2)
    train_args = ["train", "shakespeare-char-cpu", f"--data={char_data}", f"--out_dir={tmp_path / 'o'}", *TINY]
    argv, expected = {
        "missing_data": (["train", "shakespeare-char-cpu", f"--data={tmp_path / 'nope'}",
                          f"--out_dir={tmp_path / 'o'}"], "nanokimi prepare"),
        "empty_input": (["prepare", "text", f"--input={empty}", f"--out={tmp_path / 'd'}"], "empty"),
        "unknown_dataset": (["prepare", "wikitext", f"--out={tmp_path / 'd'}"], "unknown dataset"),
        "short_data": (None, "block_size+1"),
        "bad_model_value": (train_args + ["--num_experts_per_tok=99"], "num_experts_per_tok"),
        "bad_train_value": (train_args + ["--lr=-1"], "lr"),
        "unknown_setting": (train_args + ["--n_experts=4"], "n_experts"),
        "unknown_preset": (["train", "gpt-5"], "unknown preset"),
        "missing_checkpoint": (["sample", tmp_path / "nothing"], "no checkpoint"),
    }[case]
    if case == "short_data":
        main(["prepare", "text", f"--input={short}", f"--out={tmp_path / 's'}"])
        argv = ["train", "shakespeare-char-cpu", f"--data={tmp_path / 's'}", f"--out_dir={tmp_path / 'o'}", *TINY]
    assert expected in cli_error(capsys, *argv)


def test_no_traceback_from_subprocess(tmp_path):
    result = run_cli("sample", tmp_path / "missing")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
