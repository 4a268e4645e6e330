"""Nothing lost: each command writes only into a folder it owns or that is new or empty, and never deletes what it
did not write. Each case as a user types it; what was there is checked by listing the folders before and after."""

import json
import os
import shutil

import pytest
import torch

from nanokimi import checkpoint
from tests.conftest import cli_error, run_cli, train


def listing(folder):
    """{relative path: bytes} of every file under folder (links not followed), and the links with their targets."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = (
                os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
            )
    return found


@pytest.mark.parametrize(
    "case", ["user_folder", "current_folder", "run", "run_checkpoint", "its_source", "inside_its_source", "a_file"]
)
def test_import_never_writes_over_what_it_did_not_write(case, made, tmp_path, capsys, monkeypatch):
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    monkeypatch.chdir(user if case == "current_folder" else tmp_path)
    shutil.copytree(made / "run", tmp_path / "myrun")  # a run of one's own
    destination, expected = {
        "user_folder": (user, "did not write (notes.txt, sub)"),
        "current_folder": (".", "holds the current folder"),
        "run": (tmp_path / "myrun", "holds a training run"),
        "run_checkpoint": (tmp_path / "myrun" / "checkpoint", "holds a training run's checkpoint"),
        "its_source": (made / "hf", "apart from its source"),
        "inside_its_source": (made / "hf" / "ckpt", "apart from its source"),
        "a_file": (tmp_path / "file.txt", "is a file"),
    }[case]
    before = {f: listing(f) for f in (tmp_path, made)}
    assert expected in cli_error(capsys, "import", made / "hf", destination)
    assert {f: listing(f) for f in (tmp_path, made)} == before


def test_import_into_a_new_folder_and_again_over_its_own(made, tmp_path):
    for _ in range(2):  # the second import replaces the first one's checkpoint: its own
        result = run_cli("import", made / "hf", tmp_path / "imported")
        assert result.returncode == 0, result.stderr
    assert run_cli("sample", tmp_path / "imported", "--max_new_tokens=3", "--prompt=A").returncode == 0
    assert_same_logits(tmp_path / "imported", made / "hf")


@pytest.mark.parametrize("target", ["run_checkpoint", "hf", "run"])
def test_prepare_refuses_another_commands_folder(target, made, tmp_path, capsys):
    out = {"run_checkpoint": made / "run" / "checkpoint", "hf": made / "hf", "run": made / "run"}[target]
    (tmp_path / "t.txt").write_text("some text to prepare " * 50)
    before = listing(made)
    err = cli_error(capsys, "prepare", "text", f"--input={tmp_path / 't.txt'}", f"--out={out}")
    assert "does not write into it" in err
    assert listing(made) == before


def test_export_refuses_a_dataset_and_the_users_own_files(made, char_data, tmp_path, capsys):
    before = listing(char_data)
    assert "holds a prepared dataset" in cli_error(capsys, "export", made / "run", char_data)
    assert listing(char_data) == before
    own = tmp_path / "mine"
    own.mkdir()
    (own / "config.json").write_text('{"my": "settings"}')
    assert "did not write (config.json)" in cli_error(capsys, "export", made / "run", own)
    assert (own / "config.json").read_text() == '{"my": "settings"}'
    for _ in range(2):  # an earlier export is its own
        assert run_cli("export", made / "run", tmp_path / "hf").returncode == 0
    assert_same_logits(tmp_path / "hf", made / "run")


def test_train_refuses_a_dataset_or_export_as_out_dir(made, char_data, tmp_path, capsys):
    for folder, kind in ((char_data, "a prepared dataset"), (made / "hf", "a Hugging Face model folder")):
        before = listing(folder)
        assert kind in cli_error(capsys, "train", "shakespeare-char-cpu", f"--data={char_data}", f"--out_dir={folder}")
        assert listing(folder) == before


def test_a_symlinked_checkpoint_is_followed_not_replaced(char_data, tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "disk2"
    train(char_data, out, "--max_iters=2", "--eval_interval=2")
    elsewhere.mkdir()
    (out / "checkpoint").rename(elsewhere / "ckpt")
    (out / "checkpoint").symlink_to(elsewhere / "ckpt")
    for steps in (4, 6):  # two saves through the link
        train(char_data, out, f"--max_iters={steps}", "--eval_interval=2", "--resume")
        assert (out / "checkpoint").is_symlink()
        assert checkpoint.Checkpoint(elsewhere / "ckpt").trainer_state()["step"] == steps
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "checkpoint", "experts.png", "loss.png", "max_logit.png", "metrics.jsonl"]
    )
    assert sorted(p.name for p in elsewhere.iterdir()) == ["ckpt"]


def assert_same_logits(folder, reference):
    """The model in `folder` (checkpoint, run or HF folder) computes what `reference`'s does: equal logits."""
    from nanokimi.hf import from_pretrained

    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            from_pretrained(folder)(idx)[0], from_pretrained(reference)(idx)[0], atol=1e-5, rtol=0
        )


def test_a_char_model_exported_and_imported_evaluates_on_its_own_dataset(made, char_data, tmp_path):
    """export writes a tokenizer.json for transformers beside a char vocabulary's meta.json: a copy, not part of the
    tokenizer, so the imported checkpoint still matches the dataset it was trained on."""
    assert run_cli("export", made / "run", tmp_path / "hf").returncode == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert run_cli("import", tmp_path / "hf", tmp_path / "ckpt").returncode == 0
    result = run_cli("eval", tmp_path / "ckpt", f"--data={char_data}", "--batches=2", "--block_size=32")
    assert result.returncode == 0, result.stderr
    reference = run_cli("eval", made / "run", f"--data={char_data}", "--batches=2", "--block_size=32")
    assert json.loads(result.stdout)["loss"] == pytest.approx(json.loads(reference.stdout)["loss"], rel=1e-5)


def test_exporting_a_checkpoint_without_tokenizer_over_an_export_leaves_no_old_tokenizer(made, tmp_path):
    assert run_cli("export", made / "run", tmp_path / "hf").returncode == 0
    bare = tmp_path / "bare-hf"
    shutil.copytree(made / "hf", bare, ignore=shutil.ignore_patterns("tokenizer*", "meta.json"))
    assert run_cli("import", bare, tmp_path / "no-tokenizer").returncode == 0
    assert not (tmp_path / "no-tokenizer" / "meta.json").exists()
    assert run_cli("export", tmp_path / "no-tokenizer", tmp_path / "hf").returncode == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
