"""The Mamba LM's matrix products in training on GPUs: fp32 master weights times bf16 activations.

Under autocast each micro-batch's forward casts every fp32 weight to bf16 and keeps the copy for the
backward (5.3 GB for Mamba-2.8B's products, every layer's at once at the peak of memory), the weight's
gradient is rounded to bf16 and cast back, and autograd adds it into `.grad` with a kernel of its own.
`WeightProduct` computes the same products with less traffic (and an unrounded weight gradient):
- the bf16 copy of each weight is made once per optimizer step and shared by every forward and
  backward of that step's micro-batches (`cast_weight`);
- the weight's gradient leaves cuBLAS in fp32, and from the second micro-batch of a step on cuBLAS
  adds it into `.grad` itself (C += A B), where autograd would write it out and add it separately
  (`_grad_to_add_into`).
Both only in one process: under torch.distributed (DDP, FSDP) each product casts its weight when
it runs and hands its gradient back to autograd, as before (why: `cast_weight`, `_grad_to_add_into`).

Shapes: weight (m, k) fp32; x (k, n) for weight @ x, or (n, k) for x @ weight.t(), in bf16.
Written against torch 2.11-2.13; it leans on a few private parts of torch: `_version`,
`_backward_hooks`, `_post_accumulate_grad_hooks`, `torch._C._will_engine_execute_node`.
"""

import torch
import torch.distributed as dist
from torch.autograd.graph import get_gradient_edge
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0  # optimizer steps this process has taken (any torch.optim optimizer)


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _one_process():
    return not (dist.is_available() and dist.is_initialized())


def cast_weight(weight, dtype):
    """weight in dtype; in one process the copy is kept on the weight and reused until the weight changes.

    The weights change only in the optimizer step, so each one is cast once a step instead of twice a
    micro-batch (44 times a step of 22 micro-batches), for one bf16 copy of the weights kept in memory
    as long as the weights (5.3 GB for Mamba-2.8B, after any forward on the GPU training path).
    The copy is made again after any optimizer step (counted by a hook: fused AdamW writes the
    weights without bumping their `_version`, measured), any other in-place write (`_version`:
    `load_state_dict`, an init under `no_grad`) or new storage (`.data =`, `module.to()`). Not
    seen: writes through `weight.data`, which has a version counter of its own; two `.data =`
    in a row that land on the same address; an optimizer step replayed from a CUDA graph (no hook).
    Not where grad mode is on (a backward with `create_graph`): the copy is detached, so the cast is
    made afresh there for the second-order gradients to reach the weight.
    Not under torch.distributed: FSDP gathers each block's weights anew for every forward and
    backward, and a kept copy of them all would undo the memory that sharding saves (its own
    equivalent is MixedPrecisionPolicy(param_dtype=bf16), which would also round A_log, D and the
    norms); DDP could keep it, but the 2.8B step does not fit DDP on an 80 GB card even without it.
    """
    if weight.dtype == dtype or not _one_process() or (torch.is_grad_enabled() and weight.requires_grad):
        return weight.to(dtype)
    key = (_optimizer_steps, weight._version, weight.data_ptr(), dtype)
    if getattr(weight, "_cast", (None,))[0] != key:
        weight._cast = None  # the old copy goes before the new one is made
        weight._cast = (key, weight.detach().to(dtype))
    return weight._cast[1]


def _grad_to_add_into(weight):
    """weight.grad where the backward may add the weight's gradient into it itself, else None.

    Autograd hands each gradient to the weight's AccumulateGrad, which adds it into `.grad`: a kernel
    that reads two fp32 copies of the weights and writes one, a micro-batch, after cuBLAS wrote the
    gradient out. Skipping it is safe only in a plain `loss.backward()` of one process, into a
    `.grad` already there: DDP's and FSDP's hooks
    watch AccumulateGrad to start their reductions, hooks on the weight expect the gradient,
    `create_graph` (grad mode on) makes AccumulateGrad build a graph, and `torch.autograd.grad`
    or `backward(inputs=...)` without the weight do not run AccumulateGrad at all.
    Not seen: hooks registered on the AccumulateGrad node itself (torch has no public way to list
    them); they would receive None.
    """
    grad = weight.grad
    if (grad is None or not grad.is_contiguous() or torch.is_grad_enabled() or weight._backward_hooks
            or weight._post_accumulate_grad_hooks or not _one_process()):
        return None
    try:
        runs = torch._C._will_engine_execute_node(get_gradient_edge(weight).node)
    except RuntimeError:  # raised inside torch.autograd.grad, which never runs AccumulateGrad
        return None
    return grad if runs else None


class WeightProduct(torch.autograd.Function):
    """weight @ x (weight_first) or x @ weight.t(), in x's dtype, for a fp32 master weight and bf16 x.

    Same values as the autocast product, except the weight's gradient, which is not rounded to bf16
    on CUDA; same gradients as autograd's accumulation into `.grad` (tests/test_training.py).
    """

    @staticmethod
    def forward(ctx, weight, x, weight_first):
        ctx.save_for_backward(weight, x)  # the fp32 weight, alive anyway: no bf16 copy saved per layer
        ctx.weight_first = weight_first
        w = cast_weight(weight, x.dtype)
        return w @ x if weight_first else x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        weight, x = ctx.saved_tensors
        need_dw, need_dx = ctx.needs_input_grad[:2]  # a frozen LM (stage 1) needs no weight gradients
        dw = None
        if need_dw:
            a, b = (grad, x.t()) if ctx.weight_first else (grad.t(), x)  # dw = a @ b
            into = _grad_to_add_into(weight)
            if into is None:
                dw = _product_in(weight.dtype, a, b)
            else:
                _add_product(into, a, b)  # and autograd gets None: nothing left for AccumulateGrad to add
        if not need_dx:
            return dw, None, None
        w = cast_weight(weight, grad.dtype)
        return dw, _product_like(x, w.t(), grad) if ctx.weight_first else _product_like(x, grad, w), None


def _product_in(dtype, a, b):
    """a @ b returned in dtype; on CUDA cuBLAS writes fp32 straight from its fp32 sums of bf16 inputs."""
    return torch.mm(a, b, out_dtype=dtype) if a.is_cuda and a.dtype != dtype else (a @ b).to(dtype)


def _add_product(out, a, b):
    """out += a @ b, with a @ b as `_product_in` gives it: for bf16 a, b and a fp32 out on CUDA, cuBLAS
    adds its fp32 sums into out itself (beta = 1); elsewhere the product is written out and added."""
    if out.is_cuda and a.dtype != out.dtype:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out += _product_in(out.dtype, a, b)


def _product_like(x, a, b):
    """a @ b, laid out as x: where x is a transposed view, computed as (b^T a^T)^T, so that the gradient
    reaches x's producer in its own layout (a transposed one would cost a strided copy later)."""
    return (b.t() @ a.t()).t() if x.t().is_contiguous() and not x.is_contiguous() else a @ b
