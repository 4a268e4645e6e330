"""A run's pictures, drawn from its metrics.jsonl (by the trainer at the end of a run, or `nanokimi plot RUN`):
loss.png (train and val loss), experts.png (each MoE layer's share of routed tokens per expert over the steps: a dead
or hogging expert shows as a dark row) and max_logit.png (the largest attention logit per step against QK-Clip's
tau)."""

import json
import os
from pathlib import Path

from .errors import UserError, write_failure


NUMBER = (int, float)
FIELDS = {
    "step": int,
    "loss": NUMBER,
    "train_loss": NUMBER,
    "val_loss": NUMBER,
    "lr": NUMBER,
    "grad_norm": NUMBER,
    "tokens": int,
    "time": NUMBER,
    "tok_per_s": NUMBER,
    "max_logit": NUMBER,
    "expert_share": list,
    "moe_layers": list,
    "summary": dict,
}


def read_records(metrics_path):
    """The records of a metrics.jsonl that have the trainer's shape: a line cut short by a crash mid-write, or one
    edited into other types (a step that is not an integer, a loss that is not a number), is skipped."""
    records = []
    for line in Path(metrics_path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if (
            isinstance(record, dict)
            and ("step" in record or "summary" in record)
            and all(
                isinstance(record[k], t) and not isinstance(record[k], bool) for k, t in FIELDS.items() if k in record
            )
        ):
            records.append(record)
    return records


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
    return [path for path in written if path is not None]


def save(fig, path, tight=True):
    """Write the figure to `path` atomically (a kill mid-write leaves the previous picture), then close it."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # a plot beside a training run: its own
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({write_failure(e)}): free some space") from None
    finally:
        pyplot().close(fig)
    return path


def plot_losses(records, path, title):
    """Training loss (per log record) and train/val eval loss against steps."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r and "train_loss" in r]
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

    def share(record):  # [moe layers, experts], or None for a record edited out of that shape
        try:
            value = np.array(record["expert_share"], dtype=float)
        except (ValueError, TypeError):
            return None
        return value if value.ndim == 2 and np.isfinite(value).all() else None

    logged = [(r, m) for r in records if "expert_share" in r and (m := share(r)) is not None]
    logged = [(r, m) for r, m in logged if m.shape == logged[-1][1].shape]  # the last layout (a resumed run's)
    if not logged:
        return None
    steps = [r["step"] for r, _ in logged]
    shares = np.stack([m for _, m in logged])  # [records, moe layers, experts]
    layers, experts = shares.shape[1], shares.shape[2]
    layer_ids = logged[-1][0].get("moe_layers", list(range(layers)))
    fig, axes = pyplot().subplots(layers, 1, figsize=(8, 1.2 + 1.6 * layers), squeeze=False, sharex=True)
    start = 2 * steps[0] - steps[1] if len(steps) > 1 else steps[0] - 1  # each column: the steps since the last
    for ax, layer, share in zip(axes[:, 0], layer_ids, shares.transpose(1, 2, 0)):
        image = ax.imshow(
            share * experts,
            aspect="auto",
            origin="lower",
            cmap="coolwarm",
            vmin=0,
            vmax=2,
            interpolation="nearest",
            extent=(start, steps[-1], -0.5, experts - 0.5),
        )
        ax.set(ylabel=f"layer {layer}\nexpert")
    axes[-1, 0].set(xlabel="step")
    axes[0, 0].set_title(f"{title}: share of routed tokens per expert (1 = fair share)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share / fair share", shrink=0.8)
    return save(fig, path, tight=False)  # the colorbar spans the panels: no tight layout


def plot_max_logit(records, path, title, tau=None):
    """The largest attention logit of each logged step (over layers and heads), and QK-Clip's threshold."""
    points = [(r["step"], r["max_logit"]) for r in records if "max_logit" in r and "step" in r]
    if not points:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    ax.plot(*zip(*points), label="max attention logit")
    if tau is not None:
        ax.axhline(tau, color="k", ls="--", lw=1, label=f"QK-Clip tau = {tau:g}")
    ax.set(xlabel="step", ylabel="max logit", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)
