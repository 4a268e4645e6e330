"""Training benchmarks, through the real trainer on shakespeare_char: optimizers compared, and nanoKimi against the
nanoGPT baseline."""

import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, load_model
from ..commands.train import parse_value
from ..config import TrainConfig, load_train_config, saved_settings
from ..errors import UserError
from ..evaluate import evaluate_checkpoint
from ..train import train
from .report import hardware_kind, pyplot, save_figure, table, timings, write_section


def run_training(out_dir, overrides=None, **settings):
    """Train with the real trainer; returns its metrics records, ending with the summary or, for a run that
    diverged (NaN loss: a result here, not a failure), with {"diverged": message}."""
    try:
        summary = train(TrainConfig(out_dir=str(out_dir), progress=False, overwrite=True, **settings), overrides or {})
        ending = []
    except UserError as e:
        ending = [{"diverged": str(e)}]
    else:  # Ctrl-C / SIGTERM end a training run early and cleanly: here that must end the benchmark, not skew it
        if summary["status"] != "finished":
            raise UserError(f"the benchmark was stopped during the run in {out_dir}; no report was written")
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()] + ending


def newton_schulz_precisions(out_dirs):
    """The precisions Newton-Schulz ran in over the runs in out_dirs, as each checkpoint's trainer.json records it:
    "bfloat16", "bfloat16 and float32", or "no run" where none used Muon."""
    found = {Checkpoint(out).trainer_state().get("muon_dtype", "auto") for out in out_dirs} - {"auto"}
    return " and ".join(sorted(found)) or "no run"


def first_reaching(evals, target, key):
    """evals[i][key] ("step" or "time") of the first eval whose val loss is <= target, or None."""
    return next((r[key] for r in evals if r["val_loss"] <= target), None)


