"""The routed experts' grouped GEMM: each expert's slice of expert-sorted tokens times that expert's matrix, in one
call (torch._grouped_mm) where the hardware has the kernel, else one matmul per expert (hardware.expert_gemm_path).
Its own module: a kernel, not an idea of the paper; model.py's `Experts` calls `grouped_matmul`."""

import torch

from .hardware import expert_gemm_path


def grouped_matmul(a, b, offsets, path=None):
    """Rows a[offsets[e-1]:offsets[e]] @ b[e] for every expert e: a [N, in], b [E, in, out] -> [N, out]. `path`:
    "grouped" (torch._grouped_mm) or "loop"; by default the one hardware.expert_gemm_path picks for this device,
    dtype and these widths."""
    path = path or expert_gemm_path(a.device, a.dtype, (b.shape[-2], b.shape[-1]))
    if path == "grouped":  # eager: torch's own op, a little faster than our wrapper
        return grouped_mm(a, b, offsets) if torch.compiler.is_compiling() else torch._grouped_mm(a, b, offs=offsets)
    # one matmul per expert's contiguous slice (not per token)
    starts = [0] + offsets[:-1].tolist()
    return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, offsets.tolist()))])


# torch._grouped_mm wrapped as ops of our own, with their own shape functions and backward, only so that
# torch.compile traces the MoE as one graph: torch's shape function for it accepts bf16 alone (its CUDA kernel's
# rule) while eager CPU runs fp32 too, so compile had to break the graph at every expert GEMM.
@torch.library.custom_op("nanokimi::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offsets)


@grouped_mm.register_fake
def _(a, b, offsets):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("nanokimi::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a [N, in], grad [N, out] -> [E, in, out]: a[slice e]^T @ grad[slice e] for every expert e."""
    return torch._grouped_mm(a.t(), grad, offs=offsets)


@grouped_mm_weight_grad.register_fake
def _(a, grad, offsets):
    return a.new_empty(offsets.shape[0], a.shape[1], grad.shape[1])


def _grouped_mm_backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # the kernel takes real strides only (a gradient may come expanded, e.g. from a sum)
    return grouped_mm(grad, b.transpose(-2, -1), offsets), grouped_mm_weight_grad(a, grad, offsets), None


grouped_mm.register_autograd(
    _grouped_mm_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs)
)
