"""A run's pictures (loss, expert load, max logit) and the dead-expert warning."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from nanokimi import model as model_module
from nanokimi.cli import main
from nanokimi.train import ExpertWatch
from tests.conftest import NANOKIMI, metrics, train, train_args, wait_for_steps


def expert_pixels(png):
    """The picture as an [H, W, 3] array."""
    return imread(png)[..., :3]


def test_run_writes_its_pictures_and_plot_redraws_them(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=6", "--eval_interval=3")
    records = metrics(out)
    logged = [r for r in records if "expert_share" in r]
    assert len(logged) == 6 and logged[0]["moe_layers"] == [1]  # the tiny model: layer 0 dense, layer 1 MoE
    assert all(len(r["expert_share"]) == 1 and sum(r["expert_share"][0]) == pytest.approx(1, abs=1e-3) for r in logged)
    for name in ("loss.png", "experts.png", "max_logit.png"):
        (out / name).unlink()
    capsys.readouterr()
    main(["plot", str(out)])
    printed = capsys.readouterr().out
    for name in ("loss.png", "experts.png", "max_logit.png"):
        assert (out / name).stat().st_size > 5000 and name in printed


def test_expert_picture_shows_a_dead_expert(tmp_path):
    """From a run's metrics with expert 2 of layer 3 dead: its row is the colour of 0, the others near 1."""
    records = [
        {
            "step": s,
            "loss": 3.0,
            "max_logit": 10.0 + s,
            "moe_layers": [1, 3],
            "expert_share": [[0.25] * 4, [0.4, 0.3, 0.0, 0.3]],
        }
        for s in range(10, 110, 10)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["plot", str(tmp_path)])
    pixels = expert_pixels(tmp_path / "experts.png")
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.45)  # coolwarm's low end: a share of ~0
    assert blue.sum() > 500  # the dead expert's row
    assert (tmp_path / "max_logit.png").stat().st_size > 5000


def test_dead_expert_warning_once_after_three_starved_evals():
    watch = ExpertWatch([1, 2])
    healthy = [{"tokens": torch.tensor([10, 10, 10, 10])}, {"tokens": torch.tensor([10, 10, 10, 10])}]
    starved = [{"tokens": torch.tensor([10, 10, 10, 10])}, {"tokens": torch.tensor([20, 1, 20, 20])}]  # 1/61 < 0.1/4
    warnings = []
    for loads in [healthy, starved, starved, healthy, starved, starved, starved, starved, starved, starved]:
        watch.add(loads)
        warnings.append(watch.check_at_eval())
    assert warnings[:7] == [None] * 6 + [warnings[6]]  # a streak broken by a healthy eval starts again
    assert "layer 2 expert 1" in warnings[6] and "layer 1" not in warnings[6]
    assert warnings[7:] == [None] * 3  # once per run


def test_trainer_warns_of_a_dead_expert(char_data, tmp_path, capsys, monkeypatch):
    """An expert the router never picks (forced here) is named once in the log and in metrics.jsonl."""
    original = model_module.Gate.forward

    def never_expert_0(self, x):
        self.e_score_correction_bias[0] = -1e4  # no score + bias of expert 0 reaches the top-k
        return original(self, x)

    monkeypatch.setattr(model_module.Gate, "forward", never_expert_0)
    monkeypatch.setattr(ExpertWatch, "DEAD_EVALS", 2)
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=8", "--eval_interval=2")
    warnings = [r["warning"] for r in metrics(out) if "warning" in r]
    assert len(warnings) == 1 and "layer 1 expert 0" in warnings[0]
    assert capsys.readouterr().out.count("warning: dead experts") == 1
    shares = np.array([r["expert_share"] for r in metrics(out) if "expert_share" in r])
    assert (shares[:, 0, 0] == 0).all() and (out / "experts.png").is_file()


def test_a_picture_is_replaced_whole_or_not_at_all(char_data, tmp_path, monkeypatch):
    """A kill while a picture is written leaves the previous picture as it was (written beside it, then renamed)."""
    from matplotlib.figure import Figure

    out = tmp_path / "run"
    train(char_data, out, "--max_iters=3", "--eval_interval=3")
    before = (out / "loss.png").read_bytes()

    def killed_mid_write(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half a picture")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_mid_write)
    with pytest.raises(SystemExit) as exit_info:  # the CLI's Ctrl-C exit
        main(["plot", str(out)])
    assert exit_info.value.code == 130 and (out / "loss.png").read_bytes() == before


def test_plot_while_the_run_trains(char_data, tmp_path, capsys):
    """docs/training.md: `nanokimi plot` redraws a run's pictures while it trains (metrics.jsonl is appended to as
    plot reads it), and the run goes on to its end."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *NANOKIMI,
            *train_args(char_data, out),
            "--max_iters=60",
            "--eval_interval=20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    drawn = []
    try:
        wait_for_steps(proc, out, 3)
        while proc.poll() is None:
            main(["plot", str(out)])
            drawn.append(proc.poll() is None)  # drawn while the run was still training
    finally:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert drawn.count(True) >= 2 and "loss.png" in capsys.readouterr().out
    assert expert_pixels(out / "experts.png").shape[0] > 100
