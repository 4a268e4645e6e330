"""The training loop: one process, or DDP or FSDP2 (`--fsdp`) under torchrun. Pretraining, exact resume and
finetuning.

Every step's batches and dropout come from RNG seeds derived from (seed, rank, step), so a resumed run replays the
uninterrupted run exactly from the weights, optimizer state and step number alone."""

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from . import checkpoint, sharding
from .config import saved_settings
from .errors import UserError, write_failure
from .evaluate import evaluate
from .output_folders import check_destination
from .hardware import compile_model, describe, expert_gemm_path
from .model import MoE
from .optim import Muon, configure_optimizer, unwrap
from .plan import plan_run
from .plots import plot_run, read_records
from .models import build_model
from .processes import Run, StopRequest, shared_lock


def learning_rate(cfg, step, elapsed=0.0):
    """Linear warmup, then cosine decay to min_lr (cosine) or constant then cosine decay over the last decay_frac
    (wsd, as Kimi-K2: constant 2e-4, then cosine to 2e-5). With a time budget the decay follows the share of
    max_time_s used (`elapsed` training seconds) where that is further along than the share of the steps."""
    horizon = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    decay_start = (
        cfg.warmup_iters
        if cfg.lr_schedule == "cosine"
        else max(cfg.warmup_iters, horizon - int(cfg.decay_frac * horizon))
    )
    if cfg.max_time_s:  # the share of the time budget used counts as the same share of the steps
        step = max(step, elapsed / cfg.max_time_s * horizon)
    progress = (step - decay_start) / max(1, horizon - decay_start)
    if progress < 0:
        return cfg.lr
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def step_seed(seed, rank, step, stream):
    """A distinct seed per (run seed, rank, step, stream): batches and dropout replay exactly on resume."""
    return (((seed * 1_000_003 + rank) * 1_000_033 + step) * 4 + stream) % (2**63)


def train(cfg, overrides=None):
    """Train per `cfg` (TrainConfig) with model-field `overrides`; returns a summary dict (rank 0)."""
    check_destination(cfg.out_dir, "train", "a training run")  # before the lock file marks it as a run's
    run = Run(cfg)
    try:
        with shared_lock(run, cfg.out_dir):
            summary = Trainer(cfg, dict(overrides or {}), run).fit()
        run.close(finished=True)
        return summary if run.master else None  # one summary per run, not one per process
    finally:
        run.close()


