"""Fused Triton kernels for the selective scan: forward and backward (the one-step decode update is
in `triton_decode.py`).

Shape legend: b batch, l sequence length, di inner width, n SSM state size, g groups of B/C
(channel c reads group c // (di // g)). Inside the kernels: BLOCK_D channels per program, NP = n
rounded up to a power of two, CHUNK time steps per tile.

What is computed (the same function as `scan.selective_scan_ref`, all math in fp32):
    delta_t = softplus(delta_t + delta_bias)          (softplus passes values above 20 through)
    a_t     = exp(delta_t * A)                        (b, di, n, l) decays, each in (0, 1]
    h_t     = a_t * h_{t-1} + delta_t * B_t * u_t     (b, di, n) state
    y_t     = C_t . h_t + D * u_t,    out_t = y_t * silu(z_t)

Forward. One program owns BLOCK_D channels of one sequence and walks along l in chunks of CHUNK
steps. Inside a chunk the recurrence h -> a h + x is a composition of affine maps, which is
associative, so `tl.associative_scan` computes all CHUNK states of the chunk as one tile
(CHUNK, NP, BLOCK_D); the state h0 carried in from the previous chunk is folded into the first step.
Only h0 is written to memory, at every backward chunk (bwd_chunk steps, 128 by default): the
backward needs these states and recomputes everything else, so no (b, di, n, l) tensor ever exists
(the saved states take 4 n / bwd_chunk bytes per step and channel: 1/2 byte at n = 16).
exp(delta A) is computed as exp2(delta * A log2(e)), the native special-function instruction.

Where the grid would leave the GPU short of programs (a batch-1 prefill: few sequences, so few
programs, each a long walk), the sequence is cut into segments walked at once, in two passes.
The first walks every segment but the last from a zero state and keeps its end state E and its
sum of delta (the product of a segment's decays is exp(A sum(delta))). The second starts each
segment from the true state, folded from those of the segments before it (h <- decay h + E), and
walks it again, writing the outputs: twice the work in a fraction of the time.

Why the tile is laid out (CHUNK, NP, BLOCK_D): Triton spreads the last axis over a warp's lanes
first. With BLOCK_D = 16, the 32 lanes cover 16 channels x 2 halves of the state, and each thread
holds all CHUNK steps of its (channel, 8 states): the scan along the chunk then runs inside one
thread with no shuffles, and the sum over n needs one shuffle round (notes/scan-kernels.md has the
layouts tried). Each program also issues the next chunk's loads before computing the current one,
so memory latency hides behind the arithmetic.

Backward: triton_scan_bwd.py. It recomputes from the saved states; this file's autograd Function
calls it.

Official implementation: mamba_ssm/csrc/selective_scan (CUDA, the same chunked design with block
scans). Our forward differs: each thread scans its CHUNK steps sequentially, the lanes over channels
and n.
"""

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))


