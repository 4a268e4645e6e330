"""The parallel layouts under torchrun, applied from outside the model: DDP (`data_parallel`), FSDP2 (`--fsdp`:
PyTorch's `fully_shard` per transformer block and on the root) and expert parallelism (`--fsdp --ep`), and the
checkpoint side of them: full weights and optimizer state gathered for rank 0 to save in the one checkpoint format,
and full state read back into shards on resume.

How the work and communication are split (see also optim.Muon):
- parameters, gradients and optimizer state are sharded along dim 0 over the ranks; each block's parameters are
  all-gathered for its forward and backward and its gradients reduce-scattered (FSDP2 itself);
- Muon: the routed experts' [E, out, in] stacks are sharded along E, so each rank orthogonalises the whole experts
  it holds, with no communication; every 2-D matrix (attention, dense and shared FFN, router) is all-gathered one
  shape group at a time and orthogonalised on every rank, which keeps its own rows (redundant but small work: the
  experts are most of Muon's FLOPs);
- QK-Clip: the per-head max logits are all-reduced (as under DDP) and each rank rescales the q/k rows it holds;
- the aux-loss-free expert bias is a buffer, not sharded: every rank updates it from all-reduced loads.

Expert parallelism (`--fsdp --ep`): each rank owns n_routed_experts / ranks whole experts, which FSDP leaves alone;
tokens travel to their experts' ranks and back (`expert_parallel`), so no rank ever gathers another's experts."""

import inspect

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor


def data_parallel(net):
    """DDP, the replicated layout. Every rank updates the expert bias identically from all-reduced loads and counts
    its own tokens per expert, so no buffer is synced at forward (torch >= 2.13 names that forward_sync_buffers,
    deprecating the old name)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    )
    return ddp(net, **{no_sync: False})


def shard_model(model, dtype, experts_parallel=False):
    """fully_shard every block, then the root (embeddings, final norm, head). Under bf16/fp16 the gathered parameters
    compute in `dtype` and gradients reduce in fp32. With `experts_parallel`, the routed experts are spread over the
    ranks first (`expert_parallel`) and FSDP shards everything else."""
    policy = (
        MixedPrecisionPolicy()
        if dtype == torch.float32
        else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    )
    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))  # one mesh: FSDP's and EP's DTensors mix in grad norms
    owned = expert_parallel(model, mesh) if experts_parallel else set()
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=owned)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=owned)


def expert_parallel(model, mesh):
    """Spread every MoE layer's routed experts over the ranks of `mesh` (rank r owns experts r*E/R .. (r+1)*E/R - 1,
    as DTensors sharded along E) and route tokens to them with TokenDispatch. Returns the expert parameters.

    Their gradients arrive whole on the owning rank, summed over every rank's tokens by the backward all-to-all; a
    hook divides them by the ranks, as FSDP's reduce-scatter averages the others (the loss is each rank's mean)."""
    owned = set()
    ranks = mesh.size()

    def shard_stacks(name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            # every rank holds the same full stack (same seed or checkpoint): each keeps its slice, nothing is sent
            shard = torch.nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None))
            shard.register_hook(lambda grad: grad / ranks)
            module.register_parameter(key, shard)
            owned.add(shard)

    for moe in model.moe_layers():
        dispatch = TokenDispatch(mesh)
        distribute_module(moe.experts, mesh, shard_stacks, dispatch.send, dispatch.receive)
    return owned


class TokenDispatch:
    """Expert-parallel token dispatch around one MoE layer's Experts call: `send` (before it) moves each token-slot to
    the rank owning its expert with all_to_all_single and regroups the arrivals by local expert; `receive` (after it)
    restores their order and sends the outputs back. No token is dropped. Both exchanges are autograd functions
    (torch's functional collectives), so the backward runs the reverse all-to-alls. The splits of a forward are kept
    here until its `receive`: the two halves of one call, as torchtitan's ExpertParallel."""

    def __init__(self, mesh):
        self.group, self.ranks = mesh.get_group(), mesh.size()
        self.sent = self.arrived = self.order = None

    def send(self, experts, inputs, mesh):
        x, counts = inputs  # x [N, H] sorted by (global) expert; counts [E] of this rank's tokens
        counts = counts.view(self.ranks, -1)  # [owner rank, its experts]
        arrivals = torch.empty_like(counts)
        dist.all_to_all_single(arrivals, counts, group=self.group)  # [source rank, my experts]
        self.sent, self.arrived = counts.sum(1).tolist(), arrivals.sum(1).tolist()
        received = all_to_all_single_autograd(x, self.arrived, self.sent, self.group)
        # arrivals come by source rank, then expert: the grouped GEMM wants them by expert
        local_expert = torch.arange(counts.shape[1], device=x.device).repeat(self.ranks)
        self.order = local_expert.repeat_interleave(arrivals.flatten()).argsort(stable=True)
        return received.index_select(0, self.order), arrivals.sum(0)

    def receive(self, experts, y, mesh):
        y = y.index_select(0, self.order.argsort())  # back to source-rank order
        return all_to_all_single_autograd(y, self.sent, self.arrived, self.group)


def full_weights(model):
    """The model's full state dict on CPU on rank 0 ({} on the other ranks). Every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(optimizer):
    """optimizer.state_dict() (MuonClip's, one per torch optimizer) with every sharded tensor gathered whole: the
    format a single process saves. Every rank must call it (the gathers run in the same order everywhere)."""

    def gather(value):
        if isinstance(value, dict):
            return {k: gather(v) for k, v in value.items()}
        if isinstance(value, list):
            return [gather(v) for v in value]
        return value.full_tensor().cpu() if isinstance(value, DTensor) else value

    return gather(optimizer.state_dict())


def shard_optimizer_state(optimizer, state):
    """A full optimizer state (as saved) cut into the shards of this rank's parameters, for load_state_dict."""
    for opt, saved in zip(optimizer.optimizers, state["optimizers"]):
        params = [p for group in opt.param_groups for p in group["params"]]
        for index, values in saved["state"].items():
            p = params[int(index)]
            if isinstance(p, DTensor):
                for key, value in values.items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        values[key] = distribute_tensor(
                            value.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                        )  # every rank read the same state
    return state
