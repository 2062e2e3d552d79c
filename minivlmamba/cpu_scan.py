"""The selective scan's CPU kernel (and the Mamba layer's causal convolution + SiLU, `CConv1dSilu`):
cpu_scan.c, compiled on first use and called through ctypes.

The PyTorch path (`scan._SelectiveScan`) is as fast as a dozen elementwise passes over chunks of
states can be; the kernel keeps each block of channels' state in cache for the whole sequence
instead: the recurrence alone about 4x faster at the tiny default's LM shape, the whole scan with
its softplus, skip and gate 1.8x (`bench cpu-scan`), the training step 15-25%. It takes the same
time-first tensors and returns the same gradients, and tests/test_scan.py holds it to
`selective_scan_ref` like the PyTorch path.

The C file is compiled once a process (about a second) with the system's C compiler (`$CC`, else
`cc`) into a temporary folder; where none works, `available()` says why and the scan runs the
PyTorch path. Its loops over batch rows run on PyTorch's own threads: built with -fopenmp, the
library needs libgomp.so.1, which the loader finds already loaded by torch (the same name), so
both share one thread pool. Earlier versions ran on the calling thread alone, because a second
thread of our own (a Python thread) competed with PyTorch's, which keep spinning on the other core
between operations; sharing the pool made the tiny default's step about 20% faster.
"""

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import torch
from torch.autograd.function import once_differentiable

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_scan.c")
# -ffinite-math-only and -fno-signed-zeros let fminf / fmaxf become vector instructions; -funroll-loops
# (same arithmetic) makes the tiny default's step about 1 ms faster (the scan's loops over n and time).
_FLAGS = ["-O3", "-funroll-loops", "-fopenmp", "-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros",
          "-shared", "-fPIC"]


@functools.cache
def _library():
    """The compiled kernel, once a process; None, after saying why on stderr, where it does not build."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    folder = tempfile.mkdtemp(prefix="minivlmamba-")
    try:
        path, why = os.path.join(folder, "cpu_scan.so"), f"no C compiler {compiler[0]!r} (install one, or set $CC)"
        for arch in (["-march=native"], []) if shutil.which(compiler[0]) else ():  # this CPU's vectors, else the default
            result = subprocess.run([*compiler, *_FLAGS, *arch, _SOURCE, "-o", path], capture_output=True, text=True)
            if result.returncode == 0:
                lib = ctypes.CDLL(path)
                for fn in lib.scan_forward, lib.scan_backward, lib.conv_forward, lib.conv_backward:
                    fn.restype = None
                return lib
            why = f"{' '.join(compiler)} failed: {(result.stderr.strip().splitlines() or ['no message'])[-1]}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a loaded library stays mapped
    print(f"minivlmamba: the C scan kernel is not available ({why}); the CPU scan runs the slower PyTorch "
          "path", file=sys.stderr)
    return None


def available() -> bool:
    """Whether the kernel compiled on this machine (selective_scan's "auto" takes it on the CPU)."""
    return _library() is not None


def _run(fn, *args):
    """fn(*args) with tensors passed by address, None as NULL (args keeps them alive until fn returns)."""
    fn(*[ctypes.c_int(a) if isinstance(a, int) else ctypes.c_void_p(None if a is None else a.data_ptr())
         for a in args])


class CScan(torch.autograd.Function):
    """The selective scan after the delta bias and softplus, computed by cpu_scan.c, in the layout
    the Mamba layer makes its tensors (channels last), all fp32: u, delta (b, l, di) contiguous;
    A (di, n); B, C (b, l, g, n), strided alike with each step's (g, n) contiguous; D (di) or None;
    z (b, l, di) with channels contiguous, or None -> out (b, l, di) = (C_t . h_t + D u_t) silu(z_t)
    and the last state (b, di, n)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):
        b, l, g, n = B.shape
        dig = u.shape[-1] // g
        out, last = torch.empty_like(u), u.new_empty(b, g * dig, n)
        _run(_library().scan_forward, l, b, g, dig, n, u, delta, A, B, C, *B.stride()[:2], D, z,
             *(z.stride()[:2] if z is not None else (0, 0)), out, last)
        ctx.save_for_backward(u, delta, A, B, C, D, z)
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z = ctx.saved_tensors
        b, l, g, n = B.shape
        dig = u.shape[-1] // g
        du, d_delta, dA = torch.empty_like(u), torch.empty_like(u), u.new_empty(b, g * dig, n)
        dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
        dD = None if D is None else u.new_empty(b, g * dig)
        dz = None if z is None else torch.empty_like(u)
        _run(_library().scan_backward, l, b, g, dig, n, u, delta, A, B, C, *B.stride()[:2], D, z,
             *(z.stride()[:2] if z is not None else (0, 0)), grad_out.contiguous(), grad_last.contiguous(),
             du, d_delta, dA, dB, dC, dD, dz)
        return du, d_delta, dA.sum(0), dB, dC, None if dD is None else dD.sum(0), dz


class CConv1dSilu(torch.autograd.Function):
    """mamba.py's causal depthwise convolution + SiLU, computed by cpu_scan.c: x (b, l, di) fp32 (no
    copy where its channels are contiguous, as in a slice of in_proj's output), weight (di, k), bias
    (di) -> (b, l, di)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        b, l, di = x.shape
        x = x if x.stride(2) == 1 else x.contiguous()
        w = weight.t().contiguous()  # (k, di): each tap's weights contiguous, as the channels are
        y = x.new_empty(b, l, di)
        _run(_library().conv_forward, b, l, di, w.shape[0], x, x.stride(0), x.stride(1), w, bias, y)
        ctx.save_for_backward(x, w, bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w, bias = ctx.saved_tensors
        b, l, di = x.shape
        dx, dw, dbias = x.new_empty(b, l, di), torch.empty_like(w), torch.empty_like(bias)
        _run(_library().conv_backward, b, l, di, w.shape[0], x, x.stride(0), x.stride(1), w, bias,
             grad_y.contiguous(), dx, dw, dbias)
        return dx, dw.t(), dbias
