"""A fused Triton kernel for the residual add of one Mamba block and the RMSNorm of the next, forward
and backward: the training path of `MambaLM.hidden_states` on GPUs.

Shape legend: rows = b * l positions, d model width. Inside the kernels: BLOCK = d rounded up to a
power of two, one row (position) at a time.

What is computed (out is the previous mixer's output, residual the fp32 residual stream before it):
    x      = residual + out                               (fp32: the new residual stream)
    normed = x * rsqrt(mean(x^2) + eps) * weight          (in out's dtype: bf16 under autocast)
and its backward, with xhat = x * rstd and dx_in the gradient reaching x from the blocks above:
    dx      = dx_in + rstd * (weight * dnormed - xhat * mean(weight * dnormed * xhat))
    dweight = sum over rows of dnormed * xhat
dx is the gradient of both residual (fp32) and out (written again in out's dtype).

Why a kernel: unfused, a block boundary is the add (reading two tensors, writing one), the norm
(reading and writing fp32), a cast of its output to bf16 for the next product, and in the backward
the cast back, the norm's backward, the add of the two gradients of x and its cast to bf16: about
70 bytes an element against 28 here (upstream fuses the same way: mamba_ssm/ops/triton/layer_norm.py).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_norm_fwd_kernel(out_ptr, res_ptr, w_ptr, x_ptr, y_ptr, rstd_ptr, D, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(out_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * D + cols, mask=m, other=0.0)
    tl.store(x_ptr + row * D + cols, x, mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, x * rstd * w, mask=m)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_in_ptr, dres_ptr, dout_ptr, dw_ptr, ROWS, D,
                         HAS_DX_IN: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    # Each program walks rows pid, pid + programs, ... and keeps its part of dweight in registers.
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    row = pid
    while row < ROWS:  # not range(): see triton_scan.py
        offs = row * D + cols  # int32: fine below 2^31 elements (8 GB of fp32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.load(x_ptr + offs, mask=m, other=0.0) * rstd
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dw += dy * xhat
        wdy = w * dy
        dx = rstd * (wdy - xhat * (tl.sum(wdy * xhat, axis=0) / D))
        if HAS_DX_IN:
            dx += tl.load(dx_in_ptr + offs, mask=m, other=0.0)
        if HAS_RES:
            tl.store(dres_ptr + offs, dx, mask=m)
        tl.store(dout_ptr + offs, dx, mask=m)
        row += programs
    tl.store(dw_ptr + pid * D + cols, dw, mask=m)


class AddRMSNorm(torch.autograd.Function):
    """Autograd wrapper: saves x, the weight and rstd (one fp32 per row)."""

    @staticmethod
    def forward(ctx, out, residual, weight, eps):
        rows, d = out.shape
        x = torch.empty(rows, d, device=out.device, dtype=torch.float32)
        y = torch.empty(rows, d, device=out.device, dtype=out.dtype)
        rstd = torch.empty(rows, device=out.device, dtype=torch.float32)
        _add_norm_fwd_kernel[(rows,)](out, residual, weight, x, y, rstd, d, eps,
                                      HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(d), num_warps=8)
        ctx.save_for_backward(x, weight, rstd)
        ctx.has_res, ctx.out_dtype = residual is not None, out.dtype
        ctx.set_materialize_grads(False)  # x's gradient stays None where x is not used (the final norm)
        return x, y

    @staticmethod
    def backward(ctx, dx_in, dy):
        x, weight, rstd = ctx.saved_tensors
        rows, d = x.shape
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        programs = min(rows, 4 * sms)
        dres = torch.empty_like(x) if ctx.has_res else None
        dout = torch.empty(rows, d, device=x.device, dtype=ctx.out_dtype)
        dw = torch.empty(programs, d, device=x.device, dtype=torch.float32)  # a partial sum per program
        _add_norm_bwd_kernel[(programs,)](
            x, weight, rstd, dy.contiguous(), dx_in.contiguous() if dx_in is not None else None, dres, dout, dw,
            rows, d, HAS_DX_IN=dx_in is not None, HAS_RES=ctx.has_res, BLOCK=triton.next_power_of_2(d), num_warps=8)
        return dout, dres, dw.sum(0).to(weight.dtype), None


def add_rms_norm(out, residual, weight, eps):
    """(residual + out, RMSNorm of it) on fused Triton kernels.

    Args: out (rows, d), any float dtype, contiguous; residual (rows, d) fp32 contiguous, or None
    (then x = out in fp32: the first block); weight (d,).
    Returns: x (rows, d) fp32, the new residual stream; normed (rows, d) in out's dtype.
    """
    return AddRMSNorm.apply(out, residual, weight.contiguous(), eps)
