"""A run's pictures, drawn from its metrics.jsonl (by the trainer at the end of a run, or `nanokimi plot RUN`):
loss.png (train and val loss), experts.png (each MoE layer's share of routed tokens per expert over the steps: a dead
or hogging expert shows as a dark row) and max_logit.png (the largest attention logit per step against QK-Clip's tau)."""

import json
from pathlib import Path

from .errors import UserError


def read_records(metrics_path):
    """The records of a metrics.jsonl; a line cut short by a crash mid-write is skipped."""
    records = []
    for line in Path(metrics_path).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if isinstance(r, dict)]


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(out_dir, qk_clip_tau=None):
    """Draw the pictures of the run in out_dir that its records support; returns the paths written."""
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{out_dir} has no metrics.jsonl: pass a run's --out_dir")
    records = read_records(metrics)
    written = [plot_losses(records, out_dir / "loss.png", out_dir.name)]
    if any("expert_share" in r for r in records):
        written.append(plot_expert_load(records, out_dir / "experts.png", out_dir.name))
    if any("max_logit" in r for r in records):
        written.append(plot_max_logit(records, out_dir / "max_logit.png", out_dir.name, qk_clip_tau))
    return written


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def plot_losses(records, path, title):
    """Training loss (per log record) and train/val eval loss against steps."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), alpha=0.5, label="train (batch)")
    if evals:
        steps, tr, va = zip(*evals)
        ax.plot(steps, tr, "o-", label="train (eval)")
        ax.plot(steps, va, "o-", label="val")
    ax.set(xlabel="step", ylabel="loss", title=title)
    if train or evals:  # a run stopped before its first log record has nothing to label
        ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_expert_load(records, path, title):
    """One panel per MoE layer: experts x steps, coloured by the expert's share of the layer's routed tokens over
    each log interval, relative to a fair share (1 = balanced, 0 = the expert got no token)."""
    import numpy as np
    logged = [r for r in records if "expert_share" in r]
    steps = [r["step"] for r in logged]
    shares = np.array([r["expert_share"] for r in logged], dtype=float)  # [records, moe layers, experts]
    layers, experts = shares.shape[1], shares.shape[2]
    layer_ids = logged[-1].get("moe_layers", list(range(layers)))
    fig, axes = pyplot().subplots(layers, 1, figsize=(8, 1.2 + 1.6 * layers), squeeze=False, sharex=True)
    start = 2 * steps[0] - steps[1] if len(steps) > 1 else steps[0] - 1  # each column: the steps since the last
    for ax, layer, share in zip(axes[:, 0], layer_ids, shares.transpose(1, 2, 0)):
        image = ax.imshow(share * experts, aspect="auto", origin="lower", cmap="coolwarm", vmin=0, vmax=2,
                          interpolation="nearest", extent=(start, steps[-1], -0.5, experts - 0.5))
        ax.set(ylabel=f"layer {layer}\nexpert")
    axes[-1, 0].set(xlabel="step")
    axes[0, 0].set_title(f"{title}: share of routed tokens per expert (1 = fair share)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share / fair share", shrink=0.8)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def plot_max_logit(records, path, title, tau=None):
    """The largest attention logit of each logged step (over layers and heads), and QK-Clip's threshold."""
    points = [(r["step"], r["max_logit"]) for r in records if "max_logit" in r]
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    ax.plot(*zip(*points), label="max attention logit")
    if tau is not None:
        ax.axhline(tau, color="k", ls="--", lw=1, label=f"QK-Clip tau = {tau:g}")
    ax.set(xlabel="step", ylabel="max logit", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)
