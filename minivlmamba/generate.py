"""Fast generation on a GPU: the one-token decode step, fused into a few Triton kernels.

Shape legend: b batch, d model width, di inner width (expand * d), n SSM state size, r dt rank,
v (padded) vocabulary.

At batch 1 a decode step of Mamba-2.8B reads every one of its 5.55 GB of weights once and does
almost no arithmetic, so its floor is the weight bytes over the memory bandwidth (1.8 ms on an
H100). Two things stand between the readable `MambaLM.step` and that floor:
- launches: its ~25 small PyTorch ops per layer (1,600 per token) each cost the CPU several
  microseconds to launch, longer than the GPU needs to run them. A CUDA graph records the whole
  step once; a replay then launches all of its kernels with one call (cuda_graphs.py).
- small kernels: even inside a graph each kernel costs ~2 us of start and drain. The norms, the
  conv, dt_proj and the gating between the matrix-vector products would cost as much as the
  products themselves.
`fused_step` computes the same function as `MambaLM.step` in four kernels per layer at batch 1,
each of which either reads weights at full speed or is too small to matter:
    linear       the matrix products (batch 1: ours, with the RMSNorm fused into in_proj, the conv
                 step into in_proj's epilogue and the residual add into out_proj; batches of up to
                 16: ours again, `batch_product`, but for x_proj; larger batches: cuBLAS)
    conv_step    batches: shift the conv window by one input, depthwise conv, SiLU
                 (upstream: causal_conv1d_update)
    ssm_step     dt_proj + softplus, state update, C . h + D x, * silu(z)  (upstream: selective_state_update)
The state and every sum stay in fp32; activations are stored in the weights' dtype as in the
readable step, so the two agree to rounding (tests/test_generate.py).
On Hopper the kernels are launched with programmatic dependent launch (PDL): each one may start
while the one before it drains, loads its weights (which no kernel writes), and only then waits
for its predecessor's output (`gdc_wait`). So the ramp-up of one kernel hides in the tail of the last.

Official implementation: mamba_ssm/modules/mamba_simple.py (`Mamba.step`: in_proj, the conv update,
x_proj, dt_proj, the state update and out_proj as separate kernels). We fuse them into four.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minivlmamba.mamba import InferenceCache, MambaLM


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, conv_out_ptr,
                 N, K, eps, DI, s_cd, s_ck,
                 NORM: tl.constexpr, ADD: tl.constexpr, CONV: tl.constexpr, PDL: tl.constexpr,
                 BLOCK_N: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KC: tl.constexpr):
    """Batch 1: out = W x for BLOCK_N rows of W (N, K). NORM: x is the fp32 residual stream, first
    RMS-normalised (and rounded to W's dtype, as RMSNorm returns it). ADD: out (fp32) += the product.
    CONV (in_proj): rows below DI are the conv's input x; each enters its channel's window in
    conv_state (di, KC) and conv_out gets silu(window . conv_w + conv_b), as `_conv_step_kernel`.
    The whole row is loaded at once, every load in flight together, as two tiles whose widths are
    powers of two: columns [0, K1) and [K1, K1 + K2), K1 <= K (5120 = 4096 + 1024; one tile of 8192
    would hold 3072 masked columns in registers, and fewer programs would fit a multiprocessor)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    k1, k2 = tl.arange(0, K1), K1 + tl.arange(0, K2)  # (K1,), (K2,)
    mn, mk = n < N, k2 < K
    w1 = tl.load(w_ptr + n[:, None] * K + k1[None, :], mask=mn[:, None], other=0.0)  # (BLOCK_N, K1)
    w2 = tl.load(w_ptr + n[:, None] * K + k2[None, :], mask=mn[:, None] & mk[None, :], other=0.0)  # (BLOCK_N, K2)
    if PDL:  # the weights are loading; let the next kernel launch and load its own weights during our
        tl.extra.cuda.gdc_launch_dependents()  # tail, and only now wait for the kernel before us (x is its
        tl.extra.cuda.gdc_wait()  # output; the next kernel's own wait covers us, as ours covers the one before)
    x1 = tl.load(x_ptr + k1).to(tl.float32)  # (K1,)
    x2 = tl.load(x_ptr + k2, mask=mk, other=0.0).to(tl.float32)  # (K2,)
    if NORM:
        rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / K + eps)
        x1 = x1 * rms * tl.load(norm_ptr + k1).to(tl.float32)
        x2 = x2 * rms * tl.load(norm_ptr + k2, mask=mk, other=0.0).to(tl.float32)
        x1, x2 = x1.to(w_ptr.dtype.element_ty).to(tl.float32), x2.to(w_ptr.dtype.element_ty).to(tl.float32)
    y = tl.sum(w1.to(tl.float32) * x1[None, :], axis=1) + tl.sum(w2.to(tl.float32) * x2[None, :], axis=1)
    y = y.to(w_ptr.dtype.element_ty)  # (BLOCK_N,)
    if ADD:
        y = tl.load(out_ptr + n, mask=mn, other=0.0) + y.to(tl.float32)
    tl.store(out_ptr + n, y, mask=mn)
    if CONV:
        mx = mn & (n < DI)
        window = conv_state_ptr + n * s_cd
        acc = tl.load(conv_b_ptr + n, mask=mx, other=0.0).to(tl.float32)  # (BLOCK_N,)
        for j in tl.static_range(KC):  # slot j takes slot j + 1, the last slot the new x
            if j < KC - 1:
                v = tl.load(window + (j + 1) * s_ck, mask=mx, other=0.0)
            else:
                v = y
            tl.store(window + j * s_ck, v, mask=mx)
            acc += v.to(tl.float32) * tl.load(conv_w_ptr + n * KC + j, mask=mx, other=0.0).to(tl.float32)
        tl.store(conv_out_ptr + n, (acc * tl.sigmoid(acc)).to(conv_out_ptr.dtype.element_ty), mask=mx)


