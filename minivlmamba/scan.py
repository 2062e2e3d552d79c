"""The selective scan: the recurrence at the heart of Mamba.

Shape legend (used in every shape comment of this package):
    b batch, l sequence length, d model width, di inner width (expand * d), n SSM state size,
    r dt rank, k scan directions, g groups of B/C, dig channels a group (di // g), p image patches,
    v vocabulary; m time steps a chunk of the CPU scan.

Paper symbols (Gu & Dao 2023, "Mamba", Algorithm 2), as they appear in the code:
    u      (b, di, l)  input sequence x_t
    delta  (b, di, l)  step size Delta_t (before delta_bias and softplus)
    A      (di, n)     diagonal state matrix, negative real
    B, C   (b, n, l)   input / output projections, chosen per time step ("selective"),
           or grouped (b, g, n, l): channel c reads group c // (di // g)
    D      (di,)       skip connection
    z      (b, di, l)  gate: the output is multiplied by silu(z)

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (zero-order hold for A, Euler for B)
    y_t = C_t . h_t + D * u_t

The same function serves the language model (g = 1) and the vision connector, which scans the
image in k orders at once by giving each direction its own group of B and C (g = k).

Official implementation: mamba_ssm/ops/selective_scan_interface.py (`selective_scan_ref` is the
semantic spec; we keep its signature). `selective_scan_torch` is the same computation arranged to
run fast on a CPU, `selective_scan_c` the same in C (cpu_scan.py); the fused
GPU kernels live in `triton_scan.py`.
"""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.autograd.function import once_differentiable

from minivlmamba import cpu_scan

BACKENDS = ("triton", "c", "torch", "ref")


