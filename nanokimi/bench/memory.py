"""`nanokimi bench memory`: what each process holds for training (parameters, gradients, optimizer state) and what it
sends per step, in one process, under DDP, FSDP2 and FSDP2 + expert parallelism, each layout run under torchrun with
the real model, optimizer and sharding; then the same quantities projected to Kimi-K2's config (`project`), the
formula checked first against the small case measured here."""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..model import Experts, Kimi
from ..optim import Muon, configure_optimizer, local_part
from ..models import PRESETS, check_fits, make_config
from ..sharding import data_parallel, shard_model
from .report import table, write_section
from .speed import training_step

LAYOUTS = {"1 process": (1, "none"), "DDP x2": (2, "ddp"), "FSDP x2": (2, "fsdp"), "FSDP+EP x2": (2, "fsdp-ep")}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-to-all", "all-reduce")
MiB, GB = 2**20, 1e9


def nbytes(tensor):
    return tensor.numel() * tensor.element_size()


def local_bytes(tensors):
    return sum(nbytes(local_part(t)) for t in tensors)


def expert_parameters(module):
    """The routed experts' parameter stacks inside `module` (a model or one block)."""
    return [p for m in module.modules() if isinstance(m, Experts) for p in m.parameters()]


class CollectiveBytes(TorchDispatchMode):
    """Bytes each collective sends off this rank, counted from the tensors the run hands to c10d (FSDP2's gathers and
    reduce-scatters, the expert dispatch's all-to-alls, Muon's gathers, DDP's and the trainer's all-reduces), as the
    ring algorithms move them per rank: all-gather and reduce-scatter (R-1)/R of the whole tensor, all-reduce twice
    that, all-to-all the rows bound for other ranks. Hand-written: torch's CommDebugMode counts calls, not bytes."""

    def __init__(self, rank, ranks):
        super().__init__()
        self.rank, self.share = rank, (ranks - 1) / ranks
        self.sent = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name == "c10d::_allgather_base_":  # (output, input, ...)
            self.sent["all-gather"] += self.share * nbytes(args[0])
        elif name == "_c10d_functional::all_gather_into_tensor":  # (input, group size, group)
            self.sent["all-gather"] += self.share * nbytes(args[0]) * args[1]
        elif name == "c10d::_reduce_scatter_base_":  # (output, input, ...)
            self.sent["reduce-scatter"] += self.share * nbytes(args[1])
        elif name == "_c10d_functional::reduce_scatter_tensor":  # (input, ...)
            self.sent["reduce-scatter"] += self.share * nbytes(args[0])
        elif name == "c10d::allreduce_":  # (tensors, ...)
            self.sent["all-reduce"] += 2 * self.share * sum(nbytes(t) for t in args[0])
        elif name == "_c10d_functional::all_reduce":
            self.sent["all-reduce"] += 2 * self.share * nbytes(args[0])
        elif name in ("c10d::alltoall_base_", "_c10d_functional::all_to_all_single"):
            tensor, splits = (args[1], args[3]) if name.startswith("c10d::") else (args[0], args[2])
            kept = (
                splits[self.rank] * nbytes(tensor) // max(1, len(tensor))
                if splits
                else (1 - self.share) * nbytes(tensor)
            )  # equal splits: 1/R of it stays
            self.sent["all-to-all"] += nbytes(tensor) - kept
        return func(*args, **(kwargs or {}))


