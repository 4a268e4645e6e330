"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: trains with the real Trainer (DDP, or FSDP2
with "fsdp": true), then compares every rank's final weights and expert biases with rank 0's and writes the largest
difference to OUT_DIR/ddp_check.json, and each rank's Newton-Schulz precision to OUT_DIR/muon_dtype.RANK."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanokimi.config import TrainConfig
from nanokimi.processes import Run, exit_worker
from nanokimi.train import Trainer

skew = float(os.environ.get("RANK1_CLOCK_SKEW", "1"))
if skew != 1 and os.environ["RANK"] == "1":  # this rank's clock runs `skew` times as fast: the time budget is shared
    real_clock, start = time.perf_counter, time.perf_counter()
    time.perf_counter = lambda: start + (real_clock() - start) * skew
if os.environ.get("RANK1_OTHER_PRECISION") == "1" and os.environ["RANK"] == "1":  # rank 1 alone would pick the
    import nanokimi.optim  # other Newton-Schulz precision: it must take rank 0's

    natural = nanokimi.optim.native_bf16_matmul
    nanokimi.optim.native_bf16_matmul = lambda device: not natural(device)
cfg, overrides = TrainConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2])
run = Run(cfg)
trainer = Trainer(cfg, overrides, run)
trainer.fit()
state = torch.cat(
    [
        (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().flatten()
        for t in trainer.model.state_dict().values()
    ]
)  # FSDP: every rank gathers the whole
gathered = [torch.zeros_like(state) for _ in range(run.world)]
dist.all_gather(gathered, state)
if run.master:
    with open(f"{cfg.out_dir}/ddp_check.json", "w") as f:
        json.dump({"world": run.world, "max_diff": max((g - gathered[0]).abs().max().item() for g in gathered)}, f)
with open(f"{cfg.out_dir}/muon_dtype.{run.rank}", "w") as f:
    f.write(trainer.muon_dtype())
del trainer  # its DDP wrapper holds the process group: free it before the group goes, as `nanokimi train` does
run.close(finished=True)
exit_worker()  # as `nanokimi train` under torchrun: no C++ destructors at exit (processes.exit_worker)
