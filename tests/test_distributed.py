"""DDP and FSDP2 under torchrun with 2 gloo processes (tests/ddp_worker.py): identical weights on every rank (DDP),
the same training as one process (FSDP), and checkpoints that move between layouts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanokimi.cli import main
from nanokimi import checkpoint
from tests.conftest import (
    NANOKIMI,
    ROOT,
    TINY,
    TINY_MODEL,
    TINY_TRAIN,
    assert_same_training,
    free_port,
    metrics,
    step_losses,
    train,
    train_args,
    wait_for_steps,
)

pytestmark = pytest.mark.slow


def torchrun_env(**extra):
    """The workers' environment: one thread each (the two cores are shared), and Python's fault handler, so that a
    worker that aborts (gloo's "terminate called without an active exception") prints where each thread was."""
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"} | extra


def torchrun(procs):
    """The torchrun command line of `procs` local workers, on a port free now."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={free_port()}"]


def run_ddp(cfg, model, procs=2, clock_skew=1.0, timeout=600, rank1_other_precision=False):
    """Train `cfg` under torchrun with `procs` processes (tests/ddp_worker.py); returns its check of the ranks'
    weights. clock_skew: rank 1's clock runs that many times as fast as the others'; rank1_other_precision: rank 1
    alone would choose the other Newton-Schulz precision."""
    env = torchrun_env(RANK1_CLOCK_SKEW=str(clock_skew), RANK1_OTHER_PRECISION=str(int(rank1_other_precision)))
    # no retry: gloo's abort at exit ("terminate called without an active exception") came from a worker that left
    # without destroying its process group, or while a peer was still in a collective; every worker now leaves as
    # processes.Run.close does (a barrier, then destroy_process_group)
    result = subprocess.run(
        [
            *torchrun(procs),
            str(ROOT / "tests" / "ddp_worker.py"),
            json.dumps(cfg),
            json.dumps(model),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[:3000]  # the workers' errors come first, torchrun's summary last
    return json.loads((Path(cfg["out_dir"]) / "ddp_check.json").read_text())


# Newton-Schulz precision fixed: measured per process, a loaded machine could pick differently in the runs compared
DDP_TRAIN = TINY_TRAIN | {"grad_accum": 2, "eval_interval": 100, "lr": 1e-2, "muon_dtype": "float32"}


def test_ddp_two_processes_agree_and_learn(char_data, tmp_path):
    out = tmp_path / "ddp"
    cfg = {"data": str(char_data), "out_dir": str(out), "max_iters": 12, **DDP_TRAIN}
    check = run_ddp(cfg, TINY_MODEL)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    ddp = step_losses(out)
    assert ddp[12] < ddp[1] - 0.3
    # one process with the same global batch (grad_accum 2) sees the same batches: the same losses at every step,
    # the updates included (a gradient not averaged over the ranks would part them from step 2 on)
    train(char_data, tmp_path / "single", *[f"--{k}={v}" for k, v in cfg.items() if k not in ("data", "out_dir")])
    assert_same_training(out, tmp_path / "single")


def test_ddp_time_budget_keeps_ranks_in_step(char_data, tmp_path):
    """Each rank's own clock would end the run (and set the lr) at a different step: they share the furthest one.
    Rank 1's clock runs 4x fast here: on its own it would stop at a quarter of the budget and leave rank 0 waiting in
    a collective (a hang, ended by the timeout); shared, both stop at the same step, with the same weights, when rank
    1's clock says the budget is spent."""
    cfg = {
        "data": str(char_data),
        "out_dir": str(tmp_path / "ddp"),
        "max_iters": 100000,
        "max_time_s": 4.0,
        **DDP_TRAIN,
    }
    started = time.perf_counter()
    check = run_ddp(cfg, TINY_MODEL, clock_skew=4.0, timeout=120)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    summary = metrics(tmp_path / "ddp")[-1]["summary"]
    assert summary["status"] == "finished" and summary["train_time_s"] >= 4.0
    assert time.perf_counter() - started < 4.0 + 30  # the run's 1 s of training, torchrun's start and the evaluations


def test_every_rank_takes_rank_0s_newton_schulz_precision(char_data, tmp_path):
    """docs/training.md: muon_dtype=auto is chosen by rank 0 for every rank. Rank 1 here would choose the other
    precision on its own; it takes rank 0's, and the ranks' weights stay identical."""
    from nanokimi.hardware import native_bf16_matmul

    out = tmp_path / "ddp"
    cfg = {"data": str(char_data), "out_dir": str(out), "max_iters": 3, **DDP_TRAIN, "muon_dtype": "auto"}
    check = run_ddp(cfg, TINY_MODEL, rank1_other_precision=True)
    rank0 = "bfloat16" if native_bf16_matmul("cpu") else "float32"
    assert [(out / f"muon_dtype.{r}").read_text() for r in (0, 1)] == [rank0, rank0]
    assert check["max_diff"] == 0.0


def test_sigterm_to_nanokimi_torchrun_saves_and_exits_143(char_data, tmp_path):
    """docs/distributed.md: a scheduler's SIGTERM to the launcher ends the run as Ctrl-C does, with 128 + 15."""
    out = tmp_path / "run"
    proc = start_endless_torchrun(char_data, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM): the workers saved")
    assert checkpoint.Checkpoint(out).trainer_state()["step"] >= 3 and "continue with --resume" in stdout


def max_logits(out_dir):
    return {r["step"]: r["max_logit"] for r in metrics(out_dir) if "max_logit" in r}


@pytest.mark.parametrize("procs", [2, 4])
def test_expert_parallel_layer_matches_one_process(procs):
    """tests/ep_worker.py: the all-to-all dispatch gives one process's losses, gradients (experts and dense) and expert
    loads, with uneven splits, ranks that receive no token, and an expert with none."""
    result = subprocess.run(
        [
            *torchrun(procs),
            "-m",
            "tests.ep_worker",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=torchrun_env(),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    assert all(f"ok {routing} ranks={procs}" in result.stdout for routing in ("random", "owner-0", "idle-expert"))


def expert_shares(out_dir):
    return {r["step"]: r["expert_share"] for r in metrics(out_dir) if "expert_share" in r}


@pytest.mark.parametrize("layout", ["fsdp", "fsdp-ep"])
def test_sharded_training_matches_one_process_and_checkpoints_move_between_layouts(layout, char_data, tmp_path, capsys):
    """--fsdp, and --fsdp --ep (2 experts per process), over 2 processes: one process's losses, QK-Clip decisions
    and expert loads; the checkpoint samples and resumes in one process, and one process's resumes in the layout."""
    # tau low enough that QK-Clip rescales heads from the first steps on: the clip decisions are compared too
    # (the schedule is planned for 24 steps, so that the runs resumed from step 20 to 24 follow the straight run's)
    cfg = {"data": str(char_data), "max_iters": 20, "lr_decay_iters": 24, "qk_clip_tau": 0.05, **DDP_TRAIN}
    sharded = {"fsdp": True, "ep": layout == "fsdp-ep"}
    flags = [f"--{k}={v}" for k, v in cfg.items() if k != "data"]
    check = run_ddp(cfg | {"out_dir": str(tmp_path / layout)} | sharded, TINY_MODEL)
    assert check["world"] == 2 and check["max_diff"] == 0.0  # every rank gathers the same full model
    train(char_data, tmp_path / "single", *flags)
    assert_same_training(tmp_path / layout, tmp_path / "single")
    single_logits, parallel_logits = max_logits(tmp_path / "single"), max_logits(tmp_path / layout)
    assert sum(v > cfg["qk_clip_tau"] for v in single_logits.values()) >= 5  # QK-Clip fired on these steps
    # the same clips; the runs part by float summation order, and a gap grows with steps as training amplifies it:
    # at step 20 the max logits differ by up to 2.3e-3 (per-parameter AdamW) or 6.0e-3 (fused AdamW) relative
    assert all(
        (parallel_logits[s] > cfg["qk_clip_tau"]) == (v > cfg["qk_clip_tau"])
        and parallel_logits[s] == pytest.approx(v, rel=1e-2)
        for s, v in single_logits.items()
    )
    single_shares, parallel_shares = expert_shares(tmp_path / "single"), expert_shares(tmp_path / layout)
    assert parallel_shares.keys() == single_shares.keys()
    assert all(sum(parallel_shares[s], []) == pytest.approx(sum(v, []), abs=1e-2) for s, v in single_shares.items())
    # the checkpoint is the one format: it samples in one process and resumes there
    capsys.readouterr()
    main(["sample", str(tmp_path / layout), "--max_new_tokens=20"])
    assert len(capsys.readouterr().out) > 20
    for name in (layout, "single"):
        shutil.copytree(tmp_path / name, tmp_path / f"{name}-resumed")
    train(char_data, tmp_path / f"{layout}-resumed", "--resume", "--max_iters=24")
    # ... and a single-process checkpoint resumes in the layout, with its optimizer state cut into shards
    run_ddp(cfg | {"out_dir": str(tmp_path / "single-resumed"), "resume": True, "max_iters": 24} | sharded, TINY_MODEL)
    train(char_data, tmp_path / "straight", *flags, "--max_iters=24")
    straight = step_losses(tmp_path / "straight")
    for name in (f"{layout}-resumed", "single-resumed"):
        resumed = step_losses(tmp_path / name)
        assert sorted(resumed) == list(range(1, 25))
        assert all(resumed[s] == pytest.approx(straight[s], rel=2e-3) for s in range(21, 25)), name


def test_fsdp_ep_over_four_processes_trains_as_one_process(char_data, tmp_path):
    """4 processes, one expert each (the tiny model's 4), 4 micro-batches: one process's losses."""
    cfg = {"data": str(char_data), "max_iters": 10, **DDP_TRAIN, "grad_accum": 4}
    run_ddp(cfg | {"out_dir": str(tmp_path / "ep"), "fsdp": True, "ep": True}, TINY_MODEL, procs=4)
    train(char_data, tmp_path / "single", *[f"--{k}={v}" for k, v in cfg.items() if k != "data"])
    assert_same_training(tmp_path / "ep", tmp_path / "single")


def test_fsdp_under_compile_trains_as_eager_fsdp(char_data, tmp_path):
    """--fsdp --compile: torch.compile over FSDP2's sharded blocks gives the eager FSDP run's losses."""
    cfg = {"data": str(char_data), "max_iters": 4, "fsdp": True, **DDP_TRAIN}
    run_ddp(cfg | {"out_dir": str(tmp_path / "eager")}, TINY_MODEL)
    check = run_ddp(cfg | {"out_dir": str(tmp_path / "compiled"), "compile": True}, TINY_MODEL)
    assert check["world"] == 2 and check["max_diff"] == 0.0
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert compiled.keys() == eager.keys() == {1, 2, 3, 4}
    assert all(compiled[s] == pytest.approx(eager[s], rel=1e-4) for s in eager)


def start_endless_torchrun(data, out):
    """`nanokimi torchrun` of 2 workers training until stopped, in a session of its own (as a terminal's job),
    once it has logged 3 steps."""
    proc = subprocess.Popen(
        [
            *NANOKIMI,
            "torchrun",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *train_args(data, out),
            "--grad_accum=2",
            "--max_iters=100000",
            "--eval_interval=100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=torchrun_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    wait_for_steps(proc, out, 3)
    return proc


def test_torchrun_command_ends_in_one_line(char_data, tmp_path):
    """`nanokimi torchrun ... train`: a Ctrl-C (SIGINT to the terminal's whole process group) saves the run and ends
    with one line and exit 130; a worker's error ends with the worker's line and torchrun's, no traceback."""
    out = tmp_path / "run"
    env = torchrun_env()
    proc = start_endless_torchrun(char_data, out)
    second = subprocess.run(
        [
            *NANOKIMI,
            "torchrun",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "train",
            "shakespeare-char-cpu",
            *TINY,
            f"--data={char_data}",
            f"--out_dir={out}",
            "--grad_accum=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr  # the lock: every rank says so
    assert "another nanokimi run is training in" in second.stderr and "rank 0 could not take" in second.stderr
    assert "lost its connection" not in second.stderr, second.stderr
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted (SIGINT): the workers saved")
    assert checkpoint.Checkpoint(out).trainer_state()["step"] >= 3 and "continue with --resume" in stdout
    bad = [
        (["shakespeare-char-cpu", "--grad_accum=3"], "grad_accum (3) must be divisible by the number of processes (2)"),
        (
            ["shakespeare-char-cpu", *TINY, "--n_routed_experts=3", "--grad_accum=2", "--fsdp", "--ep"],
            "a process count that divides 3",
        ),
        (["shakespeare-char-cpu", "--grad_accum=2", "--ep"], "add --fsdp"),
        (["gpt-shakespeare-char-cpu", "--grad_accum=2", "--fsdp", "--ep"], "has none: drop --ep"),
    ]
    for args, expected in bad:
        failed = subprocess.run(
            [
                *NANOKIMI,
                "torchrun",
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                "train",
                *args,
                f"--data={char_data}",
                f"--out_dir={tmp_path / 'odd'}",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        assert expected in failed.stderr, failed.stderr
        assert failed.stderr.strip().splitlines()[-1].startswith("error: worker rank")


def test_a_killed_worker_is_named_without_tracebacks(char_data, tmp_path):
    """kill -9 of one worker (as the OOM killer does): torchrun ends in one line naming the killed rank and its
    signal, and the survivor's lost connection is its own one line, not a gloo traceback."""
    proc = start_endless_torchrun(char_data, tmp_path / "run")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker rank ") and "was killed by SIGKILL" in last, last


def test_a_kimi_linear_hybrid_trains_under_fsdp_and_expert_parallel_as_one_process(char_data, tmp_path):
    """KDA layers beside MLA under --fsdp --ep over 2 processes: one process's losses."""
    from tests.test_kda import HYBRID, HYBRID_FLAGS

    cfg = {"data": str(char_data), "max_iters": 8, **DDP_TRAIN}
    run_ddp(cfg | {"out_dir": str(tmp_path / "ep"), "fsdp": True, "ep": True}, TINY_MODEL | HYBRID)
    train(char_data, tmp_path / "single", *[f"--{k}={v}" for k, v in cfg.items() if k != "data"], *HYBRID_FLAGS)
    assert_same_training(tmp_path / "ep", tmp_path / "single")
