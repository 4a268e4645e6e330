"""`nanokimi bench memory`: what each process holds for training (parameters, gradients, optimizer state) in one
process, under DDP and under FSDP2, each layout run under torchrun with the real model, optimizer and sharding."""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
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
    if distributed:  # DDP's reducer holds the group: free it, and leave together (gloo's teardown hung otherwise)
        del net, opt
        dist.barrier()
        dist.destroy_process_group()


def run_layout(command, reports, name, timeout_s, env, grace_s=60):
    """Run one layout's processes until they exit, within timeout_s. Once every rank has written its report the
    measurement is complete: a process still alive grace_s later (a DDP worker hung in gloo's teardown about once in
    twenty runs here, asleep after its peer had exited) is ended instead of failing the benchmark."""
    log = Path(f"{reports[0]}.stderr")  # a file, not a pipe: a full pipe would stall a chatty process
    with open(log, "w") as stderr, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                                    start_new_session=True) as proc:
        deadline, reported_at = time.monotonic() + timeout_s, None
        while proc.poll() is None and time.monotonic() < deadline:
            if reported_at is None and all(r.is_file() for r in reports):
                reported_at = time.monotonic()
            if reported_at is not None and time.monotonic() > reported_at + grace_s:
                break
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if reported_at is None:
                raise RuntimeError(f"{name} did not finish within {timeout_s} s: rerun the benchmark")
        elif proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{log.read_text()[-3000:]}")


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
            reports = [Path(f"{report}.{r}") for r in range(procs)]
            run_layout(command, reports, name, args.timeout_s,
                       os.environ | {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // procs))})
            ranks = [json.loads(r.read_text()) for r in reports]
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