@triton.jit
def _batch_product_kernel(x_ptr, w_ptr, out_ptr, B, N, K: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Batches of up to BLOCK_B rows: out (B, N) = x (B, K) @ W (N, K)^T for BLOCK_N columns of out,
    each weight read once for all rows (on the tensor cores: the BLOCK_B rows are the product's narrow
    side). ADD: out (fp32) += the product, rounded to W's dtype first, as `residual.add_(F.linear(...))`."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    b = tl.arange(0, BLOCK_B)
    mn, mb = n < N, b < B
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        mk = k < K
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        x = tl.load(x_ptr + b[None, :] * K + k[:, None], mask=mk[:, None] & mb[None, :], other=0.0)  # (BLOCK_K, BLOCK_B)
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    y = acc.to(w_ptr.dtype.element_ty)
    at, m = out_ptr + b[None, :] * N + n[:, None], mn[:, None] & mb[None, :]  # (BLOCK_N, BLOCK_B)
    if ADD:
        y = tl.load(at, mask=m, other=0.0) + y.to(tl.float32)
    tl.store(at, y, mask=m)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, D, eps, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """One row: out = rmsnorm(x) * w, in fp32, stored in out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    out = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps) * w
    tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_step_kernel(xz_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, DI, s_xb, s_sb, s_sd, s_sk,
                      K: tl.constexpr, PDL: tl.constexpr, BLOCK_D: tl.constexpr):
    """Batches: BLOCK_D channels of one row: window <- (window[1:], x); out = silu(window . w + bias)."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    pid_b = tl.program_id(1).to(tl.int64)
    md = d < DI
    window = state_ptr + pid_b * s_sb + d * s_sd
    acc = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)  # (BLOCK_D,)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    for k in tl.static_range(K):  # slot k takes slot k + 1; each channel stays in one thread, so
        if k < K - 1:             # every slot is read before it is overwritten
            v = tl.load(window + (k + 1) * s_sk, mask=md, other=0.0)
        else:
            v = tl.load(xz_ptr + pid_b * s_xb + d, mask=md, other=0.0)  # the new input x
        tl.store(window + k * s_sk, v, mask=md)
        acc += v.to(tl.float32) * tl.load(w_ptr + d * K + k, mask=md, other=0.0).to(tl.float32)
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * DI + d, out.to(out_ptr.dtype.element_ty), mask=md)