def _per_channel(BC: torch.Tensor, di: int) -> torch.Tensor:
    """Expand B or C to one row per channel: (b, n, l) or (b, g, n, l) -> (b, di, n, l)."""
    if BC.dim() == 3:
        return rearrange(BC, "b n l -> b 1 n l")  # broadcasts over every channel
    return repeat(BC, "b g n l -> b (g dig) n l", dig=di // BC.shape[1])  # channel c reads group c // dig


def _softplus_delta(delta, delta_bias, delta_softplus):
    """Delta bias, then softplus (which passes values above 20 through unchanged, as upstream)."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z):
    """The scan's output from y_t = C_t . h_t (b, di, l): plus the skip D * u, times the gate silu(z)."""
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The readable selective scan: a plain loop over time, all math in fp32.

    Args: u, delta, z (b, di, l); A (di, n) fp32; B, C (b, n, l) or (b, g, n, l); D, delta_bias (di,).
    Returns: out (b, di, l) in u's dtype, and last_state (b, di, n) fp32 if return_last_state.
    """
    dtype_in = u.dtype
    u = u.float()
    delta = _softplus_delta(delta, delta_bias, delta_softplus)  # (b, di, l)
    b, di, l = u.shape
    B = rearrange(_per_channel(B.float(), di), "b c n l -> b c l n")  # c: di channels, or 1 shared by all
    C = rearrange(_per_channel(C.float(), di), "b c n l -> b c l n")
    A = A.float()

    # Discretize every step at once: how much of h survives step t, and what u_t writes into it.
    decay = torch.exp(delta[..., None] * A[:, None, :])  # (b, di, l, n): exp(delta_t A)
    drive = (delta * u)[..., None] * B  # (b, di, l, n): delta_t B_t u_t

    h = u.new_zeros(b, di, A.shape[1])  # (b, di, n): the state starts at zero
    states = []
    for decay_t, drive_t in zip(decay.unbind(2), drive.unbind(2)):  # one time step at a time
        h = decay_t * h + drive_t
        states.append(h)
    y = (torch.stack(states, dim=2) * C).sum(-1)  # (b, di, l): y_t = C_t . h_t

    out = _skip_and_gate(y, u, D, z).to(dtype_in)
    return (out, h) if return_last_state else out


_LOG2_E = 1.4426950408889634
_CHUNK_ELEMENTS = 2**19  # state elements in a chunk of steps (2 MiB fp32): a chunk's tensors stay in cache


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, h_{-1} = 0: time first, fp32.

    Args: u, delta (l, b, di) contiguous (delta after bias and softplus); A (di, n); B, C (l, b, g, n)
    contiguous. Returns: y (l, b, di), last state (b, di, n).

    Every step's state is one contiguous (b, g, n, dig) block with the channels innermost: delta_t,
    u_t and A line up with it along the channels and B_t, C_t broadcast along them, so each
    elementwise op is one vectorised pass. Time is cut into chunks of m steps (the last may be
    shorter) whose (m, b, g, n, dig) tensors fit in cache (_CHUNK_ELEMENTS): the loop over time runs
    only the recurrence, one op a step, and everything else is one op a chunk; no (l, b, g, n, dig)
    tensor is ever made. The sums over n (y, dL/d(delta_t u_t)) are batches of small matrix
    products; the sums over channels (dB, dC) a product and a sum along the contiguous axis, 5x
    faster than bmm's matrix-vector products.

    The forward keeps only the state each chunk starts from; the backward recomputes the chunk's
    decays and states from it (in cache: cheaper than writing them all to memory and reading them
    back), then runs the recurrence backwards in time:
        g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}        (g_{l-1} also gets the last state's gradient)
        dL/d(delta_t A) = g_t a_t h_{t-1},   dL/d(delta_t u_t B_t) = g_t.
    exp(x) is computed as exp2(x log2(e)), as in the Triton kernels: torch.exp is 2-3x slower on a
    CPU, and 30x slower again where it underflows (x below about -87). The error this adds is of
    the order of the rounding of delta * A itself (a relative 1e-6 at x = -10).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        l, b, g, n = B.shape
        di = u.shape[-1]
        dig, m = di // g, _chunk_steps(b, di, n)
        dl = delta.view(l, b, g, 1, dig)
        du = (delta * u).view(l, b, g, 1, dig)  # (l, b, g, 1, dig): delta_t u_t
        A = A.reshape(g, dig, n).transpose(1, 2).contiguous()  # (g, n, dig)
        A2 = A * _LOG2_E  # (g, n, dig)
        starts = range(0, l, m)
        saved = u.new_empty(len(starts) + 1, b, g, n, dig)  # the state each chunk starts from, and the last
        saved[0].zero_()
        decay, H = u.new_empty(m, b, g, n, dig), u.new_empty(m, b, g, n, dig)  # a chunk's a_t, h_t
        y = u.new_empty(l, b, g, 1, dig)  # (l, b, g, 1, dig)
        for c, t0 in enumerate(starts):
            t1 = min(t0 + m, l)
            a = _decays(dl[t0:t1], A2, decay[:t1 - t0])  # (m, b, g, n, dig)
            h = _states(a, du[t0:t1], B[t0:t1], saved[c], H[:t1 - t0])  # (m, b, g, n, dig)
            torch.bmm(C[t0:t1].view(-1, 1, n), h.view(-1, n, dig), out=y[t0:t1].view(-1, 1, dig))  # y_t = C_t . h_t
            saved[c + 1].copy_(h[-1])
        ctx.save_for_backward(u, dl, du, A, B, C, saved)
        return y.view(l, b, di), saved[-1].transpose(-1, -2).reshape(b, di, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):
        u, dl, du, A, B, C, saved = ctx.saved_tensors
        l, b, g, n = B.shape
        dig = A.shape[-1]
        di, m = g * dig, _chunk_steps(b, g * dig, n)
        A2 = A * _LOG2_E  # (g, n, dig)
        dy = grad_y.contiguous().view(l, b, g, 1, dig)  # (l, b, g, 1, dig)
        carry = grad_last.reshape(b, g, dig, n).transpose(-1, -2).contiguous()  # (b, g, n, dig): a_{t+1} g_{t+1}
        decay, G = u.new_empty(m, b, g, n, dig), u.new_empty(m, b, g, n, dig)  # a chunk's a_t, g_t
        H = u.new_empty(m + 1, b, g, n, dig)  # (m + 1, b, g, n, dig): h_{t0 - 1} .. h_{t1 - 1}
        d_du, d_delta = u.new_empty(l, b, g, 1, dig), u.new_empty(l, b, g, dig)  # d_delta: through the decays
        dB, dC, dA = u.new_empty(l, b, g, n), u.new_empty(l, b, g, n), u.new_zeros(g, n, dig)
        for c, t0 in reversed(list(enumerate(range(0, l, m)))):
            t1 = min(t0 + m, l)
            steps = t1 - t0  # m, fewer in the last chunk
            a = _decays(dl[t0:t1], A2, decay[:steps])  # (m, b, g, n, dig)
            H[0].copy_(saved[c])
            h = _states(a, du[t0:t1], B[t0:t1], H[0], H[1:steps + 1])  # (m, b, g, n, dig)
            g_ = torch.mul(dy[t0:t1], C[t0:t1, ..., None], out=G[:steps])  # (m, b, g, n, dig): dy_t C_t
            g_[-1] += carry
            for i in reversed(range(steps - 1)):
                g_[i].addcmul_(a[i + 1], g_[i + 1])  # g_t = dy_t C_t + a_{t+1} g_{t+1}
            torch.mul(a[0], g_[0], out=carry)
            q = a.mul_(g_).mul_(H[:steps])  # (m, b, g, n, dig): dL/d(delta_t A) = g_t a_t h_{t-1}
            torch.bmm(B[t0:t1].view(-1, 1, n), g_.view(-1, n, dig), out=d_du[t0:t1].view(-1, 1, dig))  # sum_n g_t B_t
            # The rest works in place: each chunk buffer is used up by the sum that reads it.
            torch.sum(g_.mul_(du[t0:t1]), dim=-1, out=dB[t0:t1])  # (m, b, g, n): sum_d g_t delta_t u_t
            torch.sum(h.mul_(dy[t0:t1]), dim=-1, out=dC[t0:t1])  # (m, b, g, n): sum_d dy_t h_t
            torch.sum(torch.mul(q, A, out=G[:steps]), dim=3, out=d_delta[t0:t1])  # (m, b, g, dig): sum_n q A
            dA += q.mul_(dl[t0:t1]).sum((0, 1))  # (g, n, dig): summed over steps and batch, q delta_t
        d_du, d_delta = d_du.view(l, b, di), d_delta.view(l, b, di)  # (l, b, di) each
        return d_du * dl.view(l, b, di), d_delta.addcmul_(d_du, u), dA.transpose(1, 2).reshape(di, n), dB, dC


def _chunk_steps(b, di, n):
    """m, the time steps a chunk: as many as fill _CHUNK_ELEMENTS state elements, at least one."""
    return max(1, _CHUNK_ELEMENTS // (b * di * n))


def _decays(delta, A2, out):
    """a_t = exp(delta_t A) = exp2(delta_t A2) for a chunk: delta (m, b, g, 1, dig), A2 = A log2(e)
    (g, n, dig) -> out (m, b, g, n, dig)."""
    return torch.mul(delta, A2, out=out).exp2_()


def _states(a, du, B, h, out):
    """h_t = a_t h_{t-1} + delta_t u_t B_t for a chunk, from the state h before it: a (m, b, g, n, dig),
    du (m, b, g, 1, dig), B (m, b, g, n), h (b, g, n, dig) -> out (m, b, g, n, dig)."""
    torch.mul(du, B[..., None], out=out)  # (m, b, g, n, dig): x_t = delta_t u_t B_t
    for i in range(len(a)):
        h = out[i].addcmul_(a[i], h)  # (b, g, n, dig)
    return out


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The same scan, exact, 2-4x faster than the reference on a CPU (same arguments; `bench cpu-scan`).

    The recurrence and its hand-written backward are `_SelectiveScan`, on time-first copies of the
    inputs. The bias, softplus, skip and gate around it work on (b, di, l) tensors, n times smaller,
    and are left to autograd; the skip and gate take (b, di, l) views of the time-first tensors, so
    that all their operands share one memory layout (an elementwise op over operands laid out
    differently is up to 10x slower).
    """
    dtype_in = u.dtype
    time_first = lambda X: X.float().movedim(-1, 0).contiguous()  # (b, ..., l) -> (l, b, ...)
    grouped = lambda X: X if X.dim() == 4 else X.unsqueeze(1)  # (b, n, l) -> (b, 1, n, l)
    view = lambda X: X.permute(1, 2, 0)  # (l, b, di) -> (b, di, l), a view
    u = time_first(u)  # (l, b, di)
    delta = time_first(_softplus_delta(delta, delta_bias, delta_softplus))  # (l, b, di)
    y, last = _SelectiveScan.apply(u, delta, A.float().contiguous(), time_first(grouped(B)), time_first(grouped(C)))
    out = _skip_and_gate(view(y), view(u), D, None if z is None else view(time_first(z))).to(dtype_in)  # (b, di, l)
    return (out, last) if return_last_state else out


def selective_scan_c(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False):
    """The same scan in C (cpu_scan.c) but for the delta bias and softplus: the recurrence, the skip
    and the gate, forward and backward, on the channels-last tensors the Mamba layer makes ((b, di, l)
    views of (b, l, di)), without copying them into another layout. Needs a C compiler
    (`cpu_scan.available()`); 2x faster than the PyTorch path at the tiny default's LM shape
    (`bench cpu-scan`)."""
    dtype_in = u.dtype
    channels_last = lambda X: X.float().transpose(-1, -2)  # (b, ..., l) -> (b, l, ...): a view where it can be
    B, C = ((X if X.dim() == 4 else X.unsqueeze(1)).float().permute(0, 3, 1, 2) for X in (B, C))  # (b, l, g, n)
    if not (B.stride()[2:] == C.stride()[2:] == (B.shape[3], 1) and B.stride() == C.stride()):
        B, C = B.contiguous(), C.contiguous()
    z = None if z is None else channels_last(z)
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    out, last = cpu_scan.CScan.apply(channels_last(u).contiguous(),
                                     channels_last(_softplus_delta(delta, delta_bias, delta_softplus)).contiguous(),
                                     A.float().contiguous(), B, C, None if D is None else D.float().contiguous(), z)
    out = out.transpose(1, 2).to(dtype_in)  # (b, di, l)
    return (out, last) if return_last_state else out


def selective_state_update_ref(ssm_state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                               delta_softplus=False):
    """One time step of the scan for decoding; updates ssm_state in place.

    Args: ssm_state (b, di, n) fp32; x, delta, z (b, di); A (di, n); B, C (b, n) or (b, g, n);
    D, delta_bias (di,). Returns: y (b, di) in x's dtype.
    """
    dtype_in = x.dtype
    x = x.float()
    delta = _softplus_delta(delta[..., None], delta_bias, delta_softplus)[..., 0]  # (b, di)
    B = _per_channel(B[..., None].float(), x.shape[1])[..., 0]  # (b, di or 1, n)
    C = _per_channel(C[..., None].float(), x.shape[1])[..., 0]  # (b, di or 1, n)
    ssm_state.mul_(torch.exp(delta[..., None] * A.float()))
    ssm_state.add_(delta[..., None] * B * x[..., None])
    y = (ssm_state * C).sum(-1)  # (b, di)
    if D is not None:
        y = y + D.float() * x
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """"auto" means the Triton kernels for CUDA tensors, else the C kernel where it compiles, else
    the PyTorch path."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "c" if cpu_scan.available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, steps=None, backend="auto"):
    """The selective scan with a choice of implementation (same arguments as selective_scan_ref).

    backend: "auto" takes the fused Triton kernels for CUDA tensors, else `selective_scan_c` where
    the C kernel compiles, else `selective_scan_torch`; "triton", "c", "torch" or "ref" force one.
    steps (a 0-d integer tensor; no gradients): the steps from it on are padding, where delta (after
    delta_bias and softplus) is 0: a decay of 1 and no input, so the last state is the one after step
    steps - 1. The Triton kernels read it themselves (a prefill graph replays any length with it).
    """
    name = resolve_backend(backend, u)
    if name == "triton":
        from minivlmamba.triton_scan import selective_scan_triton  # here: Triton loads only when used
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, steps)
    if steps is not None:  # delta + delta_bias = -inf before a softplus (softplus(-inf) = 0), else 0
        fill = float("-inf") if delta_softplus else 0.0 if delta_bias is None else -delta_bias[:, None]
        delta = torch.where(torch.arange(u.shape[-1], device=u.device) >= steps, fill, delta)
    fn = dict(c=selective_scan_c, torch=selective_scan_torch, ref=selective_scan_ref)[name]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_state_update(ssm_state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, backend="auto"):
    """One decode step (same arguments as selective_state_update_ref), Triton on CUDA."""
    if resolve_backend(backend, x) != "triton":  # the C and PyTorch paths have no step of their own
        return selective_state_update_ref(ssm_state, x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from minivlmamba.triton_decode import selective_state_update_triton
    return selective_state_update_triton(ssm_state, x, delta, A, B, C, D, z, delta_bias, delta_softplus)
