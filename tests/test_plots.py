"""A run's pictures (loss, expert load, max logit) and the dead-expert warning."""

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from nanokimi import model as model_module
from nanokimi.cli import main
from nanokimi.train import ExpertWatch
from tests.conftest import metrics, train


def expert_pixels(png):
    """The picture as an [H, W, 3] array."""
    return imread(png)[..., :3]


def test_run_writes_its_pictures_and_plot_redraws_them(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(char_data, out, "--max_iters=6", "--eval_interval=3")
    records = metrics(out)
    logged = [r for r in records if "expert_share" in r]
    assert len(logged) == 6 and logged[0]["moe_layers"] == [1]  # the tiny model: layer 0 dense, layer 1 MoE
    assert all(len(r["expert_share"]) == 1 and sum(r["expert_share"][0]) == pytest.approx(1, abs=1e-3)
               for r in logged)
    for name in ("loss.png", "experts.png", "max_logit.png"):
        (out / name).unlink()
    capsys.readouterr()
    main(["plot", str(out)])
    printed = capsys.readouterr().out
    for name in ("loss.png", "experts.png", "max_logit.png"):
        assert (out / name).stat().st_size > 5000 and name in printed


def test_expert_picture_shows_a_dead_expert(tmp_path):
    """From a run's metrics with expert 2 of layer 3 dead: its row is the colour of 0, the others near 1."""
    records = [{"step": s, "loss": 3.0, "max_logit": 10.0 + s, "moe_layers": [1, 3],
                "expert_share": [[0.25] * 4, [0.4, 0.3, 0.0, 0.3]]} for s in range(10, 110, 10)]
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
