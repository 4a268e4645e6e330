"""redraw a run's pictures from its metrics.jsonl

Redraw RUN/loss.png, RUN/experts.png (each MoE layer's share of routed tokens per expert over the steps) and
RUN/max_logit.png (the largest attention logit against QK-Clip's tau) from RUN/metrics.jsonl, e.g. while the run
trains."""

NAME = "plot"


def add_arguments(p):
    p.add_argument("run", help="a training run's --out_dir")


def run(args):
    from ..checkpoint import Checkpoint, find
    from ..plots import plot_run

    settings = (Checkpoint(args.run).train_config or {}) if find(args.run) is not None else {}
    tau = settings.get("qk_clip_tau") if settings.get("optimizer") == "muonclip" else None
    for path in plot_run(args.run, tau):
        print(f"wrote {path}")
