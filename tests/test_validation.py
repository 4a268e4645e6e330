"""Every file nanoKimi reads, edited by hand or damaged, and every impossible size: one line naming the file and the
field (or the setting), exit code 2, no traceback, and nothing allocated or written first. Run as a user types it."""

import json
import shutil

import pytest
import safetensors.torch
import torch

from tests.conftest import cli_error, train_args


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


RUN_EDITS = {  # checkpoint file -> (edit, the command that reads it, words the error must hold)
    "trainer_step_string": ("trainer.json", lambda t: t | {"step": "3"}, "resume", "\"step\" is '3'"),
    "trainer_step_float": ("trainer.json", lambda t: t | {"step": 2.5}, "resume", '"step" is 2.5'),
    "trainer_step_missing": (
        "trainer.json",
        lambda t: {k: v for k, v in t.items() if k != "step"},
        "resume",
        'no "step" field',
    ),
    "trainer_a_list": ("trainer.json", lambda t: [t], "resume", "trainer.json holds a list"),
    "optimizer_a_list": ("optimizer.json", lambda o: [o], "resume", "optimizer.json holds a list"),
    "optimizer_a_string": ("optimizer.json", lambda o: "x", "resume", "optimizer.json holds a string"),
    "config_train_a_list": ("config.json", lambda c: c | {"train": [1]}, "sample", '"train" is [1]'),
    "meta_a_list": ("meta.json", lambda m: [m], "sample", "meta.json holds a list"),
    "meta_fewer_chars": ("meta.json", lambda m: m | {"chars": m["chars"][:-5]}, "sample", '"chars" holds'),
    "meta_fewer_chars_and_vocab": (
        "meta.json",
        lambda m: m | {"chars": m["chars"][:-5], "vocab_size": m["vocab_size"] - 5},
        "sample",
        "its tokenizer has",
    ),
    "config_model_int_as_float": (
        "config.json",
        lambda c: c | {"model": c["model"] | {"num_hidden_layers": 2.0}},
        "sample",
        "num_hidden_layers must be a positive integer, got 2.0",
    ),
    "config_train_int_as_float": (
        "config.json",
        lambda c: c | {"train": c["train"] | {"batch_size": 4.0}},
        "resume",
        '"train": batch_size expects a int, got 4.0',
    ),
    "config_huge_hidden_size": (
        "config.json",
        lambda c: c | {"model": c["model"] | {"hidden_size": 10**9}},
        "sample",
        "needs about",
    ),
    "config_huge_context": (
        "config.json",
        lambda c: c | {"model": c["model"] | {"max_position_embeddings": 10**11}},
        "sample",
        "needs about",
    ),
}


@pytest.mark.parametrize("case", sorted(RUN_EDITS))
def test_an_edited_checkpoint_file_is_named(case, made, char_data, tmp_path, capsys):
    name, change, command, expected = RUN_EDITS[case]
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    edit_json(run / "checkpoint" / name, change)
    argv = (
        [*train_args(char_data, run), "--max_iters=4", "--resume"]
        if command == "resume"
        else ["sample", run, "--max_new_tokens=3"]
    )
    err = cli_error(capsys, *argv)
    assert expected in err and (name in err or "needs about" in err), err


