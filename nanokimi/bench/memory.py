"""`nanokimi bench memory`: what each process holds for training (parameters, gradients, optimizer state) in one
process, under DDP and under FSDP2, each layout run under torchrun with the real model, optimizer and sharding."""

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import Kimi
from ..optim import configure_optimizer, local_part
from ..presets import PRESETS, make_config
from ..sharding import data_parallel, shard_model
from .report import table, write_section
from .speed import training_step

LAYOUTS = {"1 process": (1, "none"), "DDP x2": (2, "ddp"), "FSDP x2": (2, "fsdp")}


def local_bytes(tensors):
    return sum(local_part(t).numel() * t.element_size() for t in tensors)


def measure(preset, layout, batch_size, block_size, report):
    """Run in each process: one MuonClip training step, then write this rank's bytes of state to `report`."""
    distributed = layout != "none"
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Kimi(make_config("kimi", PRESETS[preset], {"max_position_embeddings": block_size, "dropout": 0.0}))
    net = model
    if layout == "fsdp":
        shard_model(model, torch.float32)
    elif layout == "ddp":
        net = data_parallel(model)
    opt = configure_optimizer(model, "muonclip", lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (batch_size, block_size + 1))
    grads = {}

    def keep_grads():  # read the gradients before training_step's zero_grad drops them
        grads["bytes"] = local_bytes([p.grad for p in model.parameters() if p.grad is not None])
    hook = opt.optimizers[0].register_step_pre_hook(lambda *_: keep_grads())
    training_step(model, opt, x[:, :-1], x[:, 1:], net=net)
    hook.remove()
    state = [v for o in opt.optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    rank = dist.get_rank() if distributed else 0
    result = {"params": local_bytes(list(model.parameters())), "grads": grads["bytes"],
              "optimizer": local_bytes(state), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(f"{report}.{rank}").write_text(json.dumps(result))
    if distributed:
        dist.destroy_process_group()


def bench_memory(args):
    rows, state = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (procs, layout) in LAYOUTS.items():
            report = Path(tmp) / layout
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                       f"--master_port={args.port}", "-m", "nanokimi.bench.memory", args.preset, layout,
                       str(args.batch_size), str(args.block_size), str(report)] if procs > 1 else \
                [sys.executable, "-m", "nanokimi.bench.memory", args.preset, layout, str(args.batch_size),
                 str(args.block_size), str(report)]
            try:  # bounded: a DDP worker hung once in ~20 runs here (cause not found); it must not hang CI
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, env=os.environ
                                      | {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // procs))})
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{name} did not finish within {args.timeout_s} s: rerun the benchmark") from None
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(procs)]
            worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
            state[name] = worst["params"] + worst["grads"] + worst["optimizer"]
            rows.append([name, *(f"{worst[k] / 2 ** 20:.1f}" for k in ("params", "grads", "optimizer")),
                         f"{state[name] / 2 ** 20:.1f}", f"{max(r['peak_rss'] for r in ranks) / 2 ** 20:.0f}"])
    with torch.device("meta"):  # counted, not allocated
        params = sum(p.numel() for p in Kimi(make_config("kimi", PRESETS[args.preset], {})).parameters())
    body = (f"`{args.preset}` ({params / 1e6:.1f}M parameters), fp32, "
            f"MuonClip, after one training step of {args.batch_size}x{args.block_size} tokens on CPU (gloo); "
            f"MiB held by the rank that holds the most. Peak RSS is the whole process (torch itself, activations, "
            f"communication buffers) for scale.\n\n"
            + table(["layout", "parameters", "gradients", "optimizer state", "state per rank", "peak RSS MiB"], rows)
            + f"\n\nGoal: FSDP x2 per-rank state <= 0.55x of DDP's: measured "
              f"{state['FSDP x2'] / state['DDP x2']:.2f}x.")
    print(body)
    write_section(args.report, "memory", body, args.command)


if __name__ == "__main__":
    measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
