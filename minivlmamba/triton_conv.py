"""Fused Triton kernels for Mamba's causal depthwise convolution followed by SiLU, forward and backward.

Shape legend: b batch, l sequence length, di inner width (channels), k the kernel width (d_conv, 4).
Inside the kernels: BLOCK_C channels x BLOCK_T steps of one sequence per program.

What is computed (the same function as `F.silu(conv1d(x, weight, bias, padding=k-1, groups=di)[..., :l])`):
    pre_t = bias + sum_j weight_j x_{t-(k-1)+j}      (x_s = 0 for s < 0: causal, each sequence alone)
    out_t = silu(pre_t)
and its backward, with g_t = dout_t silu'(pre_t):
    dx_s = sum_j weight_j g_{s+(k-1)-j},    dweight_j = sum_{b,t} g_t x_{t-(k-1)+j},    dbias = sum_{b,t} g_t

Why a kernel: torch's depthwise convolution reads and writes the tensor several times (padding, the
convolution, the slice, the SiLU, and three kernels in the backward) and saves the pre-activation;
here each pass reads x once (the k shifted loads of a tile hit the cache) and nothing but x is
saved: the backward recomputes pre_t, which costs k multiply-adds. The backward is two kernels:
the first computes g (written out in x's dtype) with the weight and bias gradients, the second
dx from k shifted reads of g. In one kernel each dx tile needs g at k shifted steps, which a
program cannot move between its threads' registers: it recomputed pre and g k times, at 24
unaligned loads an element, and ran 6.5x its memory floor; g's extra write and read cost less
(H100, di = 5120, l = 1040: 354 -> 174 us at b = 5, 560 -> 344 us at b = 8).
The input is read in the channels-first layout (di, b, l) of the training forward (mamba.py),
with any channel and sequence strides; the steps must be contiguous.

Official implementation: Dao-AILab/causal-conv1d (CUDA), which fuses the same way.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pre(x_row, w_ptr, bias, c, mc, t, L, K: tl.constexpr):
    """The pre-activation at steps t: (BLOCK_C, BLOCK_T) fp32, zero outside [0, L)."""
    acc = tl.zeros((c.shape[0], t.shape[0]), tl.float32) + bias
    for j in tl.static_range(K):
        s = t - (K - 1) + j  # the input step weight j reads
        xs = tl.load(x_row + s[None, :], mask=mc[:, None] & ((s >= 0) & (s < L))[None, :], other=0.0)
        acc += tl.load(w_ptr + c * K + j, mask=mc, other=0.0).to(tl.float32)[:, None] * xs.to(tl.float32)
    return tl.where(((t >= 0) & (t < L))[None, :], acc, 0.0)


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, DI, L, s_xc, s_xb, s_oc, s_ob,
                     K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) steps
    mc = c < DI
    bias = tl.load(bias_ptr + c, mask=mc, other=0.0).to(tl.float32)[:, None]  # (BLOCK_C, 1)
    pre = _pre(x_ptr + pid_b * s_xb + c[:, None] * s_xc, w_ptr, bias, c, mc, t, L, K)  # (BLOCK_C, BLOCK_T)
    out = pre * tl.sigmoid(pre)
    tl.store(out_ptr + pid_b * s_ob + c[:, None] * s_oc + t[None, :], out, mask=mc[:, None] & (t < L)[None, :])


@triton.jit
def _conv_bwd_g_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, g_ptr, dw_ptr, dbias_ptr, DI, L,
                       s_xc, s_xb, s_dc, s_db, s_gc, s_gb,
                       K: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # g = dout silu'(pre) for the dx kernel, and the weight and bias gradients. One program walks a
    # whole sequence for BLOCK_C channels, so that those add up in registers and reach memory once per
    # program (a reduction and atomics per tile cost more than the tile's arithmetic).
    pid_c, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    i = tl.arange(0, KP)  # (KP,) taps
    mc = c < DI
    bias = tl.load(bias_ptr + c, mask=mc, other=0.0).to(tl.float32)[:, None]  # (BLOCK_C, 1)
    x_row = x_ptr + pid_b * s_xb + c[:, None] * s_xc  # (BLOCK_C, 1)
    dout_row = dout_ptr + pid_b * s_db + c[:, None] * s_dc
    g_row = g_ptr + pid_b * s_gb + c[:, None] * s_gc
    dw = tl.zeros((BLOCK_C, KP), tl.float32)
    dbias = tl.zeros((BLOCK_C,), tl.float32)
    t0 = 0
    while t0 < L:  # not range(): see triton_scan.py
        t = t0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,) steps
        m = mc[:, None] & (t < L)[None, :]
        pre = _pre(x_row, w_ptr, bias, c, mc, t, L, K)  # (BLOCK_C, BLOCK_T)
        sig = tl.sigmoid(pre)
        dout = tl.load(dout_row + t[None, :], mask=m, other=0.0).to(tl.float32)
        g = dout * sig * (1.0 + pre * (1.0 - sig))  # silu'(pre) = sig (1 + pre (1 - sig))
        tl.store(g_row + t[None, :], g, mask=m)
        dbias += tl.sum(g, axis=1)
        for k in tl.static_range(K):
            s = t - (K - 1) + k  # the input step weight k read for step t
            xs = tl.load(x_row + s[None, :], mask=mc[:, None] & ((s >= 0) & (t < L))[None, :], other=0.0)
            dw += tl.where(i[None, :] == k, tl.sum(g * xs.to(tl.float32), axis=1)[:, None], 0.0)  # (BLOCK_C, KP)
        t0 += BLOCK_T
    tl.atomic_add(dbias_ptr + c, dbias, mask=mc, sem="relaxed")  # the sum over sequences
    tl.atomic_add(dw_ptr + c[:, None] * K + i[None, :], dw, mask=mc[:, None] & (i < K)[None, :], sem="relaxed")


@triton.jit
def _conv_bwd_x_kernel(g_ptr, w_ptr, dx_ptr, DI, L, s_gc, s_gb, s_xc, s_xb,
                       K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # dx_s = sum_j w_j g_{s+(k-1)-j}: the forward's convolution, run backwards in time over g.
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) steps
    mc = c < DI
    g_row = g_ptr + pid_b * s_gb + c[:, None] * s_gc  # (BLOCK_C, 1)
    dx = tl.zeros((BLOCK_C, BLOCK_T), tl.float32)
    for j in tl.static_range(K):
        s = t + (K - 1) - j  # the output step that reads input step t through weight j
        gs = tl.load(g_row + s[None, :], mask=mc[:, None] & (s < L)[None, :], other=0.0).to(tl.float32)
        dx += tl.load(w_ptr + c * K + j, mask=mc, other=0.0).to(tl.float32)[:, None] * gs
    tl.store(dx_ptr + pid_b * s_xb + c[:, None] * s_xc + t[None, :], dx, mask=mc[:, None] & (t < L)[None, :])


class CausalConvSiLU(torch.autograd.Function):
    """Autograd wrapper: saves x and the weights only; the backward recomputes the pre-activation.

    It takes in_proj's whole output xz and hands the gate z through untouched, so that its backward
    writes the gradients of x and z into one tensor, the gradient of xz: unbinding xz outside would
    cost a stack of the two gradients (a copy of both) in the backward.
    """

    @staticmethod
    def forward(ctx, xz, weight, bias, block_c, block_t):
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        x, z = xz.unbind(0)  # (di, b, l) each
        di, b, l = x.shape
        out = torch.empty(di, b, l, device=x.device, dtype=x.dtype)
        _conv_fwd_kernel[(triton.cdiv(l, block_t), triton.cdiv(di, block_c), b)](
            x, weight, bias, out, di, l, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            K=weight.shape[1], BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
        ctx.save_for_backward(xz, weight, bias)
        ctx.blocks = block_c, block_t
        return out, z

    @staticmethod
    def backward(ctx, dout, dz):
        xz, weight, bias = ctx.saved_tensors
        x = xz[0]
        di, b, l = x.shape
        k = weight.shape[1]
        block_c, block_t = ctx.blocks
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        g = torch.empty(di, b, l, device=x.device, dtype=x.dtype)  # dout silu'(pre), the gradient of pre
        dw = torch.zeros(di, k, device=x.device, dtype=torch.float32)
        dbias = torch.zeros(di, device=x.device, dtype=torch.float32)
        _conv_bwd_g_kernel[(triton.cdiv(di, block_c), b)](
            x, weight, bias, dout, g, dw, dbias, di, l, x.stride(0), x.stride(1), dout.stride(0), dout.stride(1),
            g.stride(0), g.stride(1), K=k, KP=triton.next_power_of_2(k), BLOCK_C=block_c, BLOCK_T=block_t,
            num_warps=4)
        dxz = torch.empty(2, di, b, l, device=x.device, dtype=x.dtype)
        dx = dxz[0]
        _conv_bwd_x_kernel[(triton.cdiv(l, block_t), triton.cdiv(di, block_c), b)](
            g, weight, dx, di, l, g.stride(0), g.stride(1), dx.stride(0), dx.stride(1),
            K=k, BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
        dxz[1].copy_(dz)
        return dxz, dw.to(weight.dtype), dbias.to(bias.dtype), None, None


def causal_conv1d_silu(xz, weight, bias, block_c=4, block_t=256):
    """silu(causal depthwise conv of each sequence of x) on fused Triton kernels, for xz = (x, z).

    Args: xz (2, di, b, l): the conv's input x, then the gate z that passes through; steps
    contiguous, any other strides; weight (di, k); bias (di,).
    Returns: silu(conv(x)) (di, b, l) contiguous in x's dtype (all math in fp32), and z, a view of xz.
    """
    weight, bias = weight.contiguous(), bias.contiguous()
    return CausalConvSiLU.apply(xz, weight, bias, block_c, block_t)
