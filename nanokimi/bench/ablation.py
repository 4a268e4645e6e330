"""`nanokimi bench ablate`: what each Kimi-K2 idea buys on this machine. nanoKimi's shipped CPU run with one idea
removed at a time (MoE, MLA, Muon, QK-Clip) or Kimi Linear's KDA added, and nanoGPT three ways (its recipe's
settings, AdamW tuned, with Muon), each at its best lr from one shared sweep, over seeds, at equal wall-clock (two
budgets) and at equal tokens, every final checkpoint scored by the one evaluator. `--contenders` picks rows."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models import PRESETS
from .report import hardware_kind, pyplot, save_figure, table, write_section
from .training import EVAL_BATCH_SIZE, RECIPES, nanokimi_settings, newton_schulz_precisions, run_training, score, spread


@dataclass(frozen=True)
class Contender:
    """A model and optimizer trained with the run's settings (--config; by default the shipped CPU run: 16x64, WSD,
    warmup 10, min_lr = lr/10), except what `train` changes; `preset` RUN: the run's own model, with `model`'s
    changes (a function of the run's layer count where they depend on it); `swept`: its lr comes from the sweep
    (else from `train` if it sets one, else it is nanoKimi's best); `key`: its name for --contenders."""

    key: str
    preset: str
    model: dict | Callable = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    swept: bool = True


RECIPE = RECIPES["cpu"]
RUN = "the run"  # the preset of --config's run, with its [model] settings
CHAR_RUN = "shakespeare-char-cpu"  # the run the nanoGPT rows (its char recipe) and the KDA row are set for
CONTENDERS = {
    "nanoGPT, its recipe's settings": Contender(
        "gpt-recipe",
        RECIPE.preset,
        RECIPE.model,
        {
            k: v
            for k, v in RECIPE.train.items()
            if k in ("optimizer", "lr", "min_lr", "lr_schedule", "warmup_iters", "beta2", "batch_size", "block_size")
        },
        swept=False,
    ),
    "nanoGPT, AdamW tuned": Contender("gpt-adamw", RECIPE.preset, RECIPE.model, {"optimizer": "adamw"}),
    "nanoGPT + Muon": Contender("gpt-muon", RECIPE.preset, RECIPE.model, {"optimizer": "muon"}),
    "nanoKimi (MLA + MoE + MuonClip)": Contender("kimi", RUN),
    # every layer dense: SwiGLU of intermediate_size 384 = (2 routed + 1 shared) x 128, the MoE's active width
    "nanoKimi - MoE (dense, equal active params)": Contender(
        "dense", RUN, lambda layers: {"first_k_dense_replace": layers}
    ),
    "nanoKimi - MLA (MHA)": Contender("mha", RUN, {"attention": "mha"}),
    "nanoKimi - Muon (AdamW)": Contender("adamw", RUN, train={"optimizer": "adamw"}),
    # QK-Clip only rescales heads past tau: it does not move the lr optimum, so this keeps nanoKimi's lr
    "nanoKimi - QK-Clip (Muon)": Contender("muon", RUN, train={"optimizer": "muon"}, swept=False),
    # Kimi Linear in the shipped run's 3 layers: KDA in the first two, MLA without rotary position in the last
    "nanoKimi + KDA (Kimi Linear: 2 KDA + 1 MLA)": Contender(
        "kda", RUN, {"layer_types": ["linear_attention", "linear_attention", "full_attention"], "mla_use_nope": True}
    ),
}
FULL, DENSE, GPT_MUON = (
    "nanoKimi (MLA + MoE + MuonClip)",
    "nanoKimi - MoE (dense, equal active params)",
    "nanoGPT + Muon",
)
KDA, MHA = "nanoKimi + KDA (Kimi Linear: 2 KDA + 1 MLA)", "nanoKimi - MLA (MHA)"
LONG_BUDGET_CONTENDERS = (FULL, DENSE, GPT_MUON, KDA)  # the long budget's questions: do the sparse MoE and KDA pay?


def bench_ablate(args):
    plt = pyplot()
    started = time.perf_counter()
    shipped, shipped_model = nanokimi_settings(args.config)
    base = {
        k: shipped[k]
        for k in (
            "batch_size",
            "block_size",
            "lr_schedule",
            "warmup_iters",
            "optimizer",
            "beta1",
            "beta2",
            "weight_decay",
            "grad_clip",
            "qk_clip_tau",
            "muon_dtype",
        )
    }
    base |= dict(data=args.data, eval_iters=1, eval_interval=10**6, max_iters=10**6)
    seeds = range(args.seeds)
    context = shipped["block_size"]
    layers = shipped_model.get("num_hidden_layers", PRESETS[shipped["preset"]].num_hidden_layers)
    keys = set(args.contenders) | {CONTENDERS[FULL].key}  # the run itself: every other row is measured against it
    contenders = {name: c for name, c in CONTENDERS.items() if c.key in keys}
    char_only = sorted(c.key for c in contenders.values() if c.preset != RUN or c.key == "kda")
    if args.config != CHAR_RUN and char_only:
        raise UserError(
            f"--contenders {' '.join(char_only)}: those rows are set for {CHAR_RUN} (nanoGPT's "
            f"char recipe, KDA in its 3 layers); with --config={args.config} pick from kimi dense mha "
            f"adamw muon"
        )
    long_budget = [name for name in LONG_BUDGET_CONTENDERS if name in contenders]
    label = {name: name for name in contenders}  # a row's name as shown: a hybrid base run is no "MLA" run
    if "linear_attention" in (shipped_model.get("layer_types") or []):
        label |= {FULL: "nanoKimi (KDA + MLA + MoE + MuonClip)", MHA: "nanoKimi - MLA (MHA beside the KDA layers)"}

    def settings(name, lr=None):
        c = contenders[name]
        s = base | c.train
        model = (shipped_model if c.preset == RUN else {}) | (c.model(layers) if callable(c.model) else c.model)
        if lr is not None:
            s |= dict(lr=lr, min_lr=lr / 10)
        return dict(s, preset=shipped["preset"] if c.preset == RUN else c.preset), model

    def trained(name, tag, seed, lr=None, **limits):
        s, model = settings(name, lr)
        out = Path(args.out) / f"{tag}-{name.split(' (')[0].replace(' ', '').replace(',', '')}-lr{s['lr']:g}-{seed}"
        records = run_training(out, model, **s | dict(seed=seed) | limits)
        if "diverged" in records[-1]:
            return {"val": float("inf"), "steps": 0, "seconds": 0.0, "lr": s["lr"]}
        summary = records[-1]["summary"]
        finished.append(out)
        return {
            "val": score(out, args.data, context, args.eval_batches),
            "steps": summary["step"],
            "seconds": summary["train_time_s"],
            "lr": s["lr"],
            "params": (summary["params_total"], summary["params_active"]),
        }

    finished = []  # every run that did not diverge: their checkpoints say Newton-Schulz's precision

    # 1. the sweep at the short budget, seed 0: every swept contender tries every lr; its best run is its seed 0
    short = {name: {} for name in contenders}
    sweep_rows = []
    for name, c in contenders.items():
        if not c.swept:
            continue
        tries = {lr: trained(name, "short", seeds[0], lr, max_time_s=args.budget_s) for lr in args.lrs}
        best = min(tries, key=lambda lr: tries[lr]["val"])
        short[name][seeds[0]] = tries[best]
        sweep_rows.append(
            [label[name]] + [f"{tries[lr]['val']:.4f}" + (" (best)" if lr == best else "") for lr in args.lrs]
        )
    lr_of = {name: short[name][seeds[0]]["lr"] for name, c in contenders.items() if c.swept}
    lr_of |= {name: None if "lr" in c.train else lr_of[FULL] for name, c in contenders.items() if not c.swept}
    if all(v["val"] == float("inf") for runs in short.values() for v in runs.values()):
        raise UserError("every run of the sweep diverged: pick smaller --lrs")
    # 2. the other seeds at the short budget; 3. equal tokens; 4. the long budget for the MoE question. Seed by seed,
    # every contender in turn: this shared machine's speed drifts by ~20% over minutes, and a contender run in one
    # stretch would take the drift of that stretch alone
    for seed in seeds:
        for name in contenders:
            if seed not in short[name]:
                short[name][seed] = trained(name, "short", seed, lr_of[name], max_time_s=args.budget_s)
    tokens = {name: {} for name in contenders}
    for seed in seeds:
        for name in contenders:
            s, _ = settings(name, lr_of[name])
            steps = max(1, round(args.tokens / (s["batch_size"] * s["block_size"])))
            tokens[name][seed] = trained(name, "tokens", seed, lr_of[name], max_iters=steps)
    long = {name: {} for name in long_budget}
    for seed in seeds:
        for name in long_budget:
            long[name][seed] = trained(name, "long", seed, lr_of[name], max_time_s=args.long_budget_s)

    def cell(runs):
        vals = [r["val"] for r in runs.values()]
        return "diverged" if any(v == float("inf") for v in vals) else spread(vals)

    rows = []
    for name in contenders:
        first = short[name][seeds[0]]
        per_step = statistics.median(r["seconds"] / r["steps"] for r in tokens[name].values() if r["steps"])
        s, _ = settings(name, lr_of[name])
        rows.append(
            [
                label[name],
                f"{first['params'][0] / 1e6:.2f}M ({first['params'][1] / 1e6:.2f}M)",
                f"{s['lr']:g}",
                f"{s['batch_size']}x{s['block_size']}",
                f"{1e3 * per_step:.0f}",
                spread((r["steps"] for r in short[name].values()), "{:.0f}"),
                cell(short[name]),
                cell(tokens[name]),
                cell(long[name]) if name in long else "-",
            ]
        )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    names = list(contenders)
    for ax, (title, runs) in zip(
        axes, ((f"{args.budget_s:g} s", short), (f"{args.tokens} tokens", tokens), (f"{args.long_budget_s:g} s", long))
    ):
        for i, name in enumerate(names):
            vals = [r["val"] for r in runs.get(name, {}).values() if r["val"] != float("inf")]
            if vals:
                ax.errorbar(
                    [statistics.mean(vals)],
                    [i],
                    xerr=[[statistics.mean(vals) - min(vals)], [max(vals) - statistics.mean(vals)]],
                    fmt="o",
                    capsize=3,
                    color=f"C{i}",
                )
        ax.set(title=title, xlabel=f"val loss @ {context} (mean, min..max over seeds)")
    axes[0].set_yticks(range(len(names)), [label[name] for name in names])
    axes[0].invert_yaxis()
    kind = hardware_kind("cuda" if torch.cuda.is_available() else "cpu")  # where the runs' device=auto trains
    # one section and picture per base run, set of rows and hardware kind: an ablation of another run, or of some
    # rows only, never replaces the whole one
    name = "-".join(
        ([] if args.config == CHAR_RUN else [Path(args.config).stem])
        + ([] if len(contenders) == len(CONTENDERS) else sorted(keys - {CONTENDERS[FULL].key}) or ["kimi"])
        + [kind]
    )
    save_figure(
        fig, f"ablation on {Path(args.data).name}: equal time and equal tokens", args.assets / f"ablate_{name}.png"
    )

    def mean(runs):
        return statistics.mean(r["val"] for r in runs.values())

    def apart(a, b):  # whether every seed of a is below every seed of b
        return max(r["val"] for r in a.values()) < min(r["val"] for r in b.values())

    verdicts = []
    if DENSE in long:
        rivals = [long[n] for n in (DENSE, GPT_MUON) if n in long]
        pays = all(mean(long[FULL]) < mean(r) for r in rivals)
        verdicts.append(
            f"At {args.long_budget_s:g} s the shipped config (sparse MoE) reaches {mean(long[FULL]):.4f}, every "
            f"layer dense {mean(long[DENSE]):.4f}"
            + (f", nanoGPT + Muon {mean(long[GPT_MUON]):.4f}" if GPT_MUON in long else "")
            + ": the sparse MoE "
            + ("pays" if pays else "does not pay")
            + " at this budget in the mean of the seeds"
            + (
                ""
                if not pays or args.seeds == 1
                else ", every seed below every rival seed"
                if all(apart(long[FULL], r) for r in rivals)
                else ", with the seeds' ranges overlapping"
            )
            + f". At equal tokens ({args.tokens}): MoE {mean(tokens[FULL]):.4f} vs dense {mean(tokens[DENSE]):.4f}."
        )
    if KDA in long:
        verdicts.append(
            f"KDA beside MLA (Kimi Linear's layout in 3 layers) vs MLA everywhere: {mean(short[KDA]):.4f} vs "
            f"{mean(short[FULL]):.4f} at {args.budget_s:g} s, {mean(tokens[KDA]):.4f} vs {mean(tokens[FULL]):.4f} at "
            f"equal tokens, {mean(long[KDA]):.4f} vs {mean(long[FULL]):.4f} at {args.long_budget_s:g} s (mean of the "
            f"seeds; lower is better)."
        )
    verdict = " ".join(verdicts)
    body = (
        f"Every contender trains on `{args.data}` with the settings of `{args.config}` ({shipped['batch_size']}x"
        f"{shipped['block_size']} tokens per step, {shipped['lr_schedule']}, warmup {shipped['warmup_iters']}, "
        f"min_lr = lr/10) except where named"
        + (
            ": nanoGPT's recipe row keeps nanoGPT's own CPU settings (12x64, "
            "AdamW 1e-3, cosine, warmup 100, beta2 0.99)."
            if "nanoGPT, its recipe's settings" in contenders
            else "."
        )
        + " Each swept contender's "
        f"lr is the best of {', '.join(f'{lr:g}' for lr in args.lrs)} at the short budget (seed {seeds[0]}, "
        f"which is also its seed-{seeds[0]} run there); the no-QK-Clip row keeps nanoKimi's lr. Budgets are "
        f"training seconds (`--max_time_s`, schedule fitted to the time); equal tokens = {args.tokens} training "
        f"tokens (`--max_iters`, rounded to whole steps; schedule fitted to the steps). {args.seeds} seed(s); "
        f"val loss of the final checkpoint on the same {args.eval_batches * EVAL_BATCH_SIZE} val windows of "
        f"{context} tokens, mean (min..max). ms/step: median over the equal-token runs. Newton-Schulz ran in "
        f"{newton_schulz_precisions(finished)} in the Muon runs (each run's checkpoint records it). The long "
        f"budget runs only the contenders of the MoE and KDA questions. The whole benchmark took "
        f"{(time.perf_counter() - started) / 60:.0f} min.\n\n"
        + table(
            [
                "contender",
                "params (active)",
                "lr",
                "batch",
                "ms/step",
                f"steps in {args.budget_s:g} s",
                f"val @ {args.budget_s:g} s",
                f"val @ {args.tokens} tokens",
                f"val @ {args.long_budget_s:g} s",
            ],
            rows,
        )
        + f"\n\n{verdict}\n\n![ablation](assets/ablate_{name}.png)\n\nThe lr sweep (val @ {args.budget_s:g} s, "
        f"seed {seeds[0]}):\n\n" + table(["contender", *(f"lr {lr:g}" for lr in args.lrs)], sweep_rows)
    )
    print(body)
    write_section(args.report, f"ablate-{name}", body, args.command)