@triton.jit
def _ssm_step_kernel(state_ptr, x_ptr, xz_ptr, dbc_ptr, dtw_ptr, dtb_ptr, A_log_ptr, D_ptr, out_ptr,
                     B, DI, R, N, s_hb, s_hd, s_hn, s_xzb, s_dbcb,
                     PDL: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, RP: tl.constexpr,
                     NP: tl.constexpr):
    """BLOCK_D channels of ROWS rows (dt_proj's weights and A loaded once for all of them), each row:
    delta = softplus(W_dt dt + bias), h = exp(delta A) h + delta B x, out = (C . h + D x) * silu(z).
    RP, NP: r and n rounded up to powers of two."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    r, n = tl.arange(0, RP), tl.arange(0, NP)
    md, mr, mn = d < DI, r < R, n < N
    mdn = md[:, None] & mn[None, :]  # (BLOCK_D, NP)
    w_dt = tl.load(dtw_ptr + d[:, None] * R + r[None, :], mask=md[:, None] & mr[None, :], other=0.0)  # (BLOCK_D, RP)
    A = -tl.exp(tl.load(A_log_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0).to(tl.float32))
    dt_bias = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)  # (BLOCK_D,)
    skip = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    if PDL:  # the weights first, then wait for x_proj (and the kernels before it)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    first = tl.program_id(1).to(tl.int64) * ROWS  # our first row of the batch
    for i in tl.static_range(ROWS):
        row = first + i
        mrow = row < B  # the last program's rows may run past the batch
        dbc = dbc_ptr + row * s_dbcb  # this row of x_proj's output: dt (r), B (n), C (n)
        dt = tl.load(dbc + r, mask=mr & mrow, other=0.0).to(tl.float32)  # (RP,)
        delta = tl.sum(w_dt.to(tl.float32) * dt[None, :], axis=1) + dt_bias  # (BLOCK_D,): dt_proj, fused
        delta = tl.where(delta <= 20.0, tl.log(1.0 + tl.exp(delta)), delta)  # softplus, as F.softplus
        Bv = tl.load(dbc + R + n, mask=mn & mrow, other=0.0).to(tl.float32)  # (NP,)
        Cv = tl.load(dbc + R + N + n, mask=mn & mrow, other=0.0).to(tl.float32)
        mx = md & mrow
        x = tl.load(x_ptr + row * DI + d, mask=mx, other=0.0).to(tl.float32)  # (BLOCK_D,)
        z = tl.load(xz_ptr + row * s_xzb + DI + d, mask=mx, other=0.0).to(tl.float32)
        h_ptrs, mh = state_ptr + row * s_hb + d[:, None] * s_hd + n[None, :] * s_hn, mdn & mrow
        h = tl.load(h_ptrs, mask=mh, other=0.0)  # (BLOCK_D, NP) fp32
        h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
        tl.store(h_ptrs, h, mask=mh)
        y = tl.sum(h * Cv[None, :], axis=1) + skip * x
        y *= z * tl.sigmoid(z)
        tl.store(out_ptr + row * DI + d, y.to(out_ptr.dtype.element_ty), mask=mx)


BATCH_ROWS = 16  # batches up to this many rows take `batch_product` for their large products, not cuBLAS
PDL = True  # launch the step's kernels with programmatic dependent launch where the card has it


@functools.cache
def _shared_memory(device):
    """Bytes of shared memory a program may take on this card (227 KiB on an H100, 163 on an A100)."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


@functools.cache
def _has_pdl(device):
    return torch.cuda.get_device_capability(device)[0] >= 9  # Hopper and later


def _pdl(t):
    """Launch options for a kernel on t's device: each such kernel loads its weights, then waits for the
    one before it (gdc_wait), so that with PDL it can start while that one drains."""
    on = PDL and t.is_cuda and _has_pdl(t.device)
    return dict(PDL=on, launch_pdl=on)


def linear(x, weight, norm=None, residual=None, conv=None):
    """The step's matrix products: x (b, k) -> x @ weight.T (b, n) in weight's dtype.

    norm: an RMSNorm to apply to x (then the fp32 residual stream) first. residual (b, n) fp32: add
    the product into it, in place, and return it. At batch 1 these are matrix-vector products, which
    cuBLAS runs well under the bandwidth (notes/generation.md): our kernel reads a whole row of
    `weight` per program, all loads in flight at once, and fuses the norm and the add. Batches
    read each weight once for all rows: up to BATCH_ROWS rows in `batch_product` (cuBLAS's kernels
    for so few rows read slower), unless the product is narrow (x_proj: 192 rows of 5120, which
    cuBLAS splits along k over more programs than our grid of rows would have), else in cuBLAS.
    conv (in_proj): (conv_state (b, di, d_conv), conv1d); then -> (xz (b, 2di), silu(conv(x)) (b, di)),
    the conv step fused into the product at batch 1 (`conv_step` at batches).
    """
    b, k = x.shape
    if b > 1:
        if norm is not None:
            h = torch.empty(b, k, device=x.device, dtype=norm.weight.dtype)
            _rmsnorm_kernel[(b,)](x, norm.weight, h, k, norm.eps, BLOCK=triton.next_power_of_2(k), num_warps=8,
                                  **_pdl(x))
            x = h
        if b <= BATCH_ROWS and weight.shape[0] >= 1024:  # not narrow
            out = batch_product(x, weight, residual)
        else:
            out = F.linear(x, weight) if residual is None else residual.add_(F.linear(x, weight))
        return out if conv is None else (out, conv_step(out, *conv))
    n, k1 = weight.shape[0], 1 << (k.bit_length() - 1)
    block_n, warps = (4, 2) if k <= 4096 else (2, 4)  # measured best in the step (notes/generation.md)
    out = torch.empty(1, n, device=x.device, dtype=weight.dtype) if residual is None else residual
    conv_state, conv_w, conv_b, conv_out, di, kc = out, out, out, out, 0, 1  # placeholders: not read without conv
    if conv is not None:
        conv_state, conv1d = conv
        di, kc = conv_state.shape[1:]
        conv_w, conv_b = conv1d.weight, conv1d.bias
        conv_out = torch.empty(1, di, device=x.device, dtype=weight.dtype)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, x if norm is None else norm.weight, conv_state, conv_w, conv_b, conv_out,
        n, k, 0.0 if norm is None else norm.eps, di, *(conv_state.stride()[1:] if conv is not None else (0, 0)),
        NORM=norm is not None, ADD=residual is not None, CONV=conv is not None, BLOCK_N=block_n, K1=k1,
        K2=triton.next_power_of_2(max(k - k1, 1)), KC=kc,
        num_warps=warps, **_pdl(x))
    return out if conv is None else (out, conv_out)


