"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=R`: the expert-parallel MoE against one process.

Every rank builds the same tiny Kimi model; rank r runs batch r through an expert-parallel copy (sharding.
expert_parallel) while each rank also runs all R batches through the plain model. The losses, the gradients of the
routed experts (gathered), of the dense parameters (averaged over ranks) and the expert loads must match the plain
model's. The routing is forced by the expert bias, for each of: "random" (uneven splits), "owner-0" (every token picks
the experts of rank 0: the other ranks receive none) and "idle-expert" (the last expert gets no token)."""

import copy
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from nanokimi.model import Kimi
from nanokimi.processes import exit_worker
from nanokimi.sharding import expert_parallel
from tests.conftest import tiny_config


def check(routing, rank, ranks):
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=2 * ranks, num_experts_per_tok=2, dropout=0.0)
    model = Kimi(config)
    for moe in model.moe_layers():
        bias = moe.gate.e_score_correction_bias
        if routing == "random":
            bias.normal_(0, 0.05)
        elif routing == "owner-0":
            bias[:2] = 10.0  # experts 0 and 1, both rank 0's
        else:
            bias[-1] = -10.0
    parallel = copy.deepcopy(model)
    owned = expert_parallel(parallel, init_device_mesh("cpu", (ranks,)))
    idx = torch.randint(0, config.vocab_size, (ranks, 3, 16))

    losses = [model(idx[r, :, :-1], idx[r, :, 1:])[1] for r in range(ranks)]
    (sum(losses) / ranks).backward()
    loss = parallel(idx[rank, :, :-1], idx[rank, :, 1:])[1]
    loss.backward()
    assert torch.allclose(loss, losses[rank], atol=1e-6), (loss.item(), losses[rank].item())
    worst = 0.0
    for (name, p), ref in zip(parallel.named_parameters(), model.parameters()):
        if p in owned:
            assert isinstance(p.grad, DTensor), name
            grad = p.grad.full_tensor()
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)
        torch.testing.assert_close(grad, ref.grad, atol=1e-6, rtol=1e-5, msg=lambda text: f"{name}: {text}")
        worst = max(worst, (grad - ref.grad).abs().max().item())
    load = sum(m.tokens_per_expert for m in model.moe_layers())  # routed slots per expert, all R batches
    parallel_load = sum(m.tokens_per_expert for m in parallel.moe_layers())
    dist.all_reduce(parallel_load)
    assert torch.equal(load, parallel_load), (load, parallel_load)  # the same routing
    assert routing != "owner-0" or load[2:].sum() == 0 and load[:2].min() > 0  # the other ranks received nothing
    assert routing != "idle-expert" or load[-1] == 0 and load[:-1].min() > 0
    if rank == 0:
        print(f"ok {routing} ranks={ranks} max_grad_diff={worst:.2e} load={load.tolist()}")


dist.init_process_group("gloo")
for routing in ("random", "owner-0", "idle-expert"):
    check(routing, dist.get_rank(), dist.get_world_size())
dist.barrier()  # the ranks leave together, as processes.Run.close: none tears down its connections under a peer's feet
dist.destroy_process_group()
exit_worker()  # as `nanokimi train` under torchrun: no C++ destructors at exit (processes.exit_worker)