@triton.jit
def _compose(a_l, x_l, a_r, x_r):
    """Two affine steps h -> a h + x, first (a_l, x_l) then (a_r, x_r), as one step."""
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _delta(dt, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta + delta_bias, softplus (identity above 20); zero where masked so padding is inert."""
    if HAS_BIAS:
        dt = dt + bias
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _load_tile(col, t, mask, L):
    """The (CHUNK, X) tile at steps t of X rows starting at col (1, X); steps outside [0, L) read 0."""
    return tl.load(col + t[:, None], mask=((t >= 0) & (t < L))[:, None] & mask[None, :], other=0.0)


@triton.jit
def _pick(x, tc, t: tl.constexpr):
    """x[t] along the chunk axis. Step t sits in registers of the same thread, so the compiler keeps
    one register: adding -0.0 (not +0.0) is an exact identity it may drop."""
    return tl.sum(tl.where(tc[:, None, None] == t, x, -0.0), axis=0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, h0_ptr, last_ptr, ends_ptr, sums_ptr,
    steps_ptr, DI, L, N, GROUP, SEG,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_yb, s_yd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_STEPS: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr, SAVE: tl.constexpr,
    SUMMARY: tl.constexpr,
):
    """BLOCK_D channels of one sequence, over one segment of SEG chunks (all of them unless the scan
    is segmented: `_segments`). HAS_STEPS: delta is 0 from step *steps_ptr on (padding, whose state
    then passes through unchanged). SUMMARY, the first pass of a segmented scan: walk the segment from a
    zero state; store the state it ends in and its sum of delta (the segment's decay is
    exp(A sum(delta))). Otherwise fold the summaries of the segments before ours into the state we
    start from, walk, and store the outputs."""
    pid_d, pid_b, pid_s = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    tc = tl.arange(0, CHUNK)  # (CHUNK,) step within the chunk
    n = tl.arange(0, NP)  # (NP,) state index
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels
    mn, md = n < N, d < DI
    mnd = mn[:, None] & md[None, :]  # (NP, BLOCK_D)
    grp = pid_d * BLOCK_D // GROUP  # every channel of the block is in one group
    A2 = tl.load(A_ptr + d[None, :] * N + n[:, None], mask=mnd, other=0.0) * LOG2E  # (NP, BLOCK_D)
    bias = tl.load(bias_ptr + d, mask=md).to(tl.float32)[None, :] if HAS_BIAS else None  # (1, BLOCK_D)
    skip = tl.load(D_ptr + d, mask=md).to(tl.float32)[None, :] if HAS_D else None
    u_col = u_ptr + pid_b * s_ub + d[None, :] * s_ud  # (1, BLOCK_D) where each channel starts
    dt_col = dt_ptr + pid_b * s_tb + d[None, :] * s_td
    B_col = B_ptr + pid_b * s_Bb + grp * s_Bg + n[None, :] * s_Bn  # (1, NP)
    C_col = C_ptr + pid_b * s_Cb + grp * s_Cg + n[None, :] * s_Cn
    n_chunks = tl.cdiv(L, CHUNK)
    n_seg = tl.cdiv(n_chunks, SEG)
    h0_ptrs = h0_ptr + (pid_b * tl.cdiv(n_chunks, SAVE) * DI + d[None, :]) * N + n[:, None]  # (NP, BLOCK_D)

    real = tl.load(steps_ptr) if HAS_STEPS else L  # the steps before it are real, the rest padding
    h = tl.zeros((NP, BLOCK_D), tl.float32)  # state entering the chunk
    # Loops to a runtime bound are while loops in our kernels: under NumPy >= 2.4, triton 3.6's
    # interpreter cannot give range() one (a 1-element array, not a 0-d one, stands for each scalar).
    if not SUMMARY:
        j = 0
        while j < pid_s:  # the segments before ours, in order: h <- their decay * h + their end state
            rows = (pid_b * (n_seg - 1) + j) * DI + d  # (BLOCK_D,): its rows of the summaries
            total = tl.load(sums_ptr + rows, mask=md, other=0.0)  # (BLOCK_D,)
            h = tl.exp2(A2 * total[None, :]) * h + tl.load(ends_ptr + rows[None, :] * N + n[:, None], mask=mnd)
            j += 1
    c = pid_s * SEG
    t = c * CHUNK + tc  # (CHUNK,)
    u_nxt, dt_nxt = _load_tile(u_col, t, md, L), _load_tile(dt_col, t, md, L)  # (CHUNK, BLOCK_D)
    B_nxt, C_nxt = _load_tile(B_col, t, mn, L), _load_tile(C_col, t, mn, L)  # (CHUNK, NP)
    total = tl.zeros((BLOCK_D,), tl.float32)  # the segment's sum of delta (SUMMARY)
    while c < tl.minimum(pid_s * SEG + SEG, n_chunks):
        if not SUMMARY and c % SAVE == 0:  # the state entering every SAVE-th chunk, for the backward
            tl.store(h0_ptrs + c // SAVE * DI * N, h, mask=mnd)
        t = c * CHUNK + tc  # (CHUNK,)
        m = (t < L)[:, None] & md[None, :]  # (CHUNK, BLOCK_D)
        u, Bt, Ct = u_nxt.to(tl.float32), B_nxt.to(tl.float32), C_nxt.to(tl.float32)
        dt = _delta(dt_nxt.to(tl.float32), bias, (t < real)[:, None] & md[None, :], HAS_BIAS, SOFTPLUS)
        # issue the next chunk's loads now, so that they arrive while this chunk computes
        u_nxt, dt_nxt = _load_tile(u_col, t + CHUNK, md, L), _load_tile(dt_col, t + CHUNK, md, L)
        B_nxt, C_nxt = _load_tile(B_col, t + CHUNK, mn, L), _load_tile(C_col, t + CHUNK, mn, L)

        a = tl.exp2(dt[:, None, :] * A2[None, :, :])  # (CHUNK, NP, BLOCK_D)
        x = Bt[:, :, None] * (dt * u)[:, None, :]  # (CHUNK, NP, BLOCK_D)
        x = tl.where(tc[:, None, None] == 0, x + a * h[None, :, :], x)  # the carried-in state
        _, hc = tl.associative_scan((a, x), axis=0, combine_fn=_compose)  # (CHUNK, NP, BLOCK_D)
        h = _pick(hc, tc, CHUNK - 1)  # (NP, BLOCK_D)
        if SUMMARY:
            total += tl.sum(dt, axis=0)
        else:
            y = tl.sum(hc * Ct[:, :, None], axis=1)  # (CHUNK, BLOCK_D)
            if HAS_D:
                y += skip * u
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * s_zb + d[None, :] * s_zd + t[:, None], mask=m, other=0.0).to(tl.float32)
                y *= z * tl.sigmoid(z)
            tl.store(out_ptr + pid_b * s_yb + d[None, :] * s_yd + t[:, None], y, mask=m)
        c += 1
    if SUMMARY:  # no summary for the last segment: nothing comes after it
        summary = (pid_b * (n_seg - 1) + pid_s) * DI + d  # (BLOCK_D,): our segment's rows of the summaries
        tl.store(ends_ptr + summary[None, :] * N + n[:, None], h, mask=mnd)
        tl.store(sums_ptr + summary, total, mask=md)
    else:
        tl.store(last_ptr + (pid_b * DI + d[None, :]) * N + n[:, None], h, mask=mnd & (pid_s == n_seg - 1))


def _last_dim_contiguous(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _grouped(BC):
    return BC.unsqueeze(1) if BC.dim() == 3 else BC  # (b, g, n, l)


def _block_d(group, block_d):
    """Largest power of two <= block_d (None: 16) dividing the group width, so a block reads one group."""
    block_d = block_d or 16
    while group % block_d:
        block_d //= 2
    return block_d


def _segments(programs, n_chunks, segments, device):
    """How many segments of the sequence to scan at once (segments None: 1 unless the grid gives each
    multiprocessor fewer than 8 programs and the sequence has 32 chunks or more; then 4, doubled
    while under 16 programs a multiprocessor and each segment keeps 8 chunks or more, and at least
    one segment per 64 chunks).

    A batch-1 prefill has few channels to spread: at di = 5120, 16 channels a program make 320
    programs of one warp for an H100's 132 multiprocessors, each walking the whole sequence one
    chunk after the other. Cut into S segments, the walk is S times shorter, for a first pass over
    all but the last segment that sums each one up (its end state from zero, and its decay). H100,
    batch 1, l = 768 / 16K: 0.123 / 2.45 ms in one piece, 0.091 / 1.63 ms in 8; 2 segments were
    slower than one, and so was any split of a grid that already filled the GPU (notes/generation.md).
    A long sequence gains from more: at 16K (2,048 chunks of 8) 8 / 16 / 32 segments took 1.70 / 1.66 /
    1.61 ms with the prefill's D, z and bias, as the grid's last wave shrinks.
    """
    if segments is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        segments = 1
        if programs < 8 * sms and n_chunks >= 32:
            segments = 4
            while programs * segments < 16 * sms and n_chunks >= 16 * segments:
                segments *= 2
            segments = max(segments, n_chunks // 64)
    return min(segments, n_chunks)


def _strides(x, dims):
    return [x.stride(i) for i in dims] if x is not None else [0] * len(dims)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, steps, chunk, block_d, segments, num_warps, save):
    b, di, l = u.shape
    g, n = B.shape[1], A.shape[1]
    block_d = _block_d(di // g, block_d)
    n_chunks = triton.cdiv(l, chunk)
    seg = triton.cdiv(n_chunks, _segments(b * triton.cdiv(di, block_d), n_chunks, segments, u.device))  # chunks each
    n_seg = triton.cdiv(n_chunks, seg)
    out = torch.empty_like(u)  # in u's layout: channels first in training, so no copy follows
    h0 = torch.empty(b, triton.cdiv(l, save), di, n, device=u.device, dtype=torch.float32)
    last = torch.empty(b, di, n, device=u.device, dtype=torch.float32)
    ends = torch.empty(b, n_seg - 1, di, n, device=u.device, dtype=torch.float32)  # the summaries (none
    sums = torch.empty(b, n_seg - 1, di, device=u.device, dtype=torch.float32)  # unless segmented)
    launch = lambda segments, summary: _scan_fwd_kernel[(triton.cdiv(di, block_d), b, segments)](
        u, delta, A, B, C, D, z, delta_bias, out, h0, last, ends, sums, steps,
        di, l, n, di // g, seg,
        *_strides(u, (0, 1)), *_strides(delta, (0, 1)), *_strides(z, (0, 1)),
        *_strides(B, (0, 1, 2)), *_strides(C, (0, 1, 2)), *_strides(out, (0, 1)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_STEPS=steps is not None, BLOCK_D=block_d, NP=triton.next_power_of_2(n), CHUNK=chunk, SAVE=save // chunk,
        SUMMARY=summary,
        num_warps=num_warps,
    )
    if n_seg > 1:
        launch(n_seg - 1, True)
    launch(n_seg, False)
    return out, last, h0


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: the forward saves only the chunk-start states, the backward recomputes."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, steps, config):
        squeeze_bc = (B.dim() == 3, C.dim() == 3)
        u, delta, z = (_last_dim_contiguous(x) for x in (u, delta, z))
        B, C = _last_dim_contiguous(_grouped(B)), _last_dim_contiguous(_grouped(C))
        A = A.float().contiguous()
        D = D.contiguous() if D is not None else None  # any float dtype: the kernels compute in fp32
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        out, last, h0 = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, steps, *config["fwd"],
                                  save=config["bwd"][0])
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0)
        ctx.delta_softplus, ctx.config, ctx.squeeze_bc = delta_softplus, config, squeeze_bc
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0 = ctx.saved_tensors
        from minivlmamba.triton_scan_bwd import scan_bwd  # that file imports this one's helpers
        du, ddelta, dA, dB, dC, dD, dz, dbias = scan_bwd(
            _last_dim_contiguous(dout), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, h0,
            *ctx.config["bwd"])
        dB = dB.squeeze(1) if ctx.squeeze_bc[0] else dB
        dC = dC.squeeze(1) if ctx.squeeze_bc[1] else dC
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, steps=None, chunk=8, block_d=None, segments=None, num_warps=1,
                          bwd_chunk=128, bwd_block_d=2, bwd_num_warps=1, bwd_maxnreg=128):
    """The selective scan on fused Triton kernels (same arguments and results as selective_scan_ref).

    Args: u, delta, z (b, di, l); A (di, n) fp32; B, C (b, n, l) or (b, g, n, l); D, delta_bias (di,).
    steps (a 0-d integer tensor; forward only): delta is 0 from that step on, as in `selective_scan`.
    chunk is the forward's steps per tile, bwd_chunk the backward's (both powers of two, chunk
    dividing bwd_chunk, bwd_chunk at most 4096; the forward saves the state every bwd_chunk steps);
    block_d the channels per program (None: 16); segments how many pieces of the sequence the forward
    walks at once (None: more than one only where the GPU would be short of programs, as in a
    batch-1 prefill: `_segments`); num_warps the warps per program (forward, and bwd_* for the
    backward); bwd_maxnreg caps the backward's registers per thread (fewer registers, more warps
    resident per SM).
    Returns: out (b, di, l) in u's dtype, and last_state (b, di, n) fp32 if return_last_state.
    """
    assert bwd_chunk % chunk == 0, "the backward's chunks must start at saved states"
    assert bwd_chunk & (bwd_chunk - 1) == 0 and bwd_chunk <= 4096, "bwd_chunk: a power of two up to 4096"
    config = {"fwd": (chunk, block_d, segments, num_warps), "bwd": (bwd_chunk, bwd_block_d, bwd_num_warps, bwd_maxnreg)}
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if steps is not None and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError("selective_scan_triton: steps is for the forward only (a prefill), not for training")
    out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, steps, config)
    return (out, last) if return_last_state else out
