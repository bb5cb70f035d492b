"""x @ W[e] for each group of rows: a mixture of experts' experts on transformers'
grouped_mm path, as relevance needs it.

The experts are linear in x with parameter weights, so their rule is their gradient at
x (LRP-0, attnlrp's linear rule). A trace (torch.export) records transformers' fallback
op `transformers::grouped_mm_fallback`, a loop of one matmul per expert, whose backward
computes the weights' gradient too, whether autograd asks for it or not, and whose
forward zero-fills its output first. `grouped_mm` is its twin (same schema, same
values): where the model's own forward would run torch's grouped kernel (`grouped_mm`
on CPU in float32 / bfloat16 / float16, on CUDA from compute capability 8.0) it runs it,
else the same loop; its backward computes only the gradients asked for, so explaining
costs what the gradient at the input costs. On CPU the kernel and the loop agree bit for
bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_KERNEL = getattr(F, "grouped_mm", None)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_runs(a: Tensor, b: Tensor) -> bool:
    """torch's grouped kernel takes a @ b here (transformers' own test, for eager)."""
    if _KERNEL is None or a.dtype not in _KERNEL_DTYPES or b.dtype != a.dtype:
        return False
    if a.device.type == "cuda":
        return torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu" and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0


def _grouped(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """Rows offs[e-1]:offs[e] of a times b[e]; rows past offs[-1] are 0."""
    if _kernel_runs(a, b):
        out = _KERNEL(a, b, offs=offs)
        end = int(offs[-1]) if offs.numel() else 0
        if end < a.size(0):  # (the kernel leaves them unwritten)
            out[end:].zero_()
        return out
    out = a.new_empty(a.size(0), b.size(2))
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync for all groups
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    out[start:].zero_()
    return out


@torch.library.custom_op("relprop::grouped_mm_fallback", mutates_args=())
def grouped_mm(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """input (S, k) @ weight[e] (k, n) for the rows of group e (offs: cumulative counts)."""
    return _grouped(input, weight, offs)


@grouped_mm.register_fake
def _(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return input.new_empty(input.size(0), weight.size(2))


def _setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    x, w, offs = inputs
    ctx.offs = offs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, w = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _grouped(grad, w.transpose(-2, -1), ctx.offs) if ctx.needs_input_grad[0] else None
    grad_w = None
    if x is not None:  # (never for relevance: parameters arrive detached)
        grad_w = torch.zeros_like(w)
        start = 0
        for e, end in enumerate(ctx.offs.tolist()):
            if end > start:
                torch.mm(x[start:end].T, grad[start:end], out=grad_w[e])
            start = end
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup)
