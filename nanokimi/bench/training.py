"""Training benchmarks, through the real trainer on shakespeare_char: optimizers compared, and nanoKimi against the
nanoGPT baseline."""

import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, load_model
from ..config import TrainConfig
from ..errors import UserError
from ..presets import PRESETS
from ..train import train
from .report import pyplot, save_figure, table, timings, write_section


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


def first_reaching(evals, target, key):
    """evals[i][key] ("step" or "time") of the first eval whose val loss is <= target, or None."""
    return next((r[key] for r in evals if r["val_loss"] <= target), None)


def bench_optim(args):
    plt = pyplot()
    common = dict(preset=args.preset, data=args.data, batch_size=args.batch_size, block_size=args.block_size,
                  eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=5, seed=args.seed,
                  log_max_logit=True)

    def train_with(name, lr, steps=args.steps):
        records = run_training(Path(args.out) / f"{name}-lr{lr:g}-{steps}", optimizer=name, lr=lr, min_lr=lr / 10,
                               max_iters=steps, warmup_iters=steps // 20, **common)
        return {"evals": [r for r in records if "val_loss" in r], "summary": records[-1].get("summary")}

    def final(run):
        return run["evals"][-1]["val_loss"]

    # each optimizer at its own best lr (a sweep), so neither wins by a better-suited default
    sweep = {(n, lr): train_with(n, lr) for n in ("adamw", "muon") for lr in args.lrs}
    best = {n: min(args.lrs, key=lambda lr: final(sweep[n, lr])) for n in ("adamw", "muon")}
    best["muonclip"] = best["muon"]
    names = ("adamw", "muon", "muonclip")
    runs = {"adamw": sweep["adamw", best["adamw"]], "muon": sweep["muon", best["muon"]],
            "muonclip": train_with("muonclip", best["muon"])}
    target = final(runs["adamw"])
    # Muon given fewer steps, with its whole schedule (warmup, stable, decay) fitted into them, as Moonlight measures
    shorter = {f: train_with("muon", best["muon"], round(f * args.steps)) for f in args.fractions}
    sweep_rows = [[f"{lr:g}"] + [f"{final(sweep[n, lr]):.4f}" for n in ("adamw", "muon")] for lr in args.lrs]
    rows = []
    for n in names:
        reached = first_reaching(runs[n]["evals"], target, "step")
        rows.append([n, f"{best[n]:g}", args.steps, f"{final(runs[n]):.4f}",
                     f"{runs[n]['summary']['train_time_s']:.0f}", reached if reached is not None else "not reached"])
    for f, run in shorter.items():
        rows.append([f"muon, {f:g}x the steps", f"{best['muon']:g}", round(f * args.steps), f"{final(run):.4f}",
                     f"{run['summary']['train_time_s']:.0f}",
                     "yes" if final(run) <= target else "no (final loss above)"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    curves = {f"{n} (lr {best[n]:g})": runs[n] for n in names}
    curves |= {f"muon, {f:g}x steps": run for f, run in shorter.items()}
    for label, run in curves.items():
        axes[0].plot([r["step"] for r in run["evals"]], [r["val_loss"] for r in run["evals"]], "o-", ms=3, label=label)
        axes[1].plot([r["time"] for r in run["evals"]], [r["val_loss"] for r in run["evals"]], "o-", ms=3,
                     label=label)
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.axhline(target, color="k", ls="--", lw=1)
        ax.set(xlabel=xlabel, ylabel="val loss", ylim=(None, runs["adamw"]["evals"][0]["val_loss"] * 1.05))
    save_figure(fig, f"{args.preset} on shakespeare_char: same model, same tokens, each optimizer at its best lr",
                args.assets / "optim_val_loss.png")

    stress = dict(common, lr=args.stress_lr, min_lr=args.stress_lr, warmup_iters=0, max_iters=args.stress_steps,
                  eval_interval=args.stress_steps, grad_clip=0.0, qk_clip_tau=args.tau, lr_schedule="cosine",
                  log_interval=1)
    stress_runs = {n: run_training(Path(args.out) / f"stress-{n}", optimizer=n, **stress) for n in names}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    stress_rows = []
    for n in names:
        logs = [r for r in stress_runs[n] if "max_logit" in r]
        axes[0].plot([r["step"] for r in logs], [r["max_logit"] for r in logs], label=n)
        axes[1].plot([r["step"] for r in logs], [r["grad_norm"] for r in logs], label=n)
        evals = [r for r in stress_runs[n] if "val_loss" in r]
        result = "diverged (NaN loss)" if "diverged" in stress_runs[n][-1] else f"{evals[-1]['val_loss']:.4f}"
        stress_rows.append([n, f"{max(r['max_logit'] for r in logs):.1f}", f"{logs[-1]['max_logit']:.1f}",
                            sum(r["max_logit"] > args.tau for r in logs), len(logs), result])
    axes[0].axhline(args.tau, color="k", ls="--", lw=1, label=f"tau = {args.tau:g}")
    axes[0].set(xlabel="step", ylabel="max attention logit", yscale="log")
    axes[1].set(xlabel="step", ylabel="gradient norm", yscale="log")
    save_figure(fig, f"stress: lr {args.stress_lr}, no grad clipping", args.assets / "optim_stress.png")

    body = (f"`{args.preset}`, {args.batch_size}x{args.block_size} tokens per step, WSD schedule (warmup 5%, "
            f"decay to lr/10 over the last 30%), eval every {args.eval_interval} steps on {args.eval_iters} batches, "
            f"seed {args.seed}. Muon's update is RMS-matched to AdamW, so lr and weight decay mean the same for both; "
            f"each optimizer still gets its own best lr from a sweep at {args.steps} steps (final val loss):\n\n"
            + table(["lr", "adamw", "muon"], sweep_rows)
            + "\n\nAt the best lr, and Muon with fewer steps (its whole schedule fitted into them):\n\n"
            + table(["optimizer", "lr", "steps", "final val loss", "train s",
                     f"reaches AdamW's final val ({target:.4f}): first eval step, or whether the final does"], rows)
            + "\n\n![val loss](assets/optim_val_loss.png)\n\n"
            + f"Stress run: lr {args.stress_lr} held constant, no warmup, no gradient clipping, "
              f"{args.stress_steps} steps, tau {args.tau:g}; the max logit of every step's forward pass, i.e. before "
              f"that step's update and clip.\n\n"
            + table(["optimizer", "max logit (peak)", "max logit (last)", "logged steps above tau", "logged steps",
                     "final val loss"], stress_rows)
            + "\n\n![stress](assets/optim_stress.png)")
    print(body)
    write_section(args.report, "optim", body, args.command)



# nanoGPT's config/train_shakespeare_char.py (its warmup, 100 of 5000 steps, becomes WARMUP_FRACTION of each run)
NANOGPT_HPARAMS = dict(optimizer="adamw", lr=1e-3, min_lr=1e-4, beta2=0.99, lr_schedule="cosine", weight_decay=0.1,
                       grad_clip=1.0)
NANOKIMI_HPARAMS = dict(optimizer="muonclip", lr=4e-3, min_lr=4e-4, lr_schedule="wsd")  # lr: bench optim's best
WARMUP_FRACTION = 0.05
CALIBRATION_STEPS, CALIBRATION_WARMUP = 60, 20  # the first steps run slow (allocator, kernel set-up): not counted


def matmul_peak_gflops(n=1024, repeats=50):
    """This machine's fp32 matmul peak, measured now (the MFU denominator): the fastest of `repeats` matmuls, as a
    median would dip with whatever else the shared machine runs meanwhile."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / min(timings(lambda: a @ b, repeats, warmup=5)) / 1e9


def bench_compare(args):
    plt = pyplot()
    started = time.perf_counter()
    peaks = []  # measured before every training run: one measurement can land on a busy moment of a shared machine
    common = dict(data=args.data, batch_size=args.batch_size, block_size=args.block_size, log_interval=10,
                  eval_iters=args.eval_iters, device=args.device)
    contenders = {  # name: (preset, settings, model overrides) -- one component swapped per ablation
        "nanoGPT baseline": ("gpt-shakespeare-char-cpu", NANOGPT_HPARAMS, {}),
        "nanoKimi": (args.preset, NANOKIMI_HPARAMS, {}),
    }
    base = PRESETS[args.preset]
    dense_width = base.moe_intermediate_size * (base.num_experts_per_tok + base.n_shared_experts)
    ablations = {
        "nanoKimi, MLA -> MHA (same head dims)": {"attention": "mha"},
        "nanoKimi, MoE -> dense (equal active)": {"first_k_dense_replace": base.num_hidden_layers,
                                                   "intermediate_size": dense_width},
        "nanoKimi, MuonClip -> AdamW": {"optimizer": "adamw"},
    }

    def run(name, seed, steps, extra=None, evals=args.evals, budget_s=0.0):
        """A training run of `steps` steps, or with `budget_s`, of budget_s training seconds (its lr schedule fitted to
        them) where `steps` is the expected step count, which sets the warmup and the eval spacing."""
        preset, settings, overrides = contenders.get(name, contenders["nanoKimi"])
        settings, overrides = dict(settings), dict(overrides)
        for key, value in (extra or {}).items():
            (settings if key in ("optimizer",) else overrides)[key] = value
        # a timed run's max_iters is only a cap, far past the expected steps, so the clock ends it
        settings = settings | dict(max_iters=10 * steps if budget_s else steps, max_time_s=budget_s, seed=seed,
                                   eval_interval=max(1, steps // evals), warmup_iters=int(WARMUP_FRACTION * steps))
        peaks.append(matmul_peak_gflops(512 if args.quick else 1024))
        length = f"{budget_s:g}s" if budget_s else f"{steps}steps"
        out = Path(args.out) / f"{name.replace(' ', '_').replace(',', '').replace('>', '')}-{length}-{seed}"
        records = run_training(out, overrides, preset=preset, **common, **settings)
        if "diverged" in records[-1]:
            raise UserError(f"{name} diverged: {records[-1]['diverged']}")
        return {"out": out, "evals": [r for r in records if "val_loss" in r],
                "logs": [r for r in records if "loss" in r], "summary": records[-1]["summary"]}

    def step_time(logs):  # seconds per step after the warm-up steps
        first = next(r for r in logs if r["step"] >= CALIBRATION_WARMUP)
        return (logs[-1]["time"] - first["time"]) / (logs[-1]["step"] - first["step"])

    # every run trains for the budget's seconds exactly (`max_time_s`), so step counts follow the machine's speed; a
    # short calibration run of each model (evaluated only at its end) says how many to expect
    calibration = {n: step_time(run(n, 0, CALIBRATION_STEPS, evals=1)["logs"]) for n in contenders}
    expected = {n: max(20, int(args.budget_s / t)) for n, t in calibration.items()}
    planned = (args.seeds * 2 + len(ablations)) * args.budget_s + expected["nanoGPT baseline"] * calibration["nanoKimi"]
    print(f"expected steps: {expected}; about {planned / 60:.0f} min of training to go, plus evals")
    results = {n: [run(n, seed, expected[n], budget_s=args.budget_s) for seed in range(args.seeds)]
               for n in contenders}
    baseline_final = statistics.mean(r["evals"][-1]["val_loss"] for r in results["nanoGPT baseline"])
    baseline_steps = round(statistics.mean(r["summary"]["step"] for r in results["nanoGPT baseline"]))
    kimi_same_tokens = run("nanoKimi", 0, baseline_steps)
    ablation_runs = {n: run(n, 0, expected["nanoKimi"], extra, budget_s=args.budget_s)
                     for n, extra in ablations.items()}

    def spread(values, fmt="{:.4f}", unit="", missing="not reached"):
        """'mean (min..max)' over the seeds that have a value (None: reached no value), saying how many do."""
        values = list(values)
        found = [v for v in values if v is not None]
        if not found:
            return missing
        text = fmt.format(found[0]) if len(found) == 1 else \
            f"{fmt.format(statistics.mean(found))} ({fmt.format(min(found))}..{fmt.format(max(found))})"
        return text + unit + (f" ({len(found)}/{len(values)} seeds)" if len(found) < len(values) else "")

    tokens_per_step = args.batch_size * args.block_size
    rows = []
    for n in contenders:
        steps = [r["summary"]["step"] for r in results[n]]
        rows.append([n, spread(steps, "{:.0f}"), f"{statistics.mean(steps) * tokens_per_step / 1e6:.2f}M",
                     spread((r["summary"]["train_time_s"] for r in results[n]), "{:.0f}", " s"),
                     spread(r["evals"][-1]["val_loss"] for r in results[n]),
                     spread((first_reaching(r["evals"], baseline_final, "time") for r in results[n]), "{:.0f}", " s")])
    same_tokens = kimi_same_tokens["evals"][-1]["val_loss"]
    ablation_rows = [[n, r["summary"]["step"], f"{r['evals'][-1]['val_loss']:.4f}",
                      f"{r['summary']['train_time_s']:.0f} s"]
                     for n, r in [("nanoKimi", results["nanoKimi"][0])] + list(ablation_runs.items())]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in contenders:
        for seed, r in enumerate(results[n]):
            tokens = [e["step"] * tokens_per_step / 1e6 for e in r["evals"]]
            style = dict(color="C0" if n == "nanoKimi" else "C1", alpha=1 if seed == 0 else 0.4,
                         label=n if seed == 0 else None)
            axes[0].plot([e["time"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o-", ms=3, **style)
            axes[1].plot(tokens, [e["val_loss"] for e in r["evals"]], "o-", ms=3, **style)
    axes[0].set(xlabel="training seconds", ylabel="val loss")
    axes[1].set(xlabel="tokens (M)", ylabel="val loss")
    for ax in axes:
        ax.axhline(baseline_final, color="k", ls="--", lw=1)
    save_figure(fig, f"shakespeare_char, {args.budget_s:.0f} s budget each, {args.seeds} seed(s)",
                args.assets / "compare_val_loss.png")

    peak = max(peaks)
    accounting, throughput = [], []
    for n in contenders:
        r = results[n][0]
        model, _, _ = load_model(r["out"])
        params = model.num_params()
        size = (Checkpoint(r["out"]).path / "model.safetensors").stat().st_size
        val = r["evals"][-1]["val_loss"]
        accounting.append([n, f"{params['total'] / 1e6:.3f}M", f"{params['active'] / 1e6:.3f}M",
                           f"{size / 2 ** 20:.2f} MiB", f"{val:.4f}", f"{math.exp(val):.3f}"])
        tok_s = r["summary"]["step"] * tokens_per_step / r["summary"]["train_time_s"]
        flops = model.flops_per_token(args.block_size)
        throughput.append([n, f"{tok_s:.0f}", f"{flops / 1e6:.1f}M", f"{tok_s * flops / 1e9:.1f}",
                           f"{100 * tok_s * flops / 1e9 / peak:.1f}%"])

    body = (f"Same data (shakespeare_char), same batch ({args.batch_size}x{args.block_size} tokens), same machine, "
            f"one run. The baseline uses nanoGPT's shakespeare_char hyperparameters (AdamW lr 1e-3, beta2 0.99, "
            f"cosine to 1e-4); nanoKimi uses MuonClip lr {NANOKIMI_HPARAMS['lr']:g} (the best Muon lr of `nanokimi "
            f"bench optim`) with K2's WSD schedule; both warm up for {WARMUP_FRACTION:.0%} of their expected steps. "
            f"Every run trains for {args.budget_s:.0f} s of training time (evals excluded; `--max_time_s`, which fits "
            f"the lr schedule to the time), so its step count follows the machine's speed; {args.seeds} seed(s) "
            f"(mean (min..max)); about {args.evals} evals per run (spaced by the step count a {CALIBRATION_STEPS}-step "
            f"calibration run predicts) on {args.eval_iters} batches per split. "
            f"The whole benchmark took {(time.perf_counter() - started) / 60:.0f} min of wall-clock.\n\n"
            + table(["model", "steps", "tokens", "train time", "final val loss",
                     f"time to baseline's final val ({baseline_final:.4f})"], rows)
            + f"\n\nMatched tokens: nanoKimi trained for the baseline's {baseline_steps} steps (mean) reaches "
              f"val loss {same_tokens:.4f} in {kimi_same_tokens['summary']['train_time_s']:.0f} s.\n\n"
              f"![compare](assets/compare_val_loss.png)\n\n"
              f"Ablations, one component swapped, seed 0, the same {args.budget_s:.0f} s each:\n\n"
            + table(["model", "steps", "final val loss", "train time"], ablation_rows)
            + f"\n\nTraining throughput (fp32), model FLOPs utilisation against this machine's fp32 matmul peak "
              f"measured in this run: {peak:.0f} GFLOP/s (the best of {len(peaks)} measurements, one before each "
              f"training run; the lowest was {min(peaks):.0f}).\n\n"
            + table(["model", "tokens/s", "train FLOPs/token", "GFLOP/s", "MFU"], throughput)
            + "\n\nModel accounting:\n\n"
            + table(["model", "total params", "active params", "checkpoint", "val loss", "val perplexity"],
                    accounting))
    print(body)
    write_section(args.report, "compare", body, args.command)