class Trainer:
    def __init__(self, cfg, overrides, run):
        self.cfg, self.run = cfg, run
        if cfg.grad_accum % run.world:
            raise UserError(f"grad_accum ({cfg.grad_accum}) must be divisible by the number of processes ({run.world})")
        if cfg.ep and run.distributed and not cfg.fsdp:
            raise UserError(
                "--ep spreads the experts over the processes of an FSDP run: add --fsdp (`... train ... "
                "--fsdp --ep`); DDP replicates every expert on every process"
            )
        if cfg.ep and not run.distributed:
            raise UserError(
                "--ep spreads the experts over the processes of an FSDP run: launch with `torchrun "
                "--nproc_per_node=N -m nanokimi train ... --fsdp --ep`"
            )
        if cfg.fsdp and not run.distributed:
            raise UserError(
                "--fsdp shards the model over several processes: launch with `torchrun "
                "--nproc_per_node=N -m nanokimi train ... --fsdp`"
            )
        self.micro_steps = cfg.grad_accum // run.world
        plan = plan_run(cfg, overrides)
        self.data, self.arch, self.model_config, source = plan.data, plan.arch, plan.config, plan.source
        experts = getattr(self.model_config, "n_routed_experts", 0)
        if cfg.ep and (not experts or experts % run.world):
            raise UserError(
                f"--ep gives each of the {run.world} processes an equal share of the routed experts, but "
                f"{cfg.preset} has {experts}: use a process count that divides {experts}"
                if experts
                else f"--ep spreads routed experts, and {cfg.preset} ({self.arch}) has none: drop --ep"
            )
        torch.manual_seed(cfg.seed)
        model = build_model(
            self.arch,
            self.model_config,
            run.device,
            cfg.batch_size * cfg.block_size,
            run.world if cfg.fsdp else 1,
            f"training {cfg.preset} at --batch_size={cfg.batch_size} --block_size={cfg.block_size}",
        )
        if source is not None:
            source.load_weights(model, grow_vocab=bool(plan.added_tokens))
        if plan.added_tokens and run.master:
            print(
                f"note: {len(plan.added_tokens)} tokens of {cfg.data}'s tokenizer ({', '.join(plan.added_tokens[:3])}"
                f"{', ...' if len(plan.added_tokens) > 3 else ''}) are new to {source.path}: their embedding and "
                f"output rows start at the mean of the others",
                flush=True,
            )
        self.model = model.to(run.device)
        if cfg.fsdp:
            sharding.shard_model(self.model, run.dtype, experts_parallel=cfg.ep)
        muon_dtype = cfg.muon_dtype
        if cfg.resume and muon_dtype == "auto":  # keep the precision the run chose, so that it replays bitwise
            muon_dtype = source.trainer_state().get("muon_dtype", "auto")
        self.optimizer = configure_optimizer(
            self.model,
            cfg.optimizer,
            cfg.lr,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
            qk_clip_tau=cfg.qk_clip_tau,
            track_max_logit=cfg.log_max_logit,
            muon_dtype=muon_dtype,
        )
        self.step, self.best_val, self.elapsed, self.evaluated_at = 0, float("inf"), 0.0, None
        self.max_logits = None  # [layers, heads] of the last step, when the optimizer asks for them
        if cfg.resume:
            saved = (source.train_config or {}).get("optimizer")
            if saved != cfg.optimizer:
                raise UserError(
                    f"{source.path} was trained with --optimizer={saved}: resume with the same optimizer, "
                    f"or start a new run from its weights with --init_from"
                )
            try:
                state = source.optimizer_state()
                self.optimizer.load_state_dict(
                    sharding.shard_optimizer_state(self.optimizer, state) if cfg.fsdp else state
                )
            except (ValueError, KeyError, RuntimeError) as e:
                raise UserError(
                    f"optimizer state in {source.path} does not fit this model ({e}): use --init_from to "
                    f"start a new run from its weights"
                ) from None
            state = source.trainer_state()
            self.step, self.best_val, self.elapsed = state["step"], state["best_val_loss"], state["elapsed"]
            self.evaluated_at = state.get("evaluated_at")
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
        net = compile_model(self.model) if cfg.compile else self.model
        if run.distributed and not cfg.fsdp:
            net = sharding.data_parallel(net)
        self.net = net
        self.metrics_path = Path(cfg.out_dir) / "metrics.jsonl"
        self.expert_watch = ExpertWatch(
            [i for i, block in enumerate(self.model.blocks()) if isinstance(getattr(block, "mlp", None), MoE)]
        )

    # ---- helpers ----------------------------------------------------------------------------------------------
    def log(self, record):
        if self.run.master:
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(
                    f"could not write {self.metrics_path} ({write_failure(e)}): free some space or make "
                    f"the folder writable, then --resume"
                ) from None

    def evaluate(self):
        """Mean loss per split on eval_iters x batch_size fixed windows: the same tokens at every eval."""
        return {
            split: evaluate(
                self.model,
                self.data,
                split,
                self.cfg.eval_iters * self.cfg.batch_size,
                self.cfg.batch_size,
                self.run.device,
                self.run.autocast,
            )["loss"]
            for split in ("train", "val")
        }

    def save(self):
        # under FSDP every rank takes part in gathering the full state, which rank 0 writes: one checkpoint format
        weights = sharding.full_weights(self.model) if self.cfg.fsdp else None
        optimizer_state = (
            sharding.full_optimizer_state(self.optimizer) if self.cfg.fsdp else self.optimizer.state_dict()
        )
        if not self.run.master:
            return
        checkpoint.save(
            self.cfg.out_dir,
            self.model,
            self.arch,
            self.model_config,
            saved_settings(self.cfg),
            self.cfg.data,
            optimizer_state,
            {
                "step": self.step,
                "best_val_loss": self.best_val,
                "elapsed": self.elapsed,
                "evaluated_at": self.evaluated_at,
                "muon_dtype": self.muon_dtype(),
            },
            weights=weights,
        )

    def muon_dtype(self):
        """The precision Muon's Newton-Schulz runs in ("float32"/"bfloat16"), or "auto" without Muon."""
        muon = [opt for opt in self.optimizer.optimizers if isinstance(opt, Muon)]
        return str(muon[0].ns_dtype)[6:] if muon else "auto"

    def train_step(self):
        """One optimizer step over micro_steps batches; returns the mean loss (a tensor)."""
        cfg, run = self.cfg, self.run
        lr = learning_rate(cfg, self.step, self.elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=run.device)
        record = self.optimizer.needs_max_logits
        max_logits = None
        for micro in range(self.micro_steps):
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, run.rank * self.micro_steps + micro, self.step, 0))
            torch.manual_seed(step_seed(cfg.seed, run.rank * self.micro_steps + micro, self.step, 1))  # dropout
            x, y = (t.to(run.device) for t in self.data.batch("train", cfg.batch_size, gen))
            sync = micro == self.micro_steps - 1 or not run.distributed
            if cfg.fsdp:  # reduce-scatter gradients only after the last micro-batch
                self.net.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or cfg.fsdp else self.net.no_sync(), run.autocast():
                _, loss, *recorded = self.net(x, y, record_max_logits=True) if record else self.net(x, y)
                loss = loss / self.micro_steps  # DDP averages over ranks: the scale of one big batch
            if record:  # the step's max logit per head: the max over its micro-batches
                max_logits = recorded[0] if max_logits is None else torch.maximum(max_logits, recorded[0])
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if run.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if not torch.isfinite(total):
            raise UserError(
                f"loss became {total.item()} at step {self.step}: the last good checkpoint in "
                f"{cfg.out_dir} is kept; lower --lr or raise --warmup_iters and resume or restart"
            )
        for opt in self.optimizer.optimizers:
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP: one value
        self.max_logits = self.optimizer.step(self.scaler, max_logits)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loads = unwrap(self.net).update_expert_bias(cfg.bias_update_gamma)
        return total, grad_norm, lr, loads

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self):
        cfg, run = self.cfg, self.run
        out_dir = Path(cfg.out_dir)
        if run.master:
            out_dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if cfg.resume and self.metrics_path.exists():  # drop what the interrupted run logged past its checkpoint
                kept = [
                    json.dumps(r) for r in read_records(self.metrics_path) if r.get("step", self.step + 1) <= self.step
                ]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        params = self.model.num_params()
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        if run.master:
            print(
                f"{self.arch} {cfg.preset}: {params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M "
                f"active), {tokens_per_step} tokens/step, {cfg.optimizer}, {run.device} {str(run.dtype)[6:]}"
                f"{f', {run.world} processes' if run.distributed else ''}; {self.precisions()}",
                flush=True,
            )
            for note in getattr(self.data, "notes", ()):
                print(f"note: {note}", flush=True)
        stop = StopRequest()
        seconds_bar = "{l_bar}{bar}| {n_fmt}/{total_fmt} s of training [{elapsed}<{remaining}{postfix}]"
        # a bar on a terminal; in a log file (stderr redirected), plain lines at each log record instead
        report = cfg.progress and run.master
        show_bar, show_lines = report and sys.stderr.isatty(), report and not sys.stderr.isatty()
        bar = tqdm(
            total=math.ceil(cfg.max_time_s) or cfg.max_iters,
            initial=self.progress(),
            dynamic_ncols=True,
            disable=not show_bar,
            unit="step",
            bar_format=seconds_bar if cfg.max_time_s else None,
        )
        last_eval, status = None, "finished"
        try:
            self.model.train()
            while not self.done():
                if self.step % cfg.eval_interval == 0 and self.step not in (0, self.evaluated_at):
                    last_eval = self.eval_and_checkpoint(bar)
                t0 = time.perf_counter()
                loss, grad_norm, lr, loads = self.train_step()
                self.expert_watch.add(loads)
                self.step += 1
                dt = time.perf_counter() - t0
                self.elapsed += dt
                stopping = self.sync_clock_and_stop(stop)
                if self.step % cfg.log_interval == 0 or self.done():
                    record = {
                        "step": self.step,
                        "loss": loss.item(),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": self.step * tokens_per_step,
                        "time": self.elapsed,
                        "tok_per_s": tokens_per_step / dt,
                    }
                    if self.max_logits is not None:
                        record["max_logit"] = self.max_logits.max().item()
                    if loads:
                        record["expert_max_over_mean"] = max(s["max_over_mean"] for s in loads)
                        record["dead_experts"] = sum(s["dead_experts"] for s in loads)
                        record["expert_share"] = self.expert_watch.shares_since_log()
                        record["moe_layers"] = self.expert_watch.layer_ids
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_per_s']:.0f}", refresh=False)
                    if show_lines:
                        print(
                            f"step {self.step}: loss {record['loss']:.4f}, lr {lr:.2e}, {record['tok_per_s']:.0f} "
                            f"tokens/s, {self.elapsed:.1f} s",
                            flush=True,
                        )
                bar.update(self.progress() - bar.n)
                if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0:
                    self.save()
                if stopping:
                    status = "interrupted"
                    break
            if status == "finished":
                last_eval = self.eval_and_checkpoint(bar)
            else:
                self.save()
                if run.master:
                    bar.write(f"stopped at step {self.step}: checkpoint saved in {out_dir}; continue with --resume")
        finally:
            bar.close()
            stop.restore()
        summary = {
            "status": status,
            "step": self.step,
            "train_time_s": round(self.elapsed, 1),
            "params_total": params["total"],
            "params_active": params["active"],
            "train_loss": last_eval and last_eval["train"],
            "val_loss": last_eval and last_eval["val"],
            "checkpoint": str(out_dir / checkpoint.NAME),
        }
        if run.master:
            self.log({"summary": summary})
            plot_run(out_dir, cfg.qk_clip_tau if cfg.optimizer == "muonclip" else None)
        return summary

    def precisions(self):
        """The hardware and each machine-dependent choice this run made, e.g. "CPU AVX512 + bf16, 2 threads; expert
        GEMM grouped; Newton-Schulz bfloat16 (measured: ...)"."""
        parts = [describe(self.run.device)]
        if self.arch == "kimi":
            widths = (self.model_config.hidden_size, self.model_config.moe_intermediate_size)
            parts.append(f"expert GEMM {expert_gemm_path(self.run.device, self.run.dtype, widths)}")
        parts += [opt.precision() for opt in self.optimizer.optimizers if isinstance(opt, Muon)]
        return "; ".join(parts)

    def done(self):
        return self.step >= self.cfg.max_iters or 0 < self.cfg.max_time_s <= self.elapsed

    def progress(self):  # what the progress bar counts: whole seconds of a time budget, else steps
        return min(int(self.elapsed), math.ceil(self.cfg.max_time_s)) if self.cfg.max_time_s else self.step

    def sync_clock_and_stop(self, stop):
        """All ranks take the slowest rank's clock (the time budget and lr schedule stay in step across ranks) and
        stop at the same step on a stop request. Returns whether to stop."""
        if not self.run.distributed:
            return stop.requested
        device = self.run.device if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
        state = torch.tensor([self.elapsed, float(stop.requested)], dtype=torch.float64, device=device)
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        self.elapsed, stopping = state.tolist()
        return bool(stopping)

    def eval_and_checkpoint(self, bar):
        losses = self.evaluate()
        self.best_val, self.evaluated_at = min(self.best_val, losses["val"]), self.step
        self.log({"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"], "time": self.elapsed})
        if self.run.master:
            bar.write(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        warning = self.expert_watch.check_at_eval()
        if warning:
            self.log({"step": self.step, "warning": warning})
            if self.run.master:
                bar.write(f"warning: {warning}")
        self.save()
        return losses


class ExpertWatch:
    """Routed-token counts of every MoE layer, summed between log records (for experts.png) and between evals, and
    a warning, once per run, when an expert has received under DEAD_SHARE of its fair share of tokens for
    DEAD_EVALS evals in a row (a dead expert: its bias cannot revive it fast enough, or the router collapsed)."""

    DEAD_SHARE, DEAD_EVALS = 0.1, 3

    def __init__(self, layer_ids):
        self.layer_ids = layer_ids  # the model's layer number of each MoE layer
        self.since_log = self.since_eval = self.streak = None
        self.warned = False

    def add(self, loads):
        """loads: per MoE layer, update_expert_bias's statistics of one step (their "tokens": [E] counts)."""
        if not loads:
            return
        counts = torch.stack([s["tokens"] for s in loads]).float().cpu()  # [moe layers, E]
        self.since_log = counts if self.since_log is None else self.since_log + counts
        self.since_eval = counts if self.since_eval is None else self.since_eval + counts

    @staticmethod
    def shares(counts):
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)

    def shares_since_log(self):
        shares = [[round(x, 5) for x in row] for row in self.shares(self.since_log).tolist()]
        self.since_log = None
        return shares

    def check_at_eval(self):
        """The warning text the first time experts have been starved for DEAD_EVALS evals, else None."""
        if self.since_eval is None:
            return None
        starved = self.shares(self.since_eval) < self.DEAD_SHARE / self.since_eval.shape[-1]
        self.since_eval = None
        self.streak = starved.int() if self.streak is None else (self.streak + 1) * starved
        dead = (self.streak >= self.DEAD_EVALS).nonzero().tolist()
        if not dead or self.warned:
            return None
        self.warned = True
        named = ", ".join(f"layer {self.layer_ids[layer]} expert {expert}" for layer, expert in dead)
        return (
            f"dead experts: {named} received under {self.DEAD_SHARE:g} of a fair share of tokens for "
            f"{self.DEAD_EVALS} evals in a row (see experts.png; a larger --bias_update_gamma rebalances faster)"
        )
