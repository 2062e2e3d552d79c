"""The fused Triton kernel of the selective scan's backward (the forward, and the autograd Function
that calls this, are in `triton_scan.py`; its docstring has the shape legend and the math).

Its programs own BLOCK_D channels (2 by default) and walk chunks of bwd_chunk steps in reverse,
with the tile laid out (BLOCK_D, CHUNK) as in the official CUDA kernel: the steps spread over the
lanes (each thread a run of RUN consecutive steps, 16 bytes: 8 steps of bf16, 4 of fp32), and a
loop over the state index n. Per chunk and state k, the program recomputes a_t and h_t from the
saved h0 (a scan across the lanes), then runs the adjoint recurrence backwards in time:
    dh_t = C_t dy_t + a_{t+1} dh_{t+1}                (the NEXT step's decay),  dy_t = dout_t silu(z_t)
with dh of the next chunk's first step carried in through a small double-buffered (b, 2, di, n)
scratch. With x_t = delta_t B_t u_t and a_t h_{t-1} = h_t - x_t:
    dC_t = sum_c dy_t h_t            dB_t = sum_c dh_t delta_t u_t     (sum over the group's channels)
    du_t = delta_t sum_n dh_t B_t + D dy_t
    ddelta_t = u_t sum_n dh_t B_t + sum_n dh_t (h_t - x_t) A        (then times sigmoid, for softplus)
    dA = sum_t dh_t (h_t - x_t) delta_t,   dD = sum_t dy_t u_t,   dz_t = dout_t y_t silu'(z_t)
The sums over n (du, ddelta, and y = C . h + D u for dz) accumulate inside each thread across the
loop over k: no shuffles. dB and dC sum over channels held by many programs: each program adds
its (CHUNK,) row per state with fp32 vector atomics (red.v4.f32), coalesced along the steps. Only the
scans, the sum over the program's channels, and dA (summed over the chunk, then one atomic) cross lanes.

What the backward's speed hangs on, none of it visible in the math (each checked in the SASS that
Triton 3.6 compiles for sm_90; notes/scan-kernels.md has the counts):
- Shuffles. Triton's `reverse=True` scan reverses the whole tile across the lanes before and after
  the scan, at five shuffles an element: it cost more than the rest of the loop. `_adjoint_scan`
  writes the reverse scan out with forward scans only (reversing a thread's own run is free), and
  B_t, C_t are loaded in the tile's shape, so no shuffles move them in from another layout.
- Alignment. Triton picks the tile's layout from the alignment it can prove for the loads and
  stores. The 8-steps-per-thread layout needs rows that start 16-byte aligned; at l = 729 they don't,
  and the compiler falls back to 1 step per thread, where every step of both scans crosses lanes. So
  everything the backward writes per step (du, ddelta, dz, dB, dC) goes to rows padded to lp (l
  rounded up to 16), and B, C are read from zero-padded copies.
- Registers. The loop is bound by latency (scans and shuffles are chains of dependent instructions),
  so more resident warps help: capping the registers at 128 beat 152, 168 and 200.

Official implementation: mamba_ssm/csrc/selective_scan (CUDA, the same chunked design with block
scans). This backward follows its layout; like it, it recomputes a_{t+1} with a second exponential
instead of passing a_t between threads.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minivlmamba.triton_scan import LOG2E, _block_d, _compose, _delta, _strides


@triton.jit
def _adjoint_scan(a1, g, dh_in, first_out, mask, RUN: tl.constexpr):
    """dh_t = g_t + a1_t dh_{t+1} backwards over the chunk, entering with dh_in (BLOCK_D, 1) after its
    last step: a reverse scan, written out in its two levels with forward scans only (Triton's
    `reverse=True` reverses the whole tile across the lanes, before and after, at about five shuffles an
    element). Each thread holds RUN consecutive steps: reversing those is free, so each run is scanned in
    its thread. The runs' totals are then chained across the lanes from the chunk's end in log2(W)
    rounds of shuffles (tl.gather), and each run applies the adjoint entering it from its right. Also
    writes dh at the chunk's first step to first_out (BLOCK_D,) pointers, where mask."""
    BLOCK_D: tl.constexpr = a1.shape[0]
    W: tl.constexpr = a1.shape[1] // RUN  # runs (threads) along the chunk
    a3, g3 = tl.reshape(a1, (BLOCK_D, W, RUN)), tl.reshape(g, (BLOCK_D, W, RUN))
    pa, px = tl.associative_scan((tl.flip(a3, 2), tl.flip(g3, 2)), axis=2, combine_fn=_compose)
    pa, px = tl.flip(pa, 2), tl.flip(px, 2)  # within each run: dh_t = px_t + pa_t (dh entering the run)
    r = tl.arange(0, RUN)[None, None, :]
    ra, rx = tl.sum(tl.where(r == 0, pa, -0.0), axis=2), tl.sum(tl.where(r == 0, px, -0.0), axis=2)  # (BLOCK_D, W)
    # the run to the right of run j, as v -> sx + sa v; past the last run, the constant dh_in
    j = tl.arange(0, W)[None, :] + tl.zeros_like(ra).to(tl.int32)
    right = tl.minimum(j + 1, W - 1)
    sa = tl.where(j == W - 1, 0.0, tl.gather(ra, right, axis=1))
    sx = tl.where(j == W - 1, dh_in, tl.gather(rx, right, axis=1))
    for step in tl.static_range(10):  # log2(W) <= 10 rounds (Hillis-Steele): compose with the chain 2^step runs right
        if (1 << step) < W:
            far = tl.minimum(j + (1 << step), W - 1)
            fa, fx = tl.gather(sa, far, axis=1), tl.gather(sx, far, axis=1)
            inside = j + (1 << step) < W
            sa, sx = tl.where(inside, sa * fa, sa), tl.where(inside, sx + sa * fx, sx)
    tl.store(first_out[:, None] + 0 * j, rx + ra * sx, mask=mask[:, None] & (j == 0))
    return tl.reshape(px + pa * sx[:, :, None], (BLOCK_D, W * RUN))


