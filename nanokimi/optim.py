"""MuonClip (Kimi-K2): Muon for hidden matrices, AdamW for the rest, and per-head QK-Clip after each step.

Muon follows torch.optim.Muon with Moonlight/K2 RMS matching (`adjust_lr_fn="match_rms_adamw"`), so AdamW's lr and
weight decay carry over unchanged. `Muon` here also takes the routed experts' [E, out, in] stacks (torch.optim.Muon
is 2-D only) and batches the Newton-Schulz iteration over every matrix of the same shape, each orthogonalised on its
own (tests check it against torch.optim.Muon matrix by matrix).
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from .hardware import describe, native_bf16_matmul

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def local_part(tensor):
    """This rank's shard of an FSDP2 (DTensor) tensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def rows_held(param, full):
    """The rows of `full` (a whole matrix shaped as `param`) that this rank holds of `param`, sharded or not: every
    rank has `full`, so each cuts its own shard (src_data_rank=None: no communication)."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def zeropower_via_newtonschulz(grad, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Approximate U V^T of each trailing [m, n] matrix (singular values land in about 0.5..1.5), batched over
    leading dims. Same quintic iteration as torch.optim.Muon (which accepts 2-D tensors only), in `dtype`: torch's
    bf16, or fp32 where this machine does fp32 matmuls faster (`newton_schulz_dtype`)."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype).flatten(0, -3) if grad.ndim > 2 else grad.to(dtype).unsqueeze(0)  # [batch, m, n]
    transposed = grad.size(-2) > grad.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # fused as torch's addmm
    return (x.mT if transposed else x).reshape(grad.shape)


def newton_schulz_dtype(device, choice="auto"):
    """Newton-Schulz's precision. `choice` "float32" or "bfloat16" forces it; "auto" takes bf16 where `device`
    multiplies bf16 in hardware (`hardware.native_bf16_matmul`: it is then faster, as torch.optim.Muon's default),
    else fp32 (bf16 would be emulated and slower). The same machine always makes the same choice, whatever its load.
    Under torch.distributed every rank takes rank 0's choice, so the ranks' numerics stay identical."""
    if choice not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"unknown muon_dtype {choice!r}: use auto, float32 or bfloat16")
    if choice != "auto":
        return getattr(torch, choice)
    dtype = torch.bfloat16 if native_bf16_matmul(device) else torch.float32
    if dist.is_available() and dist.is_initialized():
        code = torch.tensor(
            [dtype == torch.bfloat16], dtype=torch.int32, device=device if dist.get_backend() == "nccl" else "cpu"
        )
        dist.broadcast(code, src=0)
        dtype = torch.bfloat16 if code.item() else torch.float32
    return dtype


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices, 2-D [out, in] and stacked 3-D expert [E, out, in] alike, with torch.optim.Muon's
    update rule (adjust_lr_fn="match_rms_adamw") applied to every matrix on its own: Nesterov momentum, Newton-Schulz
    (in `ns_dtype`: bf16 as torch, or fp32), lr * 0.2 * sqrt(max(out, in)), decoupled weight decay.

    Hand-written because torch.optim.Muon takes 2-D parameters only and orthogonalises them one at a time: here every
    matrix of the same shape (q_b_proj of all layers, all experts of all layers, ...) goes through one batched
    Newton-Schulz, so a step is a few large kernels instead of dozens of small ones. `ns_dtype` is an attribute, not
    a group setting: a machine's choice, not saved with the optimizer state (a run resumed elsewhere re-chooses)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_steps=5,
        ns_dtype=torch.bfloat16,
        ns_reason="as set",
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        )
        self.ns_dtype = ns_dtype
        self.ns_reason = ns_reason  # why ns_dtype: "as set", or the capability that chose it

    def precision(self):
        """What Newton-Schulz runs in and why: "Newton-Schulz float32 (auto: no native bf16 matmul on CPU AVX2)",
        or "(as set)" when forced by --muon_dtype or kept from the run a --resume continues."""
        return f"Newton-Schulz {str(self.ns_dtype)[6:]} ({self.ns_reason})"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            # elementwise work on this rank's part (all of it without FSDP), as a few multi-tensor kernels
            local = [local_part(p) for p in params]
            grads = [local_part(p.grad) for p in params]
            bufs = [local_part(self.state[p]["momentum_buffer"]) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            torch._foreach_mul_(local, 1 - group["lr"] * group["weight_decay"])
            by_shape = {}  # (out, in) -> [(param, its part, its update as [k, out, in])]
            for p, part, update in zip(params, local, updates):
                if isinstance(p, DTensor) and p.ndim == 2:  # FSDP: rows are sharded, Newton-Schulz needs them all
                    update = DTensor.from_local(
                        update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    ).full_tensor()
                # (a 3-D expert stack is sharded along its experts: this rank's experts are whole matrices)
                by_shape.setdefault(tuple(p.shape[-2:]), []).append((p, part, update.reshape(-1, *p.shape[-2:])))
            for (rows, cols), members in by_shape.items():
                orthogonal = zeropower_via_newtonschulz(
                    torch.cat([u for *_, u in members]), group["ns_steps"], dtype=self.ns_dtype
                )
                pieces = orthogonal.to(members[0][1].dtype).split([u.shape[0] for *_, u in members])
                pieces = [rows_held(p, o[0]) if p.ndim == 2 else o for (p, _, _), o in zip(members, pieces)]
                torch._foreach_add_(
                    [part for _, part, _ in members],
                    [o.view_as(part) for (_, part, _), o in zip(members, pieces)],
                    alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)),
                )


class MuonClip:
    """One optimizer object over several torch optimizers (AdamW, Muon), plus QK-Clip.

    `param_groups` lists every group (set group["lr"] for schedules); state_dict/load_state_dict round-trip.
    `needs_max_logits` says whether training forwards should return their per-head max attention logits
    (`model(x, y, record_max_logits=True)`); `step(max_logits=...)` takes their max over the step's micro-batches,
    reduces it over ranks when distributed, and asks every attention layer whose heads exceed `qk_clip_tau` to
    rescale itself (`attn.qk_clip_(gamma)`)."""

    def __init__(self, optimizers, attention=(), qk_clip_tau=None, track_max_logits=False):
        self.optimizers = optimizers
        self.attention = list(attention)
        self.qk_clip_tau = qk_clip_tau
        self.needs_max_logits = bool(self.attention) and (qk_clip_tau is not None or track_max_logits)

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, scaler=None, max_logits=None):
        """Step every optimizer (through `scaler`, a torch.amp.GradScaler, under fp16), then QK-Clip with
        `max_logits` [layers, heads]. Returns the max logits reduced over ranks (None when not given)."""
        for opt in self.optimizers:
            scaler.step(opt) if scaler is not None else opt.step()
        if max_logits is None:
            return None
        if dist.is_available() and dist.is_initialized():
            max_logits = max_logits.clone()
            dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)
        if self.qk_clip_tau is not None:
            for attn, head_max in zip(self.attention, max_logits):
                gamma = qk_clip_factors(head_max, self.qk_clip_tau)
                if bool((gamma < 1).any()):
                    attn.qk_clip_(gamma)
        return max_logits

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(state['optimizers'])} optimizers, expected "
                f"{len(self.optimizers)}: was it saved with another --optimizer?"
            )
        for opt, s in zip(self.optimizers, state["optimizers"]):
            params = [p for group in opt.param_groups for p in group["params"]]
            for index, values in s.get("state", {}).items():  # torch loads a tensor of any shape without a word
                param = params[int(index)] if int(index) < len(params) else None
                for name, value in values.items():
                    if param is None or torch.is_tensor(value) and value.ndim and value.shape != param.shape:
                        raise ValueError(
                            f"state {name!r} of parameter {index} has shape "
                            f"{tuple(value.shape) if torch.is_tensor(value) else None}, the parameter "
                            f"{tuple(param.shape) if param is not None else 'does not exist'}"
                        )
            opt.load_state_dict(s)


def qk_clip_factors(head_max, tau):
    """K2 Algorithm 1: gamma_h = tau / S_max_h for heads whose max logit S_max_h exceeds tau, else 1."""
    return torch.where(head_max > tau, tau / head_max, torch.ones_like(head_max))


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def configure_optimizer(
    model,
    name="muonclip",
    lr=1e-3,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    momentum=0.95,
    qk_clip_tau=100.0,
    track_max_logit=False,
    muon_dtype="auto",
):
    """Split the model's parameters and build the optimizer `name` in {"muonclip", "muon", "adamw"}.
    `muon_dtype`: Newton-Schulz's precision, "auto" (by this machine's capability: `newton_schulz_dtype`), "float32"
    or "bfloat16".

    Muon: every hidden matrix (attention projections, dense FFN, shared experts, each routed expert separately) and
    the router gate: like torchtitan's K2 recipe, since the gate is a hidden [E, H] matrix too and Moonlight found
    Muon helps such matrices (its Figure 4); in KDA layers its q/k/v/o, beta and low-rank gate projections. AdamW:
    embeddings and lm_head (their rows are looked up / scored one token at a time, not used as a whole linear map),
    KDA's short-convolution filters, norms, biases and KDA's decay rates (A_log, dt_bias); decay only on matrices,
    as nanoGPT.
    `e_score_correction_bias` is a buffer: never optimised."""
    if name not in ("muonclip", "muon", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}: use muonclip, muon or adamw")
    model = unwrap(model)
    table = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    table |= {id(p) for p in getattr(model, "lm_head", torch.nn.Identity()).parameters()}
    # KDA's depthwise convolution: each channel's own few taps, not a linear map between spaces
    table |= {id(p) for m in model.modules() if isinstance(m, torch.nn.Conv1d) for p in m.parameters()}
    matrices, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if name == "adamw" or id(p) in table or p.ndim < 2:
            (decay if p.ndim >= 2 else no_decay).append(p)
        else:
            matrices.append(p)
    fused = next(model.parameters()).device.type in model.fused_adamw_devices
    optimizers = [
        torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=betas,
            fused=fused,
        )
    ]
    if matrices:
        device = matrices[0].device
        ns_dtype = newton_schulz_dtype(device, muon_dtype)
        reason = (
            "as set"
            if muon_dtype != "auto"
            else (
                f"auto: {'native' if ns_dtype == torch.bfloat16 else 'no native'} bf16 matmul on "
                f"{describe(device).split(',')[0] if device.type == 'cpu' else device.type}"
            )
        )
        optimizers.append(
            Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, ns_dtype=ns_dtype, ns_reason=reason)
        )
    return MuonClip(optimizers, model.attention_layers(), qk_clip_tau if name == "muonclip" else None, track_max_logit)
