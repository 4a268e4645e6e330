"""FSDP2 (`--fsdp` under torchrun): PyTorch's `fully_shard` per transformer block and on the root, and the checkpoint
side of it: full weights and optimizer state gathered for rank 0 to save in the one checkpoint format, and full state
read back into shards on resume.

How the work and communication are split (see also optim.Muon):
- parameters, gradients and optimizer state are sharded along dim 0 over the ranks; each block's parameters are
  all-gathered for its forward and backward and its gradients reduce-scattered (FSDP2 itself);
- Muon: the routed experts' [E, out, in] stacks are sharded along E, so each rank orthogonalises the whole experts
  it holds, with no communication; every 2-D matrix (attention, dense and shared FFN, router) is all-gathered one
  shape group at a time and orthogonalised on every rank, which keeps its own rows (redundant but small work: the
  experts are most of Muon's FLOPs);
- QK-Clip: the per-head max logits are all-reduced (as under DDP) and each rank rescales the q/k rows it holds;
- the aux-loss-free expert bias is a buffer, not sharded: every rank updates it from all-reduced loads."""

import inspect

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def data_parallel(net):
    """DDP, the replicated layout. Every rank updates the expert bias identically from all-reduced loads and counts
    its own tokens per expert, so no buffer is synced at forward (torch >= 2.13 names that forward_sync_buffers,
    deprecating the old name)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
        "broadcast_buffers"
    return ddp(net, **{no_sync: False})


def shard_model(model, dtype):
    """fully_shard every block, then the root (embeddings, final norm, head). Under bf16/fp16 the gathered parameters
    compute in `dtype` and gradients reduce in fp32."""
    policy = MixedPrecisionPolicy() if dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks():
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


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
                        values[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                        src_data_rank=None)  # every rank read the same state
    return state