def batch_product(x, weight, residual=None):
    """x (b, k) @ weight.T (b, n) in weight's dtype, each weight read once for all b rows; residual
    (b, n) fp32: add the product into it, in place, and return it (both contiguous, as the step's are).
    64 columns of the output a program, k in tiles that Triton's software pipeline keeps in flight:
    measured best (notes/generation.md), rows of 2560 in tiles of 128, 3 in flight, rows of 5120 in
    tiles of 256, 5 in flight."""
    b, k = x.shape
    n = weight.shape[0]
    block_n, block_b = 64, max(16, triton.next_power_of_2(b))
    block_k, stages = (128, 3) if k <= 4096 else (256, 5)
    if x.is_cuda:  # no more tiles in flight than the card's shared memory holds (fp32, more rows, older cards)
        stages = max(1, min(stages, _shared_memory(x.device) // ((block_n + block_b) * block_k * x.element_size())))
    out = torch.empty(b, n, device=x.device, dtype=weight.dtype) if residual is None else residual
    _batch_product_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, b, n, K=k, ADD=residual is not None,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", BLOCK_N=block_n,
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=4, num_stages=stages, **_pdl(x))
    return out


def conv_step(xz, conv_state, conv1d):
    """xz (b, 2di) (x, then z), conv_state (b, di, d_conv) updated in place -> silu(conv) (b, di)."""
    b, di, k = conv_state.shape
    out = torch.empty(b, di, device=xz.device, dtype=xz.dtype)
    block_d = 128
    _conv_step_kernel[(triton.cdiv(di, block_d), b)](xz, conv_state, conv1d.weight, conv1d.bias, out, di,
                                                     xz.stride(0), *conv_state.stride(), K=k, BLOCK_D=block_d,
                                                     num_warps=4, **_pdl(xz))
    return out


def ssm_step(ssm_state, x, xz, dt_B_C, mixer, block_d=16, rows=1, warps=4):
    """One step of the selective SSM with dt_proj fused in; ssm_state (b, di, n) fp32 updated in place.

    x (b, di) the conv output, xz (b, 2di) in_proj's output (z is its second half), dt_B_C (b, r + 2n)
    x_proj's output -> y (b, di) in x's dtype. A program takes block_d channels of `rows` rows of the
    batch with `warps` warps. The defaults are the best at batch 1 (notes/generation.md); at large
    batches, where each program reloads dt_proj's weights for one row of state, more rows a program
    are not yet measured (`python -m minivlmamba.bench generate --sweep`).
    """
    b, di, n = ssm_state.shape
    r = mixer.dt_proj.weight.shape[1]
    out = torch.empty_like(x)
    _ssm_step_kernel[(triton.cdiv(di, block_d), triton.cdiv(b, rows))](
        ssm_state, x, xz, dt_B_C, mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log, mixer.D, out,
        b, di, r, n, *ssm_state.stride(), xz.stride(0), dt_B_C.stride(0), BLOCK_D=block_d, ROWS=rows,
        RP=triton.next_power_of_2(r), NP=triton.next_power_of_2(n), num_warps=warps, **_pdl(x))
    return out


def fused_step(lm: MambaLM, input_ids, cache: InferenceCache):
    """The same function as `MambaLM.step` (input_ids (b,) -> logits (b, v)), four kernels a layer."""
    residual = lm.backbone.embedding(input_ids).float()  # (b, d): the residual stream
    for i, block in enumerate(lm.backbone.layers):
        mixer = block.mixer
        xz, x = linear(residual, mixer.in_proj.weight, norm=block.norm, conv=(cache.conv_state[i], mixer.conv1d))
        dt_B_C = linear(x, mixer.x_proj.weight)  # (b, r + 2n)
        y = ssm_step(cache.ssm_state[i], x, xz, dt_B_C, mixer)  # (b, di)
        linear(y, mixer.out_proj.weight, residual=residual)  # residual += out_proj(y), in place
    return linear(residual, lm.lm_head.weight, norm=lm.backbone.norm_f)  # (b, v)
