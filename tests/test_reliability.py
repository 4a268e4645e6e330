"""Round 3 of "nothing wrong in silence": each case run the way a user types it gives one line and a non-zero exit,
or works as a user expects; nothing written is lost or silently wrong."""

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch

from nanokimi.bench.report import write_section
from nanokimi.cli import main
from nanokimi.errors import UserError
from nanokimi.hf import from_pretrained
from tests.conftest import ROOT, TINY_MODEL, cli_error, metrics, train, train_args


# ---- sharded Hugging Face folders: read through their index -------------------------------------------------------


def shard(hf, stale):
    """Split hf/model.safetensors into two shards + index; with `stale`, leave a full file of other weights beside."""
    tensors = safetensors.torch.load_file(hf / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        safetensors.torch.save_file({n: tensors[n] for n in part}, hf / file, metadata={"format": "pt"})
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}})
    )
    if stale:
        safetensors.torch.save_file(
            {n: torch.randn_like(t) for n, t in tensors.items()}, hf / "model.safetensors", metadata={"format": "pt"}
        )
    else:
        (hf / "model.safetensors").unlink()
    return tensors


@pytest.mark.parametrize("stale", [False, True], ids=["shards", "shards_beside_a_stale_full_file"])
def test_a_sharded_folder_is_read_through_its_index(stale, made, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    shard(hf, stale)
    with pytest.warns(UserWarning, match="ignored model.safetensors") if stale else _no_warning():
        model = from_pretrained(hf)
    reference = from_pretrained(made / "hf")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name  # the shards' weights, not the stale file's


@contextlib.contextmanager
def _no_warning():
    """A clean folder loads silently: any warning inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_missing_shard_is_named(made, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    shard(hf, stale=False)
    (hf / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in cli_error(capsys, "import", hf, tmp_path / "imported")


def test_two_files_holding_one_tensor_are_refused_without_an_index(made, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    shutil.copy(hf / "model.safetensors", hf / "model-old.safetensors")
    assert "both hold" in cli_error(capsys, "import", hf, tmp_path / "imported")


def test_rotary_inv_freq_buffers_are_ignored(made, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    tensors = safetensors.torch.load_file(hf / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older transformers saved it
    safetensors.torch.save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    model, reference = from_pretrained(hf), from_pretrained(made / "hf")
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_weights_are_written_with_the_json_files_mode(made):
    for folder in (made / "run" / "checkpoint", made / "hf"):
        modes = {
            p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.suffix in (".json", ".safetensors")
        }
        assert len(set(modes.values())) == 1, modes


# ---- report files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<!-- /bench:x -->\nmine\n<!-- bench:x -->\n",
        "<!-- bench:x -->\na\n<!-- /bench:x -->\n<!-- bench:x -->\n",
        "<!-- bench:x -->\nno end\n",
    ],
    ids=["reversed", "two_starts", "no_end"],
)
def test_unbalanced_report_markers_are_refused_and_the_file_kept(text, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(text)
    with pytest.raises(UserError, match="marker"):
        write_section(report, "x", "new", "cmd")
    assert report.read_text() == text and list(tmp_path.iterdir()) == [report]


def test_a_report_section_is_replaced_in_place(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("mine before\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nmine after\n")
    write_section(report, "x", "new body", "cmd")
    text = report.read_text()
    assert text.startswith("mine before\n<!-- bench:x -->") and text.endswith("<!-- /bench:x -->\nmine after\n")
    assert "new body" in text and "old" not in text and list(tmp_path.iterdir()) == [report]


# ---- settings: finite and in range, up front ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    [
        "--qk_clip_tau=NaN",
        "--min_lr=NaN",
        "--grad_clip=NaN",
        "--weight_decay=nan",
        "--bias_update_gamma=NaN",
        "--lr=Infinity",
        "--lr=NaN",
        "--max_time_s=NaN",
        "--max_time_s=Infinity",
        "--lr=-Infinity",
        "--routed_scaling_factor=NaN",
    ],
)
def test_non_finite_settings_are_refused_before_anything_is_written(flag, char_data, tmp_path, capsys):
    err = cli_error(capsys, *train_args(char_data, tmp_path / "o"), flag)
    assert "finite" in err and not (tmp_path / "o").exists()


def test_non_finite_toml_values_and_a_model_that_is_not_a_table(char_data, tmp_path, capsys):
    for body, words in (
        ("lr = nan\n", "finite"),
        ("max_time_s = inf\n", "finite"),
        ("model = 5\n", "[model] table"),
        ("[model]\nrms_norm_eps = nan\n", "finite"),
    ):
        (tmp_path / "run.toml").write_text(f'data = "{char_data}"\nout_dir = "{tmp_path / "o"}"\n' + body)
        assert words in cli_error(capsys, "train", tmp_path / "run.toml")
        assert not (tmp_path / "o").exists()


def test_a_seed_out_of_range_is_refused(char_data, tmp_path, capsys):
    err = cli_error(
        capsys,
        "train",
        "shakespeare-char-cpu",
        f"--data={char_data}",
        f"--out_dir={tmp_path / 'o'}",
        "--seed=99999999999999999999999",
    )
    assert "seed must be in [0, 2**63)" in err and not (tmp_path / "o").exists()


def test_init_from_a_model_of_another_kind_is_refused(char_data, tmp_path, capsys):
    main(
        [
            "train",
            "gpt-shakespeare-char-cpu",
            f"--data={char_data}",
            f"--out_dir={tmp_path / 'gpt'}",
            "--max_iters=1",
            "--batch_size=2",
            "--block_size=16",
            "--eval_iters=1",
            "--progress=false",
        ]
    )
    err = cli_error(
        capsys,
        "train",
        "shakespeare-char-cpu",
        f"--data={char_data}",
        f"--init_from={tmp_path / 'gpt'}",
        f"--out_dir={tmp_path / 'ft'}",
    )
    assert "nanoGPT baseline checkpoint" in err and "gpt-shakespeare-char-cpu" in err


def test_a_user_toml_edited_before_resume_is_applied_or_refused(char_data, tmp_path, capsys):
    out = tmp_path / "o"
    model = "\n".join(f"{k} = {v}" for k, v in TINY_MODEL.items())  # the tests' tiny model, as TOML
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'data = "{char_data}"\nout_dir = "{out}"\nmax_iters = 2\neval_interval = 2\nbatch_size = 4\n'
        f"block_size = 32\neval_iters = 1\nprogress = false\n[model]\n{model}\n"
    )
    main(["train", str(toml)])
    toml.write_text(toml.read_text().replace("max_iters = 2", "max_iters = 4"))
    main(["train", str(toml), "--resume"])  # the file's new max_iters is applied, as --max_iters=4 would be
    assert metrics(out)[-1]["summary"]["step"] == 4
    toml.write_text(toml.read_text().replace("num_hidden_layers = 2", "num_hidden_layers = 3"))
    assert "cannot change" in cli_error(capsys, "train", toml, "--resume")  # as --num_hidden_layers=3 is


# ---- damaged token and metrics files ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["one_byte_short", "garbage_ids_train", "garbage_ids_val"])
def test_damaged_token_files_are_one_line(damage, char_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    if damage == "one_byte_short":
        with open(data / "train.bin", "r+b") as f:
            f.truncate((data / "train.bin").stat().st_size - 1)
        words = "damaged or truncated"
    else:
        split = damage.rsplit("_", 1)[1]
        ids = np.fromfile(data / f"{split}.bin", dtype=np.uint16)
        ids[::7] = 60_000
        ids.tofile(data / f"{split}.bin")
        words = "token id 60000, outside"
    err = cli_error(capsys, *train_args(data, tmp_path / "o"), "--max_iters=2")
    assert words in err


def test_eval_of_garbage_ids_is_one_line(made, char_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    ids = np.fromfile(data / "val.bin", dtype=np.uint16)
    ids[::5] = 65_000
    ids.tofile(data / "val.bin")
    assert "token id 65000, outside" in cli_error(capsys, "eval", made / "run", f"--data={data}", "--batches=2")


def test_metrics_lines_of_the_wrong_shape_are_skipped(made, char_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(
            '{"step": "x", "loss": "abc"}\n{"step": 1, "val_loss": 2.0}\n{"step": 2, "expert_share": "no"}\n'
            '{"step": 3, "expert_share": [[1, "a"]]}\n[1, 2]\n' + "[" * 100_000 + "\n"
        )
    main(["plot", str(run)])
    assert {"loss.png", "experts.png"} <= {p.name for p in run.iterdir()}
    train(char_data, run, "--max_iters=4", "--resume")  # the run goes on past such lines
    assert metrics(run)[-1]["summary"]["step"] == 4


def test_deeply_nested_json_is_one_line(made, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    (hf / "config.json").write_text(deep)
    cli_error(capsys, "import", hf, tmp_path / "imported")
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    (run / "checkpoint" / "config.json").write_text(deep)
    assert "nested too deeply" in cli_error(capsys, "sample", run)


def test_a_closed_stdout_ends_sample_quietly(made):
    proc = subprocess.run(
        f"{sys.executable} -m nanokimi sample {made / 'run'} --max_new_tokens=100000 | head -c 20",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        executable="/bin/bash",
    )
    assert len(proc.stdout) == 20 and proc.stderr == "", proc.stderr[-500:]
    status = subprocess.run(
        f"set -o pipefail; {sys.executable} -m nanokimi sample {made / 'run'} "
        f"--max_new_tokens=100000 | head -c 5 > /dev/null",
        shell=True,
        timeout=300,
        cwd=ROOT,
        executable="/bin/bash",
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert status.returncode == 0


def test_nan_sampling_settings_are_refused(made, capsys):
    assert "temperature" in cli_error(capsys, "sample", made / "run", "--temperature=nan")
    assert "top_p" in cli_error(capsys, "sample", made / "run", "--top_p=nan")