def measure(preset, layout, batch_size, block_size, report):
    """Run in each process: one MuonClip training step, counting what it sends; then write this rank's bytes of state
    and sent bytes to `report`."""
    distributed = layout != "none"
    if distributed:
        dist.init_process_group("gloo")
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = Kimi(make_config("kimi", PRESETS[preset], {"max_position_embeddings": block_size, "dropout": 0.0}))
    net = model
    if layout.startswith("fsdp"):
        shard_model(model, torch.float32, experts_parallel=layout == "fsdp-ep")
    elif layout == "ddp":
        net = data_parallel(model)
    opt = configure_optimizer(model, "muonclip", lr=1e-3)
    x = torch.randint(
        0,
        model.config.vocab_size,
        (batch_size, block_size + 1),  # each rank its own batch
        generator=torch.Generator().manual_seed(rank),
    )
    grads, experts = {}, expert_parameters(model)

    def keep_grads():  # read the gradients before training_step's zero_grad drops them
        grads["bytes"] = local_bytes([p.grad for p in model.parameters() if p.grad is not None])
        grads["experts"] = local_bytes([p.grad for p in experts])

    hook = opt.optimizers[0].register_step_pre_hook(lambda *_: keep_grads())
    counter = CollectiveBytes(rank, ranks)
    with counter:
        training_step(model, opt, x[:, :-1], x[:, 1:], net=net)
    hook.remove()
    state = [v for o in opt.optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    expert_ids = {id(p) for p in experts}
    expert_state = [
        v
        for o in opt.optimizers
        for p, s in o.state.items()
        if id(p) in expert_ids
        for v in s.values()
        if torch.is_tensor(v)
    ]
    result = {
        "params": local_bytes(list(model.parameters())),
        "grads": grads["bytes"],
        "optimizer": local_bytes(state),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "experts": local_bytes(experts) + grads["experts"] + local_bytes(expert_state),
        "sent": dict(counter.sent),
    }
    Path(f"{report}.{rank}").write_text(json.dumps(result))
    if distributed:  # DDP's reducer holds the group: free it, and leave together (gloo's teardown hung otherwise)
        del net, opt
        dist.barrier()
        dist.destroy_process_group()


def parameter_groups(config):
    """Parameter counts of a Kimi config, built on the meta device: routed experts, those inside blocks (the FSDP
    units), Muon's 2-D matrices (gathered whole by Muon under FSDP), AdamW's, and the largest block."""
    with torch.device("meta"):
        model = Kimi(config)
        opt = configure_optimizer(model, "muonclip", muon_dtype="float32")  # forced: no timing on meta tensors
    muon = [p for o in opt.optimizers if isinstance(o, Muon) for g in o.param_groups for p in g["params"]]
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "experts": sum(p.numel() for p in expert_parameters(model)),
        "blocks": sum(p.numel() for b in model.blocks() for p in b.parameters()),
        "muon_2d": sum(p.numel() for p in muon if p.ndim == 2),
        "adamw": sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in muon),
        "largest_block": max(sum(p.numel() for p in b.parameters()) for b in model.blocks()),
        "largest_block_experts": max(sum(p.numel() for p in expert_parameters(b)) for b in model.blocks()),
        "moe_layers": len(model.moe_layers()),
    }


def project(config, n, ranks, tokens, expert_parallel, gather_bytes=2, token_bytes=2):
    """For `config` and its `parameter_groups` `n`:
    per rank and training step of `tokens` tokens per rank, under FSDP2 over `ranks` ranks with or without expert
    parallelism: training state bytes (fp32 parameters and gradients, Muon's momentum, AdamW's two moments), the
    parameters a rank holds gathered at its peak (the block computing and the one prefetched, in the compute dtype:
    `gather_bytes` each), and the bytes each collective sends, as CollectiveBytes counts them. Assumes routing
    spreads token-slots evenly over the experts (so (R-1)/R of them leave their rank) and leaves out the all-reduces
    of statistics (a few KiB)."""
    share = (ranks - 1) / ranks
    fsdp = n["total"] - n["experts"] * expert_parallel  # the parameters FSDP shards, gathers and reduce-scatters
    fsdp_blocks = n["blocks"] - n["experts"] * expert_parallel
    largest = n["largest_block"] - n["largest_block_experts"] * expert_parallel
    dispatch = 4 * n["moe_layers"] * tokens * config.num_experts_per_tok * config.hidden_size * token_bytes * share
    return {
        "state": ((4 + 4) * n["total"] + 4 * (n["total"] - n["adamw"]) + 8 * n["adamw"]) / ranks,
        "gathered": 2 * largest * gather_bytes,
        # forward gathers everything, backward the blocks again (the root stays gathered); Muon gathers its 2-D
        # matrices in fp32; gradients reduce in fp32; tokens go out and back in forward and again in backward
        "all-gather": share * (gather_bytes * (fsdp + fsdp_blocks) + 4 * n["muon_2d"]),
        "reduce-scatter": share * 4 * fsdp,
        "all-to-all": dispatch if expert_parallel else 0.0,
    }