def test_an_optimizer_tensor_of_another_shape_is_refused(made, char_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    path = run / "checkpoint" / "optimizer.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k, v in tensors.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    tensors[key] = tensors[key].t().contiguous()  # the same numbers, swapped shape
    safetensors.torch.save_file(tensors, path)
    err = cli_error(
        capsys,
        *train_args(char_data, run),
        "--max_iters=4",
        "--resume",
    )
    assert "optimizer state" in err and "has shape" in err


def test_weights_whose_header_says_int_are_refused(made, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    path = run / "checkpoint" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"].view(torch.int32)  # same bytes, I32 header
    safetensors.torch.save_file(tensors, path)
    assert "wrong shape or type ['embed_tokens.weight']" in cli_error(capsys, "sample", run, "--max_new_tokens=3")


DATA_EDITS = {
    "no_dtype": (lambda m: {k: v for k, v in m.items() if k != "dtype"}, '"dtype" is None'),
    "dtype_foo": (lambda m: m | {"dtype": "foo"}, "\"dtype\" is 'foo'"),
    "dtype_object": (lambda m: m | {"dtype": "object"}, "\"dtype\" is 'object'"),
    "dtype_float64": (lambda m: m | {"dtype": "float64"}, "\"dtype\" is 'float64'"),
    "a_string": (lambda m: "data", "meta.json holds a string"),
    "fewer_chars": (lambda m: m | {"chars": m["chars"][:-3]}, '"chars" holds'),
}


@pytest.mark.parametrize("case", sorted(DATA_EDITS))
def test_an_edited_dataset_meta_is_named(case, char_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    change, expected = DATA_EDITS[case]
    edit_json(data / "meta.json", change)
    err = cli_error(capsys, *train_args(data, tmp_path / "o"))
    assert expected in err and "meta.json" in err, err
    assert not (tmp_path / "o" / "checkpoint").exists()


def rename_tensor(folder, old, new, change=lambda t: t):
    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors[new] = change(tensors.pop(old))
    safetensors.torch.save_file(tensors, path)


HF_EDITS = {  # an export edited -> the words `nanokimi import` must answer with
    "no_heads": (
        lambda f: edit_json(f / "config.json", lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"}),
        'no "num_attention_heads" field',
    ),
    "rope_scaling_string": (
        lambda f: edit_json(f / "config.json", lambda c: c | {"rope_scaling": "yarn"}),
        "\"rope_scaling\" is 'yarn'",
    ),
    "rope_scaling_list": (
        lambda f: edit_json(f / "config.json", lambda c: c | {"rope_scaling": [1]}),
        '"rope_scaling" is [1]',
    ),
    "config_a_list": (lambda f: edit_json(f / "config.json", lambda c: [c]), "not a Hugging Face model folder"),
    "name_x": (lambda f: rename_tensor(f, "model.norm.weight", "model.layers.x.foo"), "not a DeepseekV3 weight name"),
    "name_layers": (lambda f: rename_tensor(f, "model.norm.weight", "model.layers"), "not a DeepseekV3 weight name"),
    "name_expert": (
        lambda f: rename_tensor(f, "model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.experts.0"),
        "not a DeepseekV3 weight name",
    ),
    "expert_shape": (
        lambda f: rename_tensor(
            f,
            "model.layers.1.mlp.experts.1.up_proj.weight",
            "model.layers.1.mlp.experts.1.up_proj.weight",
            lambda t: t[:-1],
        ),
        "come in shapes",
    ),
    "tied_without_embedding": (
        lambda f: (
            edit_json(f / "config.json", lambda c: c | {"tie_word_embeddings": True}),
            rename_tensor(f, "model.embed_tokens.weight", "lm_head.weight"),
        ),
        "holds no model.embed_tokens.weight",
    ),
    "nan_weights": (
        lambda f: rename_tensor(f, "model.norm.weight", "model.norm.weight", lambda t: t.fill_(float("nan"))),
        "are not finite (e.g. norm.weight)",
    ),
    "huge_hidden_size": (lambda f: edit_json(f / "config.json", lambda c: c | {"hidden_size": 10**9}), "needs about"),
    "huge_context": (
        lambda f: edit_json(f / "config.json", lambda c: c | {"max_position_embeddings": 10**11}),
        "needs about",
    ),
}


@pytest.mark.parametrize("case", sorted(HF_EDITS))
def test_an_edited_hf_folder_is_named_on_import(case, made, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    edit, expected = HF_EDITS[case]
    edit(hf)
    assert expected in cli_error(capsys, "import", hf, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def test_a_corrupt_hf_tokenizer_is_named(made, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    (hf / "meta.json").unlink()  # so that import reads tokenizer.json
    (hf / "tokenizer.json").write_text("{not json")
    assert "cannot read" in cli_error(capsys, "import", hf, tmp_path / "imported")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sample", "RUN", "--seed=99999999999999999999999"], "--seed must be in [0, 2**63)"),
        (["torchrun", "--nproc_per_node=abc", "train", "shakespeare-char-cpu"], "--nproc_per_node=abc"),
        (["bench", "inference", "--contexts", "-5"], "not a positive integer"),
        (["bench", "inference", "--preset=nosuch"], "invalid choice: 'nosuch'"),
        (["bench", "optim", "--data=/nonexist"], "data folder /nonexist not found"),
        (["train", "shakespeare-char-cpu", "--data=DATA", "--batch_size=100000"], "needs about"),
        (["train", "kimi-k2", "--data=DATA", "--block_size=64"], "needs about"),
    ],
)
def test_impossible_arguments_are_one_line(argv, expected, made, char_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(made / "run") if a == "RUN" else a.replace("DATA", str(char_data)) for a in argv]
    assert expected in cli_error(capsys, *argv)
    assert list(tmp_path.iterdir()) == []  # nothing written first (bench used to create out/)


def test_bpe_vocab_beyond_the_text_is_refused(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a small text " * 10)
    err = cli_error(
        capsys,
        "prepare",
        "text",
        f"--input={tmp_path / 't.txt'}",
        "--tokenizer=bpe",
        "--vocab_size=5000000000",
        f"--out={tmp_path / 'd'}",
    )
    assert "exceeds what" in err and not (tmp_path / "d" / "train.bin").exists()