def bench_optim(args):
    plt = pyplot()
    given = ("preset", "data", "batch_size", "block_size", "eval_interval", "eval_iters", "seed")
    common = {name: getattr(args, name) for name in given} | dict(log_interval=5, log_max_logit=True)

    def train_with(name, lr, steps=args.steps):
        out = Path(args.out) / f"{name}-lr{lr:g}-{steps}"
        records = run_training(
            out, optimizer=name, lr=lr, min_lr=lr / 10, max_iters=steps, warmup_iters=steps // 20, **common
        )
        return {"evals": [r for r in records if "val_loss" in r], "summary": records[-1].get("summary"), "out": out}

    def final(run):
        return run["evals"][-1]["val_loss"]

    # each optimizer at its own best lr (a sweep), so neither wins by a better-suited default
    sweep = {(n, lr): train_with(n, lr) for n in ("adamw", "muon") for lr in args.lrs}
    best = {n: min(args.lrs, key=lambda lr: final(sweep[n, lr])) for n in ("adamw", "muon")}
    best["muonclip"] = best["muon"]
    names = ("adamw", "muon", "muonclip")
    runs = {
        "adamw": sweep["adamw", best["adamw"]],
        "muon": sweep["muon", best["muon"]],
        "muonclip": train_with("muonclip", best["muon"]),
    }
    target = final(runs["adamw"])
    # Muon given fewer steps, with its whole schedule (warmup, stable, decay) fitted into them, as Moonlight measures
    shorter = {f: train_with("muon", best["muon"], round(f * args.steps)) for f in args.fractions}
    sweep_rows = [[f"{lr:g}"] + [f"{final(sweep[n, lr]):.4f}" for n in ("adamw", "muon")] for lr in args.lrs]
    rows = []
    for n in names:
        reached = first_reaching(runs[n]["evals"], target, "step")
        rows.append(
            [
                n,
                f"{best[n]:g}",
                args.steps,
                f"{final(runs[n]):.4f}",
                f"{runs[n]['summary']['train_time_s']:.0f}",
                reached if reached is not None else "not reached",
            ]
        )
    for f, run in shorter.items():
        rows.append(
            [
                f"muon, {f:g}x the steps",
                f"{best['muon']:g}",
                round(f * args.steps),
                f"{final(run):.4f}",
                f"{run['summary']['train_time_s']:.0f}",
                "yes" if final(run) <= target else "no (final loss above)",
            ]
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    curves = {f"{n} (lr {best[n]:g})": runs[n] for n in names}
    curves |= {f"muon, {f:g}x steps": run for f, run in shorter.items()}
    for label, run in curves.items():
        axes[0].plot([r["step"] for r in run["evals"]], [r["val_loss"] for r in run["evals"]], "o-", ms=3, label=label)
        axes[1].plot([r["time"] for r in run["evals"]], [r["val_loss"] for r in run["evals"]], "o-", ms=3, label=label)
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.axhline(target, color="k", ls="--", lw=1)
        ax.set(xlabel=xlabel, ylabel="val loss", ylim=(None, runs["adamw"]["evals"][0]["val_loss"] * 1.05))
    save_figure(
        fig,
        f"{args.preset} on shakespeare_char: same model, same tokens, each optimizer at its best lr",
        args.assets / "optim_val_loss.png",
    )

    stress = dict(
        common,
        lr=args.stress_lr,
        min_lr=args.stress_lr,
        warmup_iters=0,
        max_iters=args.stress_steps,
        eval_interval=args.stress_steps,
        grad_clip=0.0,
        qk_clip_tau=args.tau,
        lr_schedule="cosine",
        log_interval=1,
    )
    stress_runs = {n: run_training(Path(args.out) / f"stress-{n}", optimizer=n, **stress) for n in names}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    stress_rows = []
    for n in names:
        logs = [r for r in stress_runs[n] if "max_logit" in r]
        axes[0].plot([r["step"] for r in logs], [r["max_logit"] for r in logs], label=n)
        axes[1].plot([r["step"] for r in logs], [r["grad_norm"] for r in logs], label=n)
        evals = [r for r in stress_runs[n] if "val_loss" in r]
        result = "diverged (NaN loss)" if "diverged" in stress_runs[n][-1] else f"{evals[-1]['val_loss']:.4f}"
        stress_rows.append(
            [
                n,
                f"{max(r['max_logit'] for r in logs):.1f}",
                f"{logs[-1]['max_logit']:.1f}",
                sum(r["max_logit"] > args.tau for r in logs),
                len(logs),
                result,
            ]
        )
    axes[0].axhline(args.tau, color="k", ls="--", lw=1, label=f"tau = {args.tau:g}")
    axes[0].set(xlabel="step", ylabel="max attention logit", yscale="log")
    axes[1].set(xlabel="step", ylabel="gradient norm", yscale="log")
    save_figure(fig, f"stress: lr {args.stress_lr}, no grad clipping", args.assets / "optim_stress.png")

    precision = newton_schulz_precisions(r["out"] for r in [*sweep.values(), *runs.values(), *shorter.values()])
    body = (
        f"`{args.preset}`, {args.batch_size}x{args.block_size} tokens per step, WSD schedule (warmup 5%, "
        f"decay to lr/10 over the last 30%), eval every {args.eval_interval} steps on {args.eval_iters} batches, "
        f"seed {args.seed}. Muon's update is RMS-matched to AdamW, so lr and weight decay mean the same for both; "
        f"each optimizer still gets its own best lr from a sweep at {args.steps} steps (final val loss). "
        f"Newton-Schulz ran in {precision} in the Muon runs (each run's trainer.json).\n\n"
        + table(["lr", "adamw", "muon"], sweep_rows)
        + "\n\nAt the best lr, and Muon with fewer steps (its whole schedule fitted into them):\n\n"
        + table(
            [
                "optimizer",
                "lr",
                "steps",
                "final val loss",
                "train s",
                f"reaches AdamW's final val ({target:.4f}): first eval step, or whether the final does",
            ],
            rows,
        )
        + "\n\n![val loss](assets/optim_val_loss.png)\n\n"
        + f"Stress run: lr {args.stress_lr} held constant, no warmup, no gradient clipping, "
        f"{args.stress_steps} steps, tau {args.tau:g}; the max logit of every step's forward pass, i.e. before "
        f"that step's update and clip.\n\n"
        + table(
            [
                "optimizer",
                "max logit (peak)",
                "max logit (last)",
                "logged steps above tau",
                "logged steps",
                "final val loss",
            ],
            stress_rows,
        )
        + "\n\n![stress](assets/optim_stress.png)"
    )
    print(body)
    write_section(args.report, "optim", body, args.command)


@dataclass(frozen=True)
class Recipe:
    """nanoGPT's published recipe for a device, run through baseline.py (nanoGPT's model) and the trainer exactly
    as nanoGPT's own command sets it, the val loss nanoGPT's README reports for it, and the nanoKimi config
    compared against it."""

    command: str  # nanoGPT's command line
    preset: str
    model: dict
    train: dict
    published_val: float
    nanokimi_config: str


# nanoGPT's config/train_shakespeare_char.py over its train.py's defaults (beta1 0.9, weight decay 0.1 on matrices,
# grad clip 1, bias False, compile), in nanoGPT's own names: the baby GPT, its batches, its AdamW, its device
NANOGPT_SHAKESPEARE_CHAR = (
    dict(n_layer=6, n_head=6, n_embd=384, dropout=0.2, block_size=256)
    | dict(batch_size=64, max_iters=5000, lr_decay_iters=5000, eval_interval=250, eval_iters=200)
    | dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
    | dict(device="cuda", compile=True)
)
TRAINER_NAMES = {"learning_rate": "lr"}  # the trainer's names for nanoGPT's settings, where they differ
MODEL_SETTINGS = ("n_layer", "n_head", "n_embd", "dropout")
PRINT_ONLY = ("log_interval",)  # how often nanoGPT prints: the trainer logs at its own interval


def nanogpt_recipe(command, preset, published_val, nanokimi_config):
    """A Recipe from nanoGPT's command line: its --name=value flags over config/train_shakespeare_char.py, as
    nanoGPT's configurator applies them. nanoGPT runs float32 on a CPU, bf16 on a GPU that has it."""
    settings = NANOGPT_SHAKESPEARE_CHAR | {k: parse_value(v) for k, v in re.findall(r"--(\w+)=(\S+)", command)}
    model = {k: settings[k] for k in MODEL_SETTINGS} | dict(n_positions=settings["block_size"])
    train = {TRAINER_NAMES.get(k, k): v for k, v in settings.items() if k not in MODEL_SETTINGS + PRINT_ONLY}
    train |= dict(optimizer="adamw", lr_schedule="cosine", dtype="float32" if train["device"] == "cpu" else "auto")
    return Recipe(command, preset, model, train, published_val, nanokimi_config)


RECIPES = {
    "cpu": nanogpt_recipe(
        "python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 "
        "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 "
        "--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0",
        preset="gpt-shakespeare-char-cpu",
        published_val=1.88,
        nanokimi_config="shakespeare-char-cpu",
    ),
    "gpu": nanogpt_recipe(
        "python train.py config/train_shakespeare_char.py",
        preset="gpt-shakespeare-char",
        published_val=1.4697,
        nanokimi_config="shakespeare-char",
    ),
}
REPRODUCTION_TOLERANCE = 0.04  # the baseline's mean final val may sit this far from nanoGPT's published value


def check_reproduced(recipe, val):
    """The baseline must reproduce nanoGPT's published result before anything is compared with it."""
    if abs(val - recipe.published_val) > REPRODUCTION_TOLERANCE:
        raise UserError(
            f"the baseline did not reproduce nanoGPT's published recipe: val {val:.4f}, nanoGPT reports "
            f"{recipe.published_val} (tolerance {REPRODUCTION_TOLERANCE}); no comparison was written"
        )


def matmul_peak_gflops(device="cpu", dtype=torch.float32, n=1024, repeats=50):
    """This machine's matmul peak in the run's precision, measured now (the MFU denominator): the fastest of
    `repeats` matmuls, as a median would dip with whatever else the shared machine runs meanwhile."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def matmul():
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()

    return 2 * n**3 / min(timings(matmul, repeats, warmup=5)) / 1e9


def nanokimi_settings(config_path):
    """(TrainConfig fields, model overrides) of a named run or TOML file, as `nanokimi train CONFIG` reads it."""
    cfg, model = load_train_config(config_path)
    return {k: v for k, v in saved_settings(cfg).items() if k not in ("out_dir", "progress")}, model


def spread(values, fmt="{:.4f}"):
    """ "mean (min..max)" of values over seeds, or the one value."""
    values = list(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


EVAL_BATCH_SIZE = 12  # windows per evaluation batch: --eval_batches x 12 windows in all


def score(out_dir, data, block_size, batches):
    """The one evaluator of the comparisons: val loss of a run's final checkpoint on fixed windows."""
    return evaluate_checkpoint(out_dir, data, block_size, batches, EVAL_BATCH_SIZE)["loss"]


def bench_compare(args):
    """nanoKimi's shipped config against nanoGPT's own recipe for the device: time to the recipe's val loss."""
    plt = pyplot()
    started = time.perf_counter()
    recipe = RECIPES[args.recipe]
    kimi_settings, kimi_model = nanokimi_settings(args.config or recipe.nanokimi_config)
    base_train = recipe.train | dict(data=args.data)
    if args.quick:  # a smoke test of the report: a few steps, no reproduction check
        base_train |= dict(max_iters=20, lr_decay_iters=20, warmup_iters=2, eval_interval=10, eval_iters=1)
    context = recipe.train["block_size"]
    dtype = torch.float32 if recipe.train["dtype"] == "float32" else torch.bfloat16  # nanoGPT's GPU default: bf16
    peaks = []

    def evaluated(out, records, own_block):
        evals = [r for r in records if "val_loss" in r]
        val = score(out, args.data, context, args.eval_batches)
        return {
            "out": out,
            "evals": evals,
            "summary": records[-1]["summary"],
            "val": val,
            "val_own": val if own_block == context else score(out, args.data, own_block, args.eval_batches),
        }

    def baseline(seed):
        peaks.append(matmul_peak_gflops(recipe.train["device"], dtype))
        out = Path(args.out) / f"nanogpt-recipe-{seed}"
        return evaluated(out, run_training(out, recipe.model, preset=recipe.preset, **base_train, seed=seed), context)

    def nanokimi(seed, budget_s):
        peaks.append(matmul_peak_gflops(recipe.train["device"], dtype))
        out = Path(args.out) / f"nanokimi-{budget_s:.0f}s-{seed}"
        # the clock ends the run (max_iters is only a cap) and its lr schedule is fitted to the budget
        settings = kimi_settings | dict(
            data=args.data,
            seed=seed,
            max_time_s=budget_s,
            max_iters=10**6,
            eval_interval=10**6,
            eval_iters=1,
            device=recipe.train["device"],
        )
        records = run_training(out, kimi_model, **settings)
        if "diverged" in records[-1]:
            raise UserError(f"nanoKimi diverged: {records[-1]['diverged']}")
        return evaluated(out, records, settings["block_size"])

    base_runs = [baseline(seed) for seed in range(args.seeds)]
    target = statistics.mean(r["val"] for r in base_runs)
    recipe_time = statistics.mean(r["summary"]["train_time_s"] for r in base_runs)
    if args.quick:
        print(f"quick run: the baseline's {target:.4f} is not checked against nanoGPT's {recipe.published_val}")
    else:
        check_reproduced(recipe, target)
    fractions = sorted(set(args.fractions) | {1.0})
    kimi_runs = {f: [nanokimi(seed, f * recipe_time) for seed in range(args.seeds)] for f in fractions}
    mean_val = {f: statistics.mean(r["val"] for r in runs) for f, runs in kimi_runs.items()}

    # time to the target: the smallest budget whose mean final val reaches it, and a linear interpolation of the
    # mean val between that budget and the one before it
    reached = [f for f in fractions if mean_val[f] <= target]
    if not reached:
        time_to_target = f"not reached within {fractions[-1]:g}x (val {mean_val[fractions[-1]]:.4f})"
    else:
        f = reached[0]
        below = [g for g in fractions if g < f]
        estimate = f
        if below:
            g = below[-1]
            estimate = g + (f - g) * (mean_val[g] - target) / (mean_val[g] - mean_val[f])
        time_to_target = f"<= {f:g}x ({f * recipe_time:.0f} s)" + (
            f", ~{estimate:.2f}x interpolated ({estimate * recipe_time:.0f} s)" if below else ""
        )

    tokens = {
        "nanoGPT recipe": recipe.train["batch_size"] * recipe.train["block_size"],
        "nanoKimi": kimi_settings["batch_size"] * kimi_settings["block_size"] * kimi_settings["grad_accum"],
    }
    rows = [
        [
            "nanoGPT recipe (baseline.py)",
            "1x",
            spread((r["summary"]["train_time_s"] for r in base_runs), "{:.1f}"),
            spread((r["summary"]["step"] for r in base_runs), "{:.0f}"),
            spread(r["val"] for r in base_runs),
            spread(r["val_own"] for r in base_runs),
        ]
    ]
    for f in fractions:
        runs = kimi_runs[f]
        rows.append(
            [
                f"nanoKimi ({args.config or recipe.nanokimi_config})",
                f"{f:g}x",
                spread((r["summary"]["train_time_s"] for r in runs), "{:.1f}"),
                spread((r["summary"]["step"] for r in runs), "{:.0f}"),
                spread(r["val"] for r in runs),
                spread(r["val_own"] for r in runs),
            ]
        )

    peak = max(peaks)
    throughput = []
    for name, run in (("nanoGPT recipe", base_runs[0]), ("nanoKimi", kimi_runs[1.0][0])):
        model, _, _ = load_model(run["out"])
        s = run["summary"]
        tok_s = s["step"] * tokens[name] / s["train_time_s"]
        block = recipe.train["block_size"] if name == "nanoGPT recipe" else kimi_settings["block_size"]
        flops = model.flops_per_token(block)
        params = model.num_params()
        throughput.append(
            [
                name,
                f"{params['total'] / 1e6:.2f}M",
                f"{params['active'] / 1e6:.2f}M",
                tokens[name],
                f"{tok_s:.0f}",
                f"{flops / 1e6:.1f}M",
                f"{100 * tok_s * flops / 1e9 / peak:.1f}%",
            ]
        )

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [0] + [f * recipe_time for f in fractions],
        [None] + [mean_val[f] for f in fractions],
        "o-",
        label="nanoKimi, final val of a run of that length (mean of seeds)",
    )
    for r in base_runs:
        ax.plot(
            [e["time"] for e in r["evals"]],
            [e["val_loss"] for e in r["evals"]],
            "-",
            color="C1",
            alpha=0.5,
            label="nanoGPT recipe, its own evals" if r is base_runs[0] else None,
        )
    ax.axhline(target, color="k", ls="--", lw=1, label=f"recipe's final val {target:.4f}")
    ax.set(xlabel="training seconds", ylabel="val loss", ylim=(None, max(mean_val.values()) + 0.3))
    kind = hardware_kind(recipe.train["device"])
    save_figure(
        fig,
        f"nanoKimi vs nanoGPT's {args.recipe.upper()} recipe, shakespeare_char ({kind})",
        args.assets / f"compare_{args.recipe}_{kind}.png",
    )
    precision = newton_schulz_precisions(r["out"] for runs in kimi_runs.values() for r in runs)

    kimi_desc = ", ".join(
        f"{k} {v}"
        for k, v in kimi_settings.items()
        if k in ("batch_size", "block_size", "optimizer", "lr", "min_lr", "lr_schedule", "warmup_iters", "dtype")
    )
    body = (
        f"nanoGPT's {args.recipe.upper()} recipe, as its README runs it (`{recipe.command}`), through "
        f"baseline.py (nanoGPT's model) and the trainer: {args.seeds} seed(s), whose mean final val "
        f"{target:.4f} is the target and "
        + (
            f"was NOT checked against nanoGPT's published {recipe.published_val} (--quick). "
            if args.quick
            else f"reproduces nanoGPT's published {recipe.published_val} (checked, tolerance "
            f"{REPRODUCTION_TOLERANCE}). "
        )
        + f"nanoKimi's shipped config "
        f"(`{args.config or recipe.nanokimi_config}`: {kimi_desc}) trains for the given fraction of the recipe's "
        f"mean training time ({recipe_time:.1f} s; `--max_time_s`, its lr schedule fitted to the time), "
        f"{args.seeds} seed(s) each. Every final checkpoint is scored by one evaluator (`nanokimi eval`): the same "
        f"{args.eval_batches * EVAL_BATCH_SIZE} windows spread evenly over val, at the recipe's context "
        f"({context} tokens), and at each model's own training window. Mean (min..max) over seeds. The whole "
        f"benchmark took {(time.perf_counter() - started) / 60:.0f} min.\n\n"
        f"**nanoKimi's time to the recipe's val loss: {time_to_target}** of the recipe's "
        f"{recipe_time:.1f} s.\n\n"
        + table(["model", "training time", "seconds", "steps", f"val loss @ {context}", "val loss @ own window"], rows)
        + f"\n\n![compare](assets/compare_{args.recipe}_{kind}.png)\n\n"
        + f"nanoKimi's Newton-Schulz ran in {precision} (each run's choice, from its trainer.json). "
        + f"Throughput of the 1x runs (seed 0); MFU against this machine's {str(dtype)[6:]} matmul peak measured "
        f"in this run, {peak:.0f} GFLOP/s (best of {len(peaks)} measurements, one before each run):\n\n"
        + table(["model", "params", "active", "tokens/step", "tokens/s", "train FLOPs/token", "MFU"], throughput)
    )
    print(body)
    write_section(args.report, f"compare-{args.recipe}-{hardware_kind(recipe.train['device'])}", body, args.command)


