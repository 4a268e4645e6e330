"""DDP under torchrun with 2 gloo processes (tests/ddp_worker.py): identical weights on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_MODEL, TINY_TRAIN, metrics, step_losses, train

pytestmark = pytest.mark.slow


def run_ddp(cfg, model, port):
    """Train `cfg` under torchrun with 2 processes (tests/ddp_worker.py); returns its check of the ranks' weights."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", str(ROOT / "tests" / "ddp_worker.py"), json.dumps(cfg),
                             json.dumps(model)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(cfg["out_dir"]) / "ddp_check.json").read_text())


DDP_TRAIN = TINY_TRAIN | {"grad_accum": 2, "eval_interval": 100, "lr": 1e-2}


def test_ddp_two_processes_agree_and_learn(char_data, tmp_path):
    out = tmp_path / "ddp"
    cfg = {"data": str(char_data), "out_dir": str(out), "max_iters": 12, **DDP_TRAIN}
    check = run_ddp(cfg, TINY_MODEL, 29533)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    ddp = step_losses(out)
    assert ddp[12] < ddp[1] - 0.3
    # one process with the same global batch (grad_accum 2) sees the same batches: same loss scale
    train(char_data, tmp_path / "single", *[f"--{k}={v}" for k, v in cfg.items() if k not in ("data", "out_dir")])
    assert step_losses(tmp_path / "single")[1] == pytest.approx(ddp[1], abs=1e-5)


def test_ddp_time_budget_keeps_ranks_in_step(char_data, tmp_path):
    """Each rank's own clock would end the run (and set the lr) at a different step: they share the slowest one."""
    cfg = {"data": str(char_data), "out_dir": str(tmp_path / "ddp"), "max_iters": 100000, "max_time_s": 2.0,
           **DDP_TRAIN}
    check = run_ddp(cfg, TINY_MODEL, 29534)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    assert metrics(tmp_path / "ddp")[-1]["summary"]["status"] == "finished"
