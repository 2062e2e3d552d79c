"""The selective scan's one-step update for decoding, as one Triton kernel.

Shape legend: b batch, di inner width, n SSM state size, g groups of B/C. Inside the kernel:
BLOCK_D channels per program, NP = n rounded up to a power of two.

Generating a token advances the scan by one step, from the state the prompt left behind:
    delta = softplus(delta + delta_bias),   h = exp(delta * A) * h + delta * B * x   (in place)
    y = (C . h + D * x) * silu(z)
the same math as `scan.selective_state_update_ref`, in fp32. One program owns BLOCK_D channels of
one sequence and holds their (BLOCK_D, NP) state in registers: one read and one write of the state,
no intermediate tensors.

Official implementation: mamba_ssm/ops/triton/selective_state_update.py.
"""

import torch
import triton
import triton.language as tl

from minivlmamba.triton_scan import LOG2E, _delta, _strides


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    DI, N, GROUP,
    s_hb, s_hd, s_hn, s_xb, s_xd, s_tb, s_td, s_zb, s_zd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, NP: tl.constexpr,
):
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, NP)  # (NP,)
    md = d < DI
    mdn = md[:, None] & (n < N)[None, :]  # (BLOCK_D, NP)
    grp = d // GROUP  # (BLOCK_D,) each channel's group of B and C
    h_ptrs = state_ptr + pid_b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn
    h = tl.load(h_ptrs, mask=mdn, other=0.0)  # (BLOCK_D, NP) fp32
    x = tl.load(x_ptr + pid_b * s_xb + d * s_xd, mask=md, other=0.0).to(tl.float32)  # (BLOCK_D,)
    bias = tl.load(bias_ptr + d, mask=md) if HAS_BIAS else None
    dt_raw = tl.load(dt_ptr + pid_b * s_tb + d * s_td, mask=md, other=0.0).to(tl.float32)
    dt = _delta(dt_raw, bias, md, HAS_BIAS, SOFTPLUS)[:, None]  # (BLOCK_D, 1)
    A2 = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0) * LOG2E
    Bv = tl.load(B_ptr + pid_b * s_Bb + grp[:, None] * s_Bg + n[None, :] * s_Bn, mask=mdn, other=0.0)
    Cv = tl.load(C_ptr + pid_b * s_Cb + grp[:, None] * s_Cg + n[None, :] * s_Cn, mask=mdn, other=0.0)
    h = tl.exp2(dt * A2) * h + (dt * x[:, None]) * Bv.to(tl.float32)  # (BLOCK_D, NP)
    tl.store(h_ptrs, h, mask=mdn)
    y = tl.sum(h * Cv.to(tl.float32), axis=1)  # (BLOCK_D,)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=md) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + d * s_zd, mask=md, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * DI + d, y, mask=md)


def selective_state_update_triton(ssm_state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                                  delta_softplus=False):
    """One decode step; updates ssm_state in place (no autotuning: a re-run would step twice).

    Args: ssm_state (b, di, n) fp32; x, delta, z (b, di); A (di, n); B, C (b, n) or (b, g, n);
    D, delta_bias (di,). Returns: y (b, di) in x's dtype. Launches one kernel and never syncs
    with the host, so it can be captured in a CUDA graph.
    """
    b, di = x.shape
    n = A.shape[1]
    B = B.unsqueeze(1) if B.dim() == 2 else B  # (b, g, n)
    C = C.unsqueeze(1) if C.dim() == 2 else C
    A = A.float().contiguous()
    out = torch.empty(b, di, device=x.device, dtype=x.dtype)
    block_d = 32 if n <= 16 else 16 if n <= 32 else 8
    _state_update_kernel[(triton.cdiv(di, block_d), b)](
        ssm_state, x, delta, A, B, C, D, z, delta_bias, out,
        di, n, di // B.shape[1],
        *ssm_state.stride(), *x.stride(), *delta.stride(), *_strides(z, (0, 1)), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, NP=triton.next_power_of_2(n), num_warps=4,
    )
    return out