@triton.jit
def _state_inputs(k, A_col, B_row, C_row, h0_col, carry_in, tt, md, mo, s_Bn, s_Cn):
    """What the backward reads for state index k of a chunk: A, the saved state h0 and the carried-in
    adjoint (BLOCK_D, 1), and B_t[k], C_t[k] (BLOCK_D, CHUNK) at the steps tt (BLOCK_D, CHUNK). B and C
    are the same for every channel, but loaded in the tile's shape each step's value lands in the
    thread that uses it (a (CHUNK,) load is laid out differently, and moving it costs shuffles)."""
    A = tl.load(A_col + k, mask=md, other=0.0)[:, None]
    Bk = tl.load(B_row + k * s_Bn + tt, mask=mo, other=0.0).to(tl.float32)
    Ck = tl.load(C_row + k * s_Cn + tt, mask=mo, other=0.0).to(tl.float32)
    h0 = tl.load(h0_col + k, mask=md, other=0.0)[:, None]
    dh_in = tl.load(carry_in + k, mask=md, other=0.0)[:, None]
    return A, Bk, Ck, h0, dh_in


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, h0_ptr, carry_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    DI, L, LP, N: tl.constexpr, GROUP, G,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_ob, s_od,
    s_dub, s_dud, s_dtb, s_dtd, s_dzb, s_dzd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, RUN: tl.constexpr,
):
    # the sequences of a channel block run next to each other, so the programs running at once add
    # into the dB, dC rows of all the sequences (not all into one: 5% faster)
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    tc = tl.arange(0, CHUNK)  # (CHUNK,) step within the chunk
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels
    md = d < DI
    grp = pid_d * BLOCK_D // GROUP
    bias = tl.load(bias_ptr + d, mask=md).to(tl.float32)[:, None] if HAS_BIAS else None  # (BLOCK_D, 1)
    Dv = tl.load(D_ptr + d, mask=md).to(tl.float32)[:, None] if HAS_D else None
    u_row = u_ptr + pid_b * s_ub + d[:, None] * s_ud  # (BLOCK_D, 1) where each channel starts
    dt_row = dt_ptr + pid_b * s_tb + d[:, None] * s_td
    do_row = dout_ptr + pid_b * s_ob + d[:, None] * s_od
    du_row = du_ptr + pid_b * s_dub + d[:, None] * s_dud  # (BLOCK_D, 1) where the gradients' rows start
    ddt_row = ddt_ptr + pid_b * s_dtb + d[:, None] * s_dtd
    dz_row = dz_ptr + pid_b * s_dzb + d[:, None] * s_dzd if HAS_Z else None
    B_row = B_ptr + pid_b * s_Bb + grp * s_Bg  # B_t[k] at B_row + k s_Bn + t
    C_row = C_ptr + pid_b * s_Cb + grp * s_Cg
    dBC_row = (pid_b * G + grp) * N * LP  # the group's fp32 dB, dC (rows of LP, as B and C)
    n_chunks = tl.cdiv(L, CHUNK)
    h0_col = h0_ptr + (pid_b * n_chunks * DI + d) * N  # (BLOCK_D,) state k of chunk c at + c DI N + k
    carry_col = carry_ptr + (pid_b * 2 * DI + d) * N  # (BLOCK_D,) two buffers, DI N apart
    A_col = A_ptr + d * N
    dA_col = dA_ptr + (pid_b * DI + d) * N
    first = (tc == 0)[None, :]  # (1, CHUNK)

    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    c = n_chunks - 1
    while c >= 0:  # backwards in time, chunk by chunk (not range(): see triton_scan.py)
        t = c * CHUNK + tc  # (CHUNK,)
        mt, mp = t < L, t < LP  # real steps; steps of the padded rows
        m, mo = md[:, None] & mt[None, :], md[:, None] & mp[None, :]  # (BLOCK_D, CHUNK) inputs; outputs
        u = tl.load(u_row + t[None, :], mask=m, other=0.0).to(tl.float32)  # (BLOCK_D, CHUNK)
        dt_raw = tl.load(dt_row + t[None, :], mask=m, other=0.0).to(tl.float32)
        dt = _delta(dt_raw, bias, m, HAS_BIAS, SOFTPLUS)
        m1 = md[:, None] & (t + 1 < L)[None, :]
        dt1 = _delta(tl.load(dt_row + t[None, :] + 1, mask=m1, other=0.0).to(tl.float32), bias, m1,
                     HAS_BIAS, SOFTPLUS)  # delta_{t+1}, for the next step's decay
        if SOFTPLUS:
            dt_raw = tl.sigmoid(dt_raw + bias if HAS_BIAS else dt_raw)  # softplus' (1 above 20, as sigmoid)
        dtu = dt * u
        dy = tl.load(do_row + t[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + d[:, None] * s_zd + t[None, :], mask=m, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dz = dy * sz * (1.0 + z * (1.0 - sz))  # times y, once summed below
            dy *= z * sz
            y = Dv * u if HAS_D else tl.zeros((BLOCK_D, CHUNK), tl.float32)  # C . h + D u
        if HAS_D:
            dD += tl.sum(dy * u, axis=1)
        dhB = tl.zeros((BLOCK_D, CHUNK), tl.float32)  # sum_n dh_t B_t
        dhaA = tl.zeros((BLOCK_D, CHUNK), tl.float32)  # sum_n dh_t a_t h_{t-1} A
        carry_in = carry_col + ((c + 1) % 2) * DI * N  # the adjoint entering from the next chunk (0 at first)
        carry_out = carry_col + (c % 2) * DI * N
        tl.debug_barrier()  # the next chunk's carries, written by another thread, are visible
        tt = t[None, :] + 0 * d[:, None]  # (BLOCK_D, CHUNK) the steps, in the tile's shape
        h0_chunk = h0_col + c * DI * N  # (BLOCK_D,) the states saved at the chunk's start
        A, Bk, Ck, h0, dh_in = _state_inputs(0, A_col, B_row, C_row, h0_chunk, carry_in, tt, md, mo, s_Bn, s_Cn)
        for k in range(N):  # N a constexpr: the compiler knows the trip count
            # issue the loads of state k + 1 now, so that they arrive while state k computes (after
            # the last state, state 0 again: a valid address, the values unused). Measured only as part
            # of the whole v6 kernel, not on its own (notes/scan-kernels.md)
            A_nxt, B_nxt, C_nxt, h0_nxt, dh_nxt = _state_inputs((k + 1) % N, A_col, B_row, C_row, h0_chunk, carry_in,
                                                                tt, md, mo, s_Bn, s_Cn)
            A2 = A * LOG2E

            # recompute the chunk's states of state index k from the saved h0
            a = tl.exp2(dt * A2)  # (BLOCK_D, CHUNK)
            x = Bk * dtu
            _, h = tl.associative_scan((a, tl.where(first, x + a * h0, x)), axis=1, combine_fn=_compose)
            tl.atomic_add(dC_ptr + dBC_row + k * LP + t, tl.sum(h * dy, axis=0), mask=mp, sem="relaxed")
            if HAS_Z:
                y += Ck * h

            # the adjoint recurrence, backwards in time, with the next step's decay
            a1 = tl.exp2(dt1 * A2)  # (BLOCK_D, CHUNK) a_{t+1}
            g = Ck * dy
            dh = _adjoint_scan(a1, g, dh_in, carry_out + k, md, RUN)
            tl.atomic_add(dB_ptr + dBC_row + k * LP + t, tl.sum(dh * dtu, axis=0), mask=mp, sem="relaxed")
            dhB += dh * Bk
            dh *= h - x  # dh_t a_t h_{t-1}
            dhaA += dh * A
            tl.atomic_add(dA_col + k, tl.sum(dh * dt, axis=1), mask=md, sem="relaxed")
            A, Bk, Ck, h0, dh_in = A_nxt, B_nxt, C_nxt, h0_nxt, dh_nxt

        ddt = u * dhB + dhaA
        du = dt * dhB
        if HAS_D:
            du += Dv * dy
        if HAS_Z:
            tl.store(dz_row + t[None, :], dz * y, mask=mo)
        if SOFTPLUS:
            ddt *= dt_raw
        if HAS_BIAS:
            dbias += tl.sum(tl.where(m, ddt, 0.0), axis=1)
        tl.store(du_row + t[None, :], du, mask=mo)
        tl.store(ddt_row + t[None, :], ddt, mask=mo)
        c -= 1

    if HAS_D:
        tl.store(dD_ptr + pid_b * DI + d, dD, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * DI + d, dbias, mask=md)


def _grad_like(x, lp):
    """An empty gradient for x (b, di, l): in x's own layout where its rows need no padding (autograd
    then hands it on without a copy: in training x is a (b, di, l) view of a channels-first (di, b * l)
    tensor), else contiguous rows of lp steps."""
    b, di, l = x.shape
    return torch.empty_like(x) if lp == l else torch.empty(b, di, lp, device=x.device, dtype=x.dtype)


def scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk, block_d, num_warps, maxnreg):
    b, di, l = u.shape
    g, n = B.shape[1], A.shape[1]
    block_d = _block_d(di // g, block_d)
    # rows of lp steps (aligned, see the module's docstring) for all the backward writes, and for B, C
    lp = triton.cdiv(l, 16) * 16
    B, C = F.pad(B, (0, lp - l)), F.pad(C, (0, lp - l))
    du, ddelta = _grad_like(u, lp), _grad_like(delta, lp)
    dz = _grad_like(z, lp) if z is not None else None
    dB = torch.zeros(b, g, n, lp, device=u.device, dtype=torch.float32)
    dC = torch.zeros(b, g, n, lp, device=u.device, dtype=torch.float32)
    dA = torch.zeros(b, di, n, device=u.device, dtype=torch.float32)  # per-sequence partial sums
    carry = torch.zeros(b, 2, di, n, device=u.device, dtype=torch.float32)  # adjoints between chunks
    dD = torch.empty(b, di, device=u.device, dtype=torch.float32) if D is not None else None
    dbias = torch.empty(b, di, device=u.device, dtype=torch.float32) if delta_bias is not None else None
    _scan_bwd_kernel[(b, triton.cdiv(di, block_d))](
        u, delta, A, B, C, D, z, delta_bias, dout, h0, carry,
        du, ddelta, dz, dB, dC, dA, dD, dbias,
        di, l, lp, n, di // g, g,
        *_strides(u, (0, 1)), *_strides(delta, (0, 1)), *_strides(z, (0, 1)),
        *_strides(B, (0, 1, 2)), *_strides(C, (0, 1, 2)), *_strides(dout, (0, 1)),
        *_strides(du, (0, 1)), *_strides(ddelta, (0, 1)), *_strides(dz, (0, 1)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=block_d, CHUNK=chunk, num_warps=num_warps, maxnreg=maxnreg,
        RUN=min(16 // u.element_size(), chunk),  # the steps a thread holds: Triton's 16-byte vectors (else only slower)
    )
    return (du[..., :l], ddelta[..., :l], dA.sum(0), dB[..., :l].to(B.dtype), dC[..., :l].to(C.dtype),
            dD.sum(0) if D is not None else None, dz[..., :l] if z is not None else None,
            dbias.sum(0) if delta_bias is not None else None)