def bench_sweep(args):
    """A documented sweep of the CPU config: one setting varied at a time from the current best (batch shape, then
    warmup, then lr, then model dims), each run given the same training seconds and scored by the one evaluator at
    the recipe's context; one seed per point (`bench compare` then measures the winner over seeds)."""
    recipe = RECIPES["cpu"]
    settings, model = nanokimi_settings(args.config)
    settings |= dict(
        data=args.data, seed=args.seed, max_time_s=args.budget_s, max_iters=10**6, eval_interval=10**6, eval_iters=1
    )
    context = recipe.train["block_size"]
    best = (settings, model)
    rows, results = [], {}

    def trial(stage, label, train_changes, model_changes):
        s, m = best[0] | train_changes, best[1] | model_changes
        key = json.dumps([s, m], sort_keys=True)
        if key not in results:
            out = Path(args.out) / f"{len(results):02d}"
            records = run_training(out, m, **s)
            val = float("inf") if "diverged" in records[-1] else score(out, args.data, context, args.eval_batches)
            results[key] = (val, records[-1].get("summary", {}).get("step", 0))
        val, steps = results[key]
        rows.append([stage, label, steps, "diverged" if math.isinf(val) else f"{val:.4f}"])
        print(rows[-1], flush=True)
        return val, (s, m)

    stages = {
        "batch x block": [(f"{b}x{t}", dict(batch_size=b, block_size=t), {}) for b, t in args.shapes],
        "warmup steps": [(str(w), dict(warmup_iters=w), {}) for w in args.warmups],
        "lr (min_lr = lr/10)": [(f"{lr:g}", dict(lr=lr, min_lr=lr / 10), {}) for lr in args.lrs],
        "model": [(label, {}, changes) for label, changes in MODEL_VARIANTS.items()],
    }
    for stage, trials in stages.items():
        outcomes = [trial(stage, *t) for t in trials]
        best = min(outcomes, key=lambda o: o[0])[1]
        rows[-len(trials) + [o[1] for o in outcomes].index(best)][1] += " (best)"
    changed = {k: v for k, v in best[0].items() if settings.get(k) != v}
    body = (
        f"Starting from `{args.config}`, each stage varies one setting and keeps the best; every run trains for "
        f"{args.budget_s:g} s (`--max_time_s`, schedule fitted), seed {args.seed}, and is scored on the same "
        f"{args.eval_batches * EVAL_BATCH_SIZE} val windows of {context} tokens (the nanoGPT CPU recipe's "
        f"context). Single runs: differences under ~0.02 are within seed noise.\n\n"
        + table(["stage", "setting", "steps", f"val loss @ {context}"], rows)
        + f"\n\nBest: training settings {changed or 'unchanged'}, model overrides {best[1] or 'none'}."
    )
    print(body)
    write_section(args.report, "sweep-cpu", body, args.command)


# model variants of the sweep's last stage: the preset, then narrower/shallower/fewer-expert versions of it
MODEL_VARIANTS = {
    "as configured": {},
    "3 layers": {"num_hidden_layers": 3},
    "4 routed experts": {"n_routed_experts": 4},
}