def run_layout(command, reports, name, timeout_s, env, grace_s=60):
    """Run one layout's processes until they exit, within timeout_s. Once every rank has written its report the
    measurement is complete: a process still alive grace_s later (a DDP worker hung in gloo's teardown about once in
    twenty runs here, asleep after its peer had exited) is ended instead of failing the benchmark."""
    log = Path(f"{reports[0]}.stderr")  # a file, not a pipe: a full pipe would stall a chatty process
    with (
        open(log, "w") as stderr,
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True) as proc,
    ):
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
    rows, traffic, measured = [], [], {}
    config = make_config("kimi", PRESETS[args.preset], {})
    check_fits(
        "kimi",
        config,
        "cpu",
        args.batch_size * args.block_size,
        context=f"--preset={args.preset}",
        fix="pick a smaller --preset, --batch_size or --block_size",
    )
    groups = parameter_groups(config)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (procs, layout) in LAYOUTS.items():
            report = Path(tmp) / layout
            worker = ["nanokimi.bench.memory", args.preset, layout, str(args.batch_size), str(args.block_size)]
            launch = ["torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={args.port}", "-m"]
            command = [sys.executable, "-m", *(launch if procs > 1 else []), *worker, str(report)]
            reports = [Path(f"{report}.{r}") for r in range(procs)]
            run_layout(
                command,
                reports,
                name,
                args.timeout_s,
                os.environ | {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // procs))},
            )
            ranks = [json.loads(r.read_text()) for r in reports]
            worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
            measured[name] = worst | {
                "state": worst["params"] + worst["grads"] + worst["optimizer"],
                "experts": max(r["experts"] for r in ranks),
                "sent": {k: max(r["sent"].get(k, 0.0) for r in ranks) for k in COLLECTIVES},
            }
            m = measured[name]
            rows.append(
                [
                    name,
                    *(f"{m[k] / MiB:.2f}" for k in ("params", "grads", "optimizer", "state", "experts")),
                    f"{max(r['peak_rss'] for r in ranks) / MiB:.0f}",
                ]
            )
            traffic.append([name, "measured", *(f"{m['sent'][k] / MiB:.3f}" for k in COLLECTIVES)])
            if layout.startswith("fsdp"):
                formula = project(
                    config,
                    groups,
                    procs,
                    args.batch_size * args.block_size,
                    layout == "fsdp-ep",
                    gather_bytes=4,
                    token_bytes=4,
                )
                traffic.append(
                    [name, "formula (`project`)", *(f"{formula[k] / MiB:.3f}" for k in COLLECTIVES[:3]), "-"]
                )
    params = groups["total"]
    one, ep = measured["1 process"], measured["FSDP+EP x2"]
    body = (
        f"`{args.preset}` ({params / 1e6:.1f}M parameters), fp32, MuonClip, one training step of "
        f"{args.batch_size}x{args.block_size} tokens per rank on CPU (gloo); MiB held or sent by the rank that "
        f"holds or sends the most. Routed experts = their parameters, gradients and optimizer state. Peak RSS is "
        f"the whole process (torch itself, activations, communication buffers) for scale.\n\n"
        + table(
            [
                "layout",
                "parameters",
                "gradients",
                "optimizer state",
                "state per rank",
                "routed experts",
                "peak RSS MiB",
            ],
            rows,
        )
        + "\n\nMiB sent per rank in the step, by collective (counted from the tensors handed to c10d, as ring "
        "algorithms move them: all-gather and reduce-scatter (R-1)/R of the tensor, all-reduce twice that, "
        "all-to-all the rows bound for other ranks); the formula rows are `project` for this model, the "
        "check of the Kimi-K2 projection below (all-to-all assumes even routing; the measured step's routing "
        "is what a random-init model does):\n\n"
        + table(["layout", "source", *COLLECTIVES], traffic)
        + f"\n\nGoals: FSDP x2 per-rank state <= 0.55x of DDP's: measured "
        f"{measured['FSDP x2']['state'] / measured['DDP x2']['state']:.2f}x; routed-expert state per rank under "
        f"FSDP+EP x2 = 1/2 of one process's: measured {ep['experts'] / one['experts']:.2f}x.\n\n"
        + k2_projection(args.k2_tokens)
    )
    print(body)
    write_section(args.report, "memory", body, args.command)


def k2_projection(tokens, rank_counts=(64, 256, 1024)):
    """The Kimi-K2 table: `project` at each rank count, FSDP only vs FSDP + EP."""
    config = PRESETS["kimi-k2"]
    groups, rows = parameter_groups(config), []
    for ranks in rank_counts:
        for expert_parallel in (False, True):
            p = project(config, groups, ranks, tokens, expert_parallel)
            rows.append(
                [
                    str(ranks),
                    "FSDP+EP" if expert_parallel else "FSDP",
                    f"{p['state'] / GB:.1f}",
                    f"{p['gathered'] / GB:.1f}",
                    *(f"{p[k] / GB:.1f}" for k in COLLECTIVES[:3]),
                ]
            )
    return (
        f"Projected to `kimi-k2` ({groups['total'] / 1e12:.3f}T parameters, 61 layers, 384 experts of which 8 "
        f"per token; EP degree = the ranks, as `--fsdp --ep` does), per rank per step of {tokens} tokens per "
        f"rank: bf16 compute and gathers, fp32 master weights, gradients and reduce-scatters, MuonClip state, "
        f"even routing; GB. 'gathered' = the parameters a rank holds whole at its peak (the block computing and "
        f"the prefetched one), on top of its state.\n\n"
        + table(["ranks", "layout", "state per rank", "gathered", "all-gather", "reduce-scatter", "all-to-all"], rows)
    )


if __name__ == "__main__":
    measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
